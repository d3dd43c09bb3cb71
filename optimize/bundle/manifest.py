"""The bundle's ``manifest.json`` as typed records, read and written in one place.

The JSON on disk is the schema-1 layout every bundle since the first has had; ``Manifest.from_json``
reads it (keys this version does not know are kept and written back), ``to_json`` writes it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from optimize.errors import BundleError
from optimize.inputs.specs import TensorSpec
from optimize.targets.base import RunnerConfig

SCHEMA_VERSION = 1
READABLE_VERSIONS = (1,)


def _split(data: dict[str, Any], cls: type) -> tuple[dict[str, Any], dict[str, Any]]:
    """(known fields, everything else) of a JSON object for dataclass ``cls``."""
    names = {f.name for f in dataclasses.fields(cls) if not f.metadata.get("transient")} - {"extra"}
    return {k: v for k, v in data.items() if k in names}, {k: v for k, v in data.items() if k not in names}


def _json(record: Any) -> dict[str, Any]:
    """A record's fields without the unset optional ones, then its unknown keys."""
    out = {}
    for field in dataclasses.fields(record):
        if field.name == "extra" or field.metadata.get("transient"):
            continue
        value = getattr(record, field.name)
        if value is None and field.metadata.get("omit_none"):
            continue
        if not value and field.metadata.get("omit_empty"):
            continue
        out[field.name] = value
    return {**out, **record.extra}


def _optional(default: Any = None) -> Any:
    return dataclasses.field(default=default, metadata={"omit_none": True})


@dataclasses.dataclass
class TargetRecord:
    """One target's outcome: ``built`` with its engine facts and accuracy, or ``failed`` /
    ``unavailable`` with the reason."""

    status: str  # built | failed | unavailable
    precision: str
    folder: str  # relative to the bundle
    reason: str | None = _optional()
    build_config: dict[str, Any] | None = _optional()
    files: list[str] | None = _optional()
    details: dict[str, Any] | None = _optional()
    build_time_s: float | None = _optional()
    runner_settings: dict[str, Any] | None = _optional()
    size_bytes: int | None = _optional()
    accuracy: dict[str, Any] | None = _optional()
    gate: dict[str, Any] | None = _optional()
    recovery: dict[str, Any] | None = _optional()
    coverage: dict[str, Any] | None = _optional()  # the precision read back from the engine (optimize.targets.coverage)
    drift: dict[str, Any] | None = _optional()
    # A failed target's engine stays in the build's stage cache (this folder), where ``optimize
    # explain`` finds it to say which layers broke it.
    cache_entry: str | None = _optional()
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Where a build left the engine's files (its stage-cache folder); never written to the manifest.
    engine_dir: Path | None = dataclasses.field(default=None, compare=False, metadata={"transient": True})

    @property
    def built(self) -> bool:
        return self.status == "built"

    @property
    def gate_passed(self) -> bool:
        return bool((self.gate or {}).get("passed"))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TargetRecord":
        known, extra = _split(data, cls)
        return cls(**known, extra=extra)

    def to_json(self) -> dict[str, Any]:
        return _json(self)


@dataclasses.dataclass
class Manifest:
    """Everything needed to reproduce and to trust a build (see ``optimize.bundle``)."""

    model_name: str
    task: str
    inputs: list[TensorSpec]
    outputs: list[dict[str, Any]]  # name, shape (batch -1), dtype
    targets: dict[str, TargetRecord]
    runner_config: RunnerConfig = RunnerConfig()
    schema_version: int = SCHEMA_VERSION
    created: str = ""
    source: dict[str, Any] = dataclasses.field(default_factory=dict)
    task_inferred: bool = False
    model_kind: str = "cnn"
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    machine: dict[str, Any] = dataclasses.field(default_factory=dict)
    plan: dict[str, Any] = dataclasses.field(default_factory=dict)
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    stages: dict[str, Any] = dataclasses.field(default_factory=dict)
    text: dict[str, Any] | None = None
    winner: dict[str, Any] | None = None
    bench: dict[str, Any] | None = _optional()
    warnings: list[str] = dataclasses.field(default_factory=list,  # results that are probably wrong
                                            metadata={"omit_empty": True})
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    # --- reading -----------------------------------------------------------------------------
    def built_targets(self) -> list[str]:
        return [name for name, record in self.targets.items() if record.built]

    def record(self, target: str, where: Any = "this bundle") -> TargetRecord:
        """The record of a built target, or a ``BundleError`` listing what is built."""
        record = self.targets.get(target)
        if record is None or not record.built:
            raise BundleError(f"target {target} is not built in {where}; built: "
                              f"{', '.join(self.built_targets()) or 'none'}")
        return record

    @property
    def winner_target(self) -> str | None:
        return (self.winner or {}).get("target")

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.outputs]

    # --- JSON --------------------------------------------------------------------------------
    @classmethod
    def from_json(cls, data: dict[str, Any], where: Any = "manifest.json") -> "Manifest":
        version = data.get("schema_version")
        if version not in READABLE_VERSIONS:
            raise BundleError(f"{where} has schema version {version}; this optimize reads versions "
                              f"{', '.join(map(str, READABLE_VERSIONS))}: rebuild the bundle")
        known, extra = _split(data, cls)
        try:
            known["inputs"] = [TensorSpec.from_json(s) for s in known["inputs"]]
            known["targets"] = {n: TargetRecord.from_json(t) for n, t in known["targets"].items()}
            fields = {f.name for f in dataclasses.fields(RunnerConfig)}
            known["runner_config"] = RunnerConfig(**{k: v for k, v in known.get("runner_config", {}).items()
                                                     if k in fields})
            return cls(**known, extra=extra)
        except (KeyError, TypeError) as exc:
            raise BundleError(f"{where} is not a complete manifest ({type(exc).__name__}: {exc}): "
                              f"rebuild the bundle") from exc

    def to_json(self) -> dict[str, Any]:
        out = _json(self)
        out["inputs"] = [s.to_json() for s in self.inputs]
        out["targets"] = {n: t.to_json() for n, t in self.targets.items()}
        out["runner_config"] = self.runner_config.to_json()
        order = ("schema_version", "model_name", "created", "source", "task", "task_inferred", "model_kind",
                 "inputs", "outputs", "versions", "machine", "plan", "runner_config", "data", "stages", "text",
                 "warnings", "targets", "winner", "bench")
        return {**{k: out[k] for k in order if k in out}, **{k: v for k, v in out.items() if k not in order}}
