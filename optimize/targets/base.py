"""The contracts every backend implements: a builder and a Runner.

A builder turns ``model.onnx`` + ``BuildConfig`` + calibration ``Samples`` into engine files in
a folder. A ``Runner`` loads that folder and answers ``infer({name: array}) -> {name: array}``;
validation, benchmarks and the server all use the same Runner.
"""

from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from optimize.specs import TensorSpec

INT8_SCHEMES = ("static", "dynamic", "weights")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """How one target is built. Every field is recorded in the manifest and keys the cache."""

    precision: str  # fp32 | fp16 | int8
    int8_scheme: str | None = None  # static | dynamic | weights (int8 only)
    calib_method: str = "minmax"
    per_channel: bool = True
    model_kind: str = "cnn"  # cnn | transformer: picks quantizer presets
    calib_batch_size: int = 8
    keep_fp32: tuple[str, ...] = ()  # node names left unquantized (accuracy recovery)
    batch_sizes: tuple[int, ...] = (1, 8, 32)  # engines with a fixed batch range (TensorRT's profile)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class RunnerConfig:
    """Thread and performance settings, recorded at build time and reused when serving."""

    threads: int = 0  # 0: the backend's default (all physical cores)
    performance_hint: str = "LATENCY"  # OpenVINO: LATENCY | THROUGHPUT
    streams: int = 1
    # ONNX Runtime: worker threads keep spinning after a call, so the next one starts at once. A
    # server turns it off: the spin would take a core from answering the request just computed.
    idle_spin: bool = True

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Engine:
    """What a builder produced: files (relative to the engine folder) and build details."""

    files: list[str]
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


class Runner(abc.ABC):
    """Runs one engine: numpy feeds by input name in, numpy outputs by output name out."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @abc.abstractmethod
    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch. Feeds must match ``inputs`` (batch axis free)."""

    @property
    @abc.abstractmethod
    def settings(self) -> dict[str, Any]:
        """The backend's effective thread and performance settings, for the record."""

    def close(self) -> None:
        """Release the engine's resources."""

    def infer_all(self, batches) -> dict[str, np.ndarray]:
        """Run every batch of an iterable and concatenate the outputs."""
        chunks: dict[str, list[np.ndarray]] = {}
        for batch in batches:
            for name, value in self.infer(batch).items():
                chunks.setdefault(name, []).append(value)
        return {name: np.concatenate(values) for name, values in chunks.items()}


def engine_size(folder: Path, files: list[str]) -> int:
    return sum((folder / f).stat().st_size for f in files)
