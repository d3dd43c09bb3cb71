"""The serving configuration tuned for a bundle (``optimize tune``), kept in ``serving.json``.

Engine instances, threads per instance, the most rows per engine call and how long a part-full
batch waits: how the server runs the engine, not what the engine computes. So it lives beside the
manifest, not in it, and stays out of the served version and the content hash (tuning makes no
new model version). It records the CPU and core count it was measured on; the server warns when
it runs on another.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from optimize import atomic
from optimize.errors import BundleError

SERVING_FILE = "serving.json"
LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServingKnobs:
    """What ``optimize tune`` searches; ``threads`` 0 is the build's own thread setting."""

    instances: int = 1
    threads: int = 0
    max_batch: int = 8
    max_delay_ms: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ServingKnobs":
        return cls(int(data["instances"]), int(data["threads"]), int(data["max_batch"]), float(data["max_delay_ms"]))

    @property
    def label(self) -> str:
        threads = f"{self.threads} thread(s)" if self.threads else "the build's threads"
        return (f"{self.instances} instance(s) x {threads}, batches up to {self.max_batch}, "
                f"wait {self.max_delay_ms:g} ms")


def read_serving(bundle: Path) -> dict[str, Any] | None:
    """The tuned record (``knobs``, ``target``, ``measured_on``, ...) or None when the bundle has none."""
    path = Path(bundle) / SERVING_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        ServingKnobs.from_json(record["knobs"])
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{path} is damaged ({type(exc).__name__}: {exc}); delete it or rerun optimize tune") from None
    return record


def tuned_knobs(bundle: Path, target: str) -> ServingKnobs | None:
    """The tuned knobs when they were tuned for ``target``, else None."""
    record = read_serving(bundle)
    if record is None or record.get("target") != target:
        return None
    return ServingKnobs.from_json(record["knobs"])


def write_serving(bundle: Path, record: dict[str, Any]) -> Path:
    path = Path(bundle) / SERVING_FILE
    atomic.write_json(path, record)
    return path


def measured_elsewhere(record: dict[str, Any]) -> list[str]:
    """How this machine differs from the one the record was tuned on (instruction sets, core count)."""
    from optimize.cpu import detect, differences

    here = detect()
    there = record.get("measured_on") or {}
    changed = differences(there, here)
    if there.get("cores") and int(there["cores"]) != here.cores:
        changed.append(f"{there['cores']} cores there, {here.cores} here")
    return changed
