"""The bundle: what ``optimize build`` writes, atomically, and how it is read back.

Layout::

    bundle/
      manifest.json          everything needed to reproduce and to trust the build
      program.pt2            the torch program (after pruning) for the eager baseline
      model.onnx             FP32 export of that program
      data/heldout.npz       held-out inputs (+ labels), for the accuracy gate and drift reference
      data/reference.npz     outputs of the original FP32 PyTorch model on those inputs
      data/eval.npz          labelled evaluation data and its reference outputs (with --eval-data)
      targets/<name>/        one folder per built target with its engine files

The bundle is assembled in a temporary sibling folder and renamed into place only when complete;
the stage cache lives beside it in ``<out>.cache/``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from optimize.errors import BundleError

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1


def cache_dir_for(out: Path) -> Path:
    return out.with_name(out.name + ".cache")


def write_json(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=False, default=str)
        handle.write("\n")
    Path(tmp).chmod(0o666 & ~_umask())
    os.replace(tmp, path)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def staging_folder(parent: Path, prefix: str) -> Path:
    """A fresh temporary folder beside its final place, with the permissions a plain ``mkdir``
    would give (``mkdtemp`` makes it private: a bundle must stay readable by the user that serves it)."""
    folder = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    folder.chmod(0o777 & ~_umask())
    return folder


class BundleWriter:
    """Stage a bundle in a temporary folder; ``commit()`` swaps it into place."""

    def __init__(self, out: Path):
        self.out = Path(out)
        if self.out.exists() and not (self.out / MANIFEST).exists():
            if not self.out.is_dir() or any(self.out.iterdir()):
                raise BundleError(f"--out {self.out} exists and is not a bundle; choose another path "
                                  f"or remove it")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.root = staging_folder(self.out.parent, f".{self.out.name}.tmp-")

    def commit(self) -> Path:
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, old)
        os.replace(self.root, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "BundleWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def read_manifest(bundle: Path) -> dict[str, Any]:
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not bundle.is_dir():
        raise BundleError(f"bundle {bundle} does not exist or is not a folder")
    if not path.is_file():
        raise BundleError(f"{bundle} is not a bundle: it has no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path} is not valid JSON ({exc})") from exc
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise BundleError(f"{path} has schema version {manifest.get('schema_version')}; this "
                          f"optimize reads version {SCHEMA_VERSION}: rebuild the bundle")
    return manifest


def load_runner(bundle: Path, target: str, **overrides: Any):
    """The Runner of one built target, with the thread settings recorded at build time
    (``overrides``: RunnerConfig fields to change, e.g. the server's ``idle_spin=False``)."""
    from optimize.targets import registry
    from optimize.targets.base import RunnerConfig

    manifest = read_manifest(bundle)
    entry = manifest["targets"].get(target)
    if not entry or entry.get("status") != "built":
        built = [n for n, e in manifest["targets"].items() if e.get("status") == "built"]
        raise BundleError(f"target {target} is not built in {bundle}; built: {', '.join(built) or 'none'}")
    module = registry.backend(target)
    return module.load_runner(Path(bundle) / entry["folder"], RunnerConfig(**{**manifest["runner_config"], **overrides}))


def choose_target(manifest: dict[str, Any], wanted: str | None, bundle: Path) -> str:
    """The target to serve or watch: ``wanted``, else the winner, else the first built one that is not a
    baseline (``torch-compile`` needs PyTorch, which the serving image leaves out)."""
    built = [n for n, e in manifest["targets"].items() if e.get("status") == "built"]
    if wanted:
        if wanted not in built:
            raise BundleError(f"target {wanted} is not built in {bundle}; built: {', '.join(built) or 'none'}")
        return wanted
    winner = (manifest.get("winner") or {}).get("target")
    if winner in built:
        return winner
    if not built:
        raise BundleError(f"bundle {bundle} has no built target")
    from optimize.targets import registry

    deployable = [n for n in built if n not in registry.TARGETS or not registry.TARGETS[n].baseline]
    return (deployable or built)[0]
