"""The contracts every backend implements: one ``Backend`` object and its ``Runner``.

A ``Backend`` holds every fact about one inference backend: the files of its engines, how Triton
runs them, whether an engine has a fixed batch profile, the modules and packages its build depends
on, how to build (``BuildInputs`` + ``BuildConfig`` + calibration ``Samples`` + a work folder ->
``Engine``), how to open a ``Runner`` on a built folder, and how it recovers accuracy when INT8
breaches the budget. Callers ask the object; nobody outside a backend's module and the registry
branches on which backend it is.

A ``Runner`` loads an engine folder and answers ``infer({name: array}) -> {name: array}``;
validation, benchmarks and the server all use the same Runner. It is a context manager:
``with backend.runner(folder, config) as runner:`` releases the engine on every path.
"""

from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from optimize.inputs.specs import TensorSpec

if TYPE_CHECKING:
    from optimize.inputs.calibration import Samples
    from optimize.targets.coverage import Coverage
    from optimize.targets.layer_error import EngineLayers, LayerProbe
    from optimize.validate import GateData

INT8_SCHEMES = ("static", "dynamic", "weights")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
ALL_NODES = "*"  # in ``keep_fp32``: every node stays FP32 (the guarantee that a search can reach FP32)


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
    max_sequence_length: int | None = None  # token models: the longest sequence an engine with a fixed range takes

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
    """What a builder produced: files (relative to the engine folder), build details, and the
    precision it really runs at when that differs from the target's (torch-compile on a GPU: fp16)."""

    files: list[str]
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    precision: str | None = None


@dataclasses.dataclass(frozen=True)
class BuildInputs:
    """The artifacts a build reads, named explicitly: the checked FP32 ONNX export, the
    ``torch.export`` program it came from (None for a TorchScript source), and the timing cache a
    backend may reuse across builds of the same cache folder (None: keep none)."""

    onnx: Path
    program: Path | None = None
    timing_cache: Path | None = None


@dataclasses.dataclass(frozen=True)
class TritonEntry:
    """How Triton Inference Server runs a backend's engine: ``platform``/``backend`` of its
    ``config.pbtxt``, the model file name, the files of its version folder and the instance kind."""

    backend: str
    files: tuple[str, ...]
    default_model_filename: str
    kind: str = "KIND_CPU"
    platform: str | None = None
    threads_parameter: str | None = None  # the backend's config parameter for threads per instance


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

    def coverage(self, sample: dict[str, np.ndarray]) -> "Coverage | None":
        """The engine's precision layer by layer, read back from the engine as this Runner runs it,
        with MACs counted at ``sample`` (one batch); None where the backend cannot tell."""
        return None

    def layer_probe(self) -> "LayerProbe | None":
        """The engine opened for per-layer error (``optimize.targets.layer_error``): its intermediate
        tensors exposed and its layers run alone, with this Runner's settings; None where the
        backend cannot expose them."""
        return None

    def close(self) -> None:
        """Release the engine's resources."""

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def infer_all(self, batches) -> dict[str, np.ndarray]:
        """Run every batch of an iterable and concatenate the outputs."""
        chunks: dict[str, list[np.ndarray]] = {}
        for batch in batches:
            for name, value in self.infer(batch).items():
                chunks.setdefault(name, []).append(value)
        return {name: np.concatenate(values) for name, values in chunks.items()}


def engine_size(folder: Path, files: list[str]) -> int:
    return sum((folder / f).stat().st_size for f in files)


@dataclasses.dataclass
class RecoveryContext:
    """What a backend's accuracy recovery works with: the build it improves on and ways to build
    a variant through the stage cache and to measure one against the FP32 model.

    ``build(config, label, builder, extra)`` -> (folder, result) builds ``config`` through the cache;
    ``select(folder)`` judges an engine on the selection split (what candidates are chosen on);
    ``evaluate(folder)`` -> (evaluation, runner settings) runs the accuracy gate on the held-out data.
    """

    inputs: BuildInputs
    config: BuildConfig
    calibration: "Samples | None"
    built: Path | None  # the folder of the engine that breached the budget (None: not built yet)
    data: "GateData"  # the splits and the FP32 model's outputs on them
    max_drop: float
    build: Callable[..., tuple[Path, dict[str, Any]]]
    evaluate: Callable[[Path], tuple[dict[str, Any], dict[str, Any]]]
    select: Callable[[Path], dict[str, Any]]
    budget_s: float | None = None  # seconds the search may take (None: the backend's own budget)
    # ``coverage(folder)`` -> the engine's precision read back (``optimize.targets.coverage``), or None
    coverage: Callable[[Path], dict[str, Any] | None] | None = None
    # ``layer_error(folder, nodes)`` -> the engine's per-layer error on the selection split
    # (``optimize.targets.layer_error.engine_layers``), or None where it cannot be read
    layer_error: Callable[..., "EngineLayers | None"] | None = None

    @property
    def task(self) -> str:
        return self.data.task

    @property
    def selection_name(self) -> str:
        return self.data.selection.name

    def choice_data(self) -> tuple["Samples", dict[str, np.ndarray]]:
        """The samples and FP32 outputs to choose on: the selection split where there is one."""
        return self.data.selection.samples, self.data.selection.reference


class Backend(abc.ABC):
    """Every fact about one inference backend (see the module docstring)."""

    name: str  # the backend's own name, as settings and logs report it
    modules: tuple[str, ...]  # the optimize modules whose code decides a built engine (keys the cache)
    triton: TritonEntry | None = None  # None: Triton has no backend for these engines
    fixed_batch_profile: bool = False  # engines take only the batch range they were built for
    needs_gpu_to_serve: bool = False  # a serving pod needs an NVIDIA GPU
    int8_schemes: tuple[str, ...] = ()  # the INT8 schemes it builds, tried in turn when none is given

    def recoverable(self, scheme: str) -> bool:
        """Whether ``recover`` has a recovery for INT8 engines of ``scheme``."""
        return False

    def check_config(self, config: BuildConfig) -> None:
        """Raise ``BuildError`` for a combination this backend cannot do (never substitute)."""

    def precision(self, config: BuildConfig) -> str:
        """The precision an engine of ``config`` is built in on this machine (torch-compile: BF16 on a
        CPU with native BF16, FP16 on a GPU)."""
        return config.precision

    @abc.abstractmethod
    def build(self, inputs: BuildInputs, config: BuildConfig, calibration: "Samples | None",
              workdir: Path) -> Engine:
        """Write the engine files into ``workdir``."""

    @abc.abstractmethod
    def runner(self, folder: Path, config: RunnerConfig = RunnerConfig()) -> Runner:
        """Open the engine in ``folder`` (a context manager)."""

    def recover(self, context: RecoveryContext) -> dict[str, Any] | None:
        """Manifest fields of an engine that keeps sensitive layers in higher precision, or None
        when this backend has no recovery for ``context.config``."""
        return None

    def triton_parameters(self, folder: Path) -> dict[str, str]:
        """``parameters`` of Triton's model config that the engine in ``folder`` needs (its backend's keys)."""
        return {}

    def triton_notes(self, folder: Path) -> list[str]:
        """What a Triton export of the engine in ``folder`` loses, said to the user."""
        return []

    def vendor_benchmark(self, folder: Path, shapes: str, threads: int, seconds: int) -> list[str] | str | None:
        """The vendor's own benchmark command for this engine (a cross-check of our harness); a string
        saying why it cannot run here; None when the vendor has no such tool."""
        return None
