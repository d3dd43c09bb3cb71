"""What a build leaves behind: the bundle folder, written atomically and read back (``folder``), its
typed manifest (``manifest``), the stage cache beside it (``cache``) and the targets table people
read (``table``). Atomic writes themselves are ``optimize.atomic``, at the bottom: every layer
writes files with them.

The bundle's reading side (``read_manifest``, ``load_runner``, ``choose_target``) is importable
from here; the server, the benchmark and the exports all read bundles through it.
"""

from optimize.bundle.folder import (BundleWriter, cache_dir_for, choose_target, load_runner, read_manifest,
                                    write_manifest)

__all__ = ["BundleWriter", "cache_dir_for", "choose_target", "load_runner", "read_manifest", "write_manifest"]
