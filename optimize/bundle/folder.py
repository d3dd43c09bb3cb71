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

import datetime
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimize import atomic
from optimize.errors import BundleError
from optimize.bundle.manifest import SCHEMA_VERSION, Manifest

if TYPE_CHECKING:
    from optimize.inputs.tokenizer import TextEncoder

MANIFEST = "manifest.json"
__all__ = ["MANIFEST", "SCHEMA_VERSION", "BundleWriter", "cache_dir_for", "choose_target", "load_runner",
           "read_manifest", "text_encoder", "write_manifest"]


def cache_dir_for(out: Path) -> Path:
    return out.with_name(out.name + ".cache")


class BundleWriter(atomic.StagedFolder):
    """Stage a bundle in a temporary folder beside ``out``; ``commit()`` swaps it into place.
    Used as a context manager, an error removes the staged folder and leaves ``out`` as it was."""

    def __init__(self, out: Path):
        out = Path(out)
        if out.exists() and not (out / MANIFEST).exists():
            if not out.is_dir() or any(out.iterdir()):
                raise BundleError(f"--out {out} exists and is not a bundle; choose another path "
                                  f"or remove it")
        super().__init__(out)
        self.out = out

    def __enter__(self) -> "BundleWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def read_manifest(bundle: Path) -> Manifest:
    """The bundle's typed manifest; a missing, broken or too-new one is a ``BundleError``."""
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not bundle.is_dir():
        raise BundleError(f"bundle {bundle} does not exist or is not a folder")
    if not path.is_file():
        raise BundleError(f"{bundle} is not a bundle: it has no {MANIFEST}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path} is not valid JSON ({exc})") from exc
    return Manifest.from_json(data, path)


def write_manifest(bundle: Path, manifest: Manifest) -> None:
    atomic.write_json(Path(bundle) / MANIFEST, manifest.to_json())


def load_runner(bundle: Path, target: str, **overrides: Any):
    """The Runner of one built target, with the thread settings recorded at build time
    (``overrides``: RunnerConfig fields to change, e.g. the server's ``idle_spin=False``)."""
    import dataclasses

    from optimize.targets import registry

    manifest = read_manifest(bundle)
    record = manifest.record(target, bundle)
    config = dataclasses.replace(manifest.runner_config, **overrides)
    return registry.backend(target).runner(Path(bundle) / record.folder, config)


def choose_target(manifest: Manifest, wanted: str | None, bundle: Path) -> str:
    """The target to serve or watch: ``wanted``, else the winner, else the first built one that is not a
    baseline (``torch-compile`` needs PyTorch, which the serving image leaves out)."""
    built = manifest.built_targets()
    if wanted:
        manifest.record(wanted, bundle)
        return wanted
    if manifest.winner_target in built:
        return manifest.winner_target
    if not built:
        raise BundleError(f"bundle {bundle} has no built target")
    from optimize.targets import registry

    deployable = [n for n in built if n not in registry.TARGETS or not registry.TARGETS[n].baseline]
    return (deployable or built)[0]


def text_encoder(bundle: Path, manifest: Manifest) -> "TextEncoder | None":
    """The tokenizer of a bundle whose model takes text (a ``text`` section), else None."""
    if not manifest.text:
        return None
    from optimize.inputs.tokenizer import TextEncoder

    return TextEncoder(Path(bundle), manifest.text, list(manifest.inputs))


def version_number(manifest: Manifest, target: str) -> str:
    """The served version: the build's UTC time to the millisecond, YYYYMMDDHHMMSSmmm, followed by
    the target's place among the bundle's targets (two digits), e.g. ``2026120322150412302``. It
    grows with each build (a Triton "latest" policy means the newest) and fits Triton's int64
    versions (19 digits, below 9.2e18)."""
    try:
        created = datetime.datetime.fromisoformat(manifest.created)
    except (TypeError, ValueError):
        created = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)  # a manifest without its time
    if created.tzinfo is None:
        created = created.replace(tzinfo=datetime.timezone.utc)
    place = list(manifest.targets).index(target) + 1 if target in manifest.targets else 0
    created = created.astimezone(datetime.timezone.utc)
    return f"{created:%Y%m%d%H%M%S}{created.microsecond // 1000:03d}{place:02d}"
