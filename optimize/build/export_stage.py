"""The export stage: the (pruned) PyTorch model -> ``torch.export`` program -> ONNX, checked against
PyTorch on held-out samples, cached by the model's hash, the held-out data and a typed config."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from optimize.bundle.cache import Stage, StageCache
from optimize.inputs.calibration import Samples
from optimize.inputs.checkpoint import file_sha256
from optimize.inputs.specs import TensorSpec
from optimize.passes import onnx_export as export_pass

if TYPE_CHECKING:
    import torch

PARITY_SAMPLES = 32
EXPORT_STAGE = Stage("export", ("optimize.build.export_stage", "optimize.passes.onnx_export", "optimize.inputs.calibration",
                               "optimize.inputs.checkpoint", "optimize.inputs.factory", "optimize.inputs.hf_folder",
                               "optimize.inputs.binding", "optimize.inputs.pruned_checkpoint",
                               "optimize.inputs.specs", "optimize.errors", "optimize.quiet"),
                     packages=("torch", "onnx", "onnxscript", "onnxruntime", "transformers"))


@dataclasses.dataclass(frozen=True)
class ExportStageConfig:
    """What keys the export: the inputs' names, shapes, dtypes and dynamic axes, the outputs'
    names, whether a ``torch.export`` program is saved beside the ONNX file, the parity sample count."""

    inputs: tuple[TensorSpec, ...]
    output_names: tuple[str, ...]
    save_program: bool
    parity_samples: int = PARITY_SAMPLES

    def to_json(self) -> dict[str, Any]:
        return {"inputs": [s.to_json() for s in self.inputs], "output_names": list(self.output_names),
                "save_program": self.save_program, "parity_samples": self.parity_samples}


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What the export stage returns: its cache folder, the saved program (None for TorchScript),
    the ONNX file's hash and the parity check against PyTorch."""

    folder: Path
    program: Path | None
    onnx_sha256: str
    parity: dict[str, Any]
    tolerance: dict[str, Any]
    route: str = "torch.export"
    failed_routes: list[str] = dataclasses.field(default_factory=list)

    @property
    def onnx(self) -> Path:
        return self.folder / "model.onnx"


def run_export_stage(config: ExportStageConfig, module: "torch.nn.Module", held_out: Samples,
                     parity_reference: dict[str, np.ndarray], model_hash: str, cache: StageCache) -> ExportResult:
    """torch.export -> ONNX, checked against ``module`` (the pruned model when pruning ran) on the
    first held-out samples, whose outputs from ``module`` are ``parity_reference``."""
    specs = list(config.inputs)
    example = {k: v[:2] if len(v) >= 2 else np.concatenate([v, v]) for k, v in held_out.arrays.items()}

    def produce(folder: Path) -> dict:
        subset = held_out.take(np.arange(min(config.parity_samples, len(held_out))))
        want = {k: v[:len(subset)] for k, v in parity_reference.items()}

        def check(path: Path) -> dict:
            got = export_pass.onnx_outputs(path, subset.batches(8))
            return export_pass.compare_outputs(want, got, export_pass.FP32_EXPORT_TOLERANCE, "ONNX export vs PyTorch")

        # A loaded .pt2 is re-exported too, so its axes become the dynamic ones asked for.
        made = export_pass.export_checked(module, example, specs, list(config.output_names), folder / "model.onnx",
                                          check, config.save_program)
        if made.program is not None:
            export_pass.save_program(made.program, folder / "program.pt2")
        return {"program": "program.pt2" if made.program is not None else None,
                "onnx_sha256": file_sha256(folder / "model.onnx"), "parity": made.parity,
                "tolerance": dataclasses.asdict(export_pass.FP32_EXPORT_TOLERANCE),
                "route": made.route, "failed_routes": made.failed}

    folder, result = cache.run(EXPORT_STAGE, {"model": model_hash, "held_out": held_out.sha256}, config, produce)
    return ExportResult(folder, folder / result["program"] if result.get("program") else None,
                        result["onnx_sha256"], result["parity"], result["tolerance"],
                        result.get("route", "torch.export"), result.get("failed_routes", []))
