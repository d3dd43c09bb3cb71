"""Facts about where the code runs: library versions, the code's own fingerprint, the machine.

The bottom of the package: every layer may read these (the build's manifest, the benchmark's
report, a search's trial tags); this module imports nothing of ours but ``optimize.cpu``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import platform
from pathlib import Path
from typing import Any

from optimize import __version__

VERSIONED_PACKAGES = ("torch", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino", "nncf",
                      "tensorrt", "numpy", "torch-pruning")


@functools.lru_cache(maxsize=None)
def code_fingerprint() -> str:
    """One hash of every source file of the ``optimize`` package: two builds with the same
    fingerprint ran the same code (the manifest records it; a search's trials are tagged with it)."""
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def library_versions() -> dict[str, str]:
    """Python, this package (version and code fingerprint) and every installed library that decides results."""
    versions = {"python": platform.python_version(), "optimize": __version__, "optimize_code": code_fingerprint()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def machine_info() -> dict[str, Any]:
    """The CPU (model, cores, architecture, the instruction sets that decide speed) and the system."""
    from optimize.cpu import detect

    return {**detect().to_json(), "system": platform.platform()}
