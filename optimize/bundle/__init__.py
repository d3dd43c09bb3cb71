"""What a build leaves behind: the bundle folder and its typed manifest (``folder``, ``manifest``),
the atomic writes that keep a half-written folder from ever being read (``atomic``), the stage
cache beside it (``cache``) and the targets table people read (``table``).

The bundle's reading side (``read_manifest``, ``load_runner``, ``choose_target``) is importable
from here; the server, the benchmark and the exports all read bundles through it.
"""

from optimize.bundle.folder import (BundleWriter, cache_dir_for, choose_target, load_runner, read_manifest,
                                    write_manifest)

__all__ = ["BundleWriter", "cache_dir_for", "choose_target", "load_runner", "read_manifest", "write_manifest"]
