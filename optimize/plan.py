"""The build plan: every choice of ``optimize build`` in small typed configs.

The CLI only parses flags into a ``BuildPlan``; ``optimize.pipeline.run_build`` executes it.
The Python API builds the same plan.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from optimize.calibration import ImageOptions
from optimize.passes.distill import DistillConfig
from optimize.passes.prune import PruneConfig
from optimize.select import LoadSpec, Slo
from optimize.targets.base import RunnerConfig


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """Where the model comes from."""

    checkpoint: Path
    arch: str | None = None
    arch_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    trust_checkpoint: bool = False


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Inputs, calibration data and the held-out split."""

    input_shapes: tuple[str, ...] = ()
    calib: str | None = None
    eval_data: str | None = None
    held_out_fraction: float = 0.2
    max_held_out: int = 2000
    max_calib_samples: int = 1000
    seed: int = 0
    image: ImageOptions = ImageOptions()
    train_data: str | None = None  # labelled data for recovery after pruning
    tokenizer: str | None = None  # tokenizer.json (or its folder) kept in the bundle for text input
    max_sequence_length: int | None = None  # token models: the longest sequence served (None: the model's own)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """INT8 choices; ``int8_scheme=None`` picks the default for the model kind."""

    int8_scheme: str | None = None
    calib_method: str = "minmax"
    per_channel: bool = True
    calib_batch_size: int = 8
    recover_accuracy: bool = True


@dataclasses.dataclass(frozen=True)
class Selection:
    """Pick the bundle's winner after the build: benchmark every built target at ``load`` (a short
    batch-1 run by default) and choose the fastest within the accuracy budget that meets ``slo``."""

    load: LoadSpec = LoadSpec("batch", 1.0)
    slo: Slo | None = None
    bench: Any = None  # an optimize.bench.run.BenchConfig; None: a short batch-1 run, no cross-check
    progress: bool = True

    def bench_config(self) -> Any:
        if self.bench is not None:
            return self.bench
        from optimize.bench.load import LoadPlan
        from optimize.bench.run import BenchConfig

        plan = LoadPlan(batch_sizes=(1,), concurrency=(), rates=(), rate_fractions=(), duration_s=3.0)
        return BenchConfig(plan=plan, cross_check=False)

    def to_json(self) -> dict[str, Any]:
        return {"load": self.load.label, "slo": str(self.slo) if self.slo else None,
                "bench": self.bench_config().to_json()}


@dataclasses.dataclass(frozen=True)
class BuildPlan:
    """Every choice of one build. ``targets`` may name ``all`` (every target this machine can
    build) or ``auto`` (the same, then benchmark and pick the winner: ``selection``, or the default
    ``Selection`` when none is given)."""

    source: SourceConfig
    out: Path
    targets: tuple[str, ...] = ("all",)
    data: DataConfig = DataConfig()
    quant: QuantConfig = QuantConfig()
    task: str | None = None
    max_accuracy_drop: float | None = None
    name: str | None = None
    runner: RunnerConfig = RunnerConfig()
    use_cache: bool = True
    prune: PruneConfig | None = None
    distill: DistillConfig = DistillConfig()
    batch_sizes: tuple[int, ...] = (1, 8, 32)  # the batch range engines must take (TensorRT's profile)
    selection: Selection | None = None  # benchmark and pick the winner after the build
    strict: bool = False  # a probably-wrong result (FP32 accuracy at chance) is an error, not a warning
    cache_dir: Path | None = None  # the stage cache (None: OUT.cache beside the bundle); a search shares one

    @property
    def winner_selection(self) -> Selection | None:
        """The selection to run after the build: the plan's own, or the default one for ``auto``."""
        if self.selection is not None:
            return self.selection
        if any(part.strip() == "auto" for item in self.targets for part in item.split(",")):
            return Selection()
        return None

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(dataclasses.replace(self, selection=None))
        data["selection"] = self.selection.to_json() if self.selection else None
        return json_ready(data)


def json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
