"""The build plan: every choice of ``optimize build`` in small typed configs.

The CLI only parses flags into a ``BuildPlan``; ``optimize.build.pipeline.run_build`` executes it.
The Python API builds the same plan.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from optimize.inputs.calibration import ImageOptions
from optimize.passes.distill import DistillConfig
from optimize.passes.prune import PruneConfig
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
class BuildPlan:
    """Every choice of one build. ``targets`` may name ``all`` (every target this machine can
    build); ``auto`` builds the same, and ``optimize.auto.build_and_select`` then benchmarks the
    bundle and picks the winner."""

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
    strict: bool = False  # a probably-wrong result (FP32 accuracy at chance) is an error, not a warning
    cache_dir: Path | None = None  # the stage cache (None: OUT.cache beside the bundle); a search shares one

    def to_json(self) -> dict[str, Any]:
        return json_ready(dataclasses.asdict(self))


def json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
