"""Preparing a build: the model, its input specs, the data split and the reference outputs."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from optimize.calibration import Samples, load_samples
from optimize.checkpoint import LoadedModel, load_checkpoint
from optimize.errors import CalibrationError, InputSpecError
from optimize.passes.export import output_names_for, torch_outputs
from optimize.passes.prune import HEAD_COUNT_ATTRS
from optimize.specs import TASKS, TensorSpec, dynamic_spec, parse_input_shapes
from optimize import validate

if TYPE_CHECKING:
    from optimize.plan import BuildPlan

RANDOM_HELD_OUT = 64


@dataclasses.dataclass
class Prepared:
    """Everything the export and target stages need, computed once."""

    loaded: LoadedModel
    inputs: list[TensorSpec]
    output_names: list[str]
    task: str
    task_inferred: bool
    calibration: Samples | None
    held_out: Samples
    reference: dict[str, np.ndarray]
    evaluation: Samples | None = None
    eval_reference: dict[str, np.ndarray] | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    model_kind: str = "cnn"  # cnn | transformer: presets of pruning, recovery and quantization


ATTENTION_OPS = ("matmul", "bmm", "scaled_dot_product_attention", "baddbmm")


def model_kind(specs: list[TensorSpec], module: Any) -> str:
    """``transformer`` for token inputs, attention blocks, or a traced graph dominated by matrix
    products; else ``cnn``. The one decision every stage's presets follow."""
    if any(np.dtype(s.dtype).kind in "iu" for s in specs):
        return "transformer"
    for child in module.modules():
        kind = getattr(child, "original_name", type(child).__name__)
        if kind == "MultiheadAttention" or any(isinstance(getattr(child, a, None), int) for a in HEAD_COUNT_ATTRS):
            return "transformer"
    graph = getattr(module, "graph", None)  # TorchScript and torch.export modules: their traced ops
    nodes = getattr(graph, "nodes", None)
    if nodes is not None:
        ops = [str(getattr(n, "target", None) or n.kind()).lower() for n in (nodes() if callable(nodes) else nodes)]
        products = sum(any(op in o for op in ATTENTION_OPS) for o in ops)
        if products > max(sum("conv" in o for o in ops), 2):
            return "transformer"
    return "cnn"


def run_reference(module: Any, samples: Samples, output_names: list[str] | None,
                  batch_size: int = 64) -> dict[str, np.ndarray]:
    """The original FP32 model's outputs on ``samples``: what every accuracy number is against."""
    chunks: list[list[np.ndarray]] = []
    for batch in samples.batches(batch_size):
        outputs = list(torch_outputs(module, batch, output_names_for(64)).values())
        chunks.append(outputs)
    names = output_names or output_names_for(len(chunks[0]))
    return {name: np.concatenate([c[i] for c in chunks]) for i, name in enumerate(names)}


def _specs(plan: BuildPlan, loaded: LoadedModel, samples: Samples | None) -> list[TensorSpec]:
    names = loaded.input_names
    if plan.data.input_shapes:
        parsed = parse_input_shapes(plan.data.input_shapes, names)
        return [dynamic_spec(n, s, d, sequence=np.dtype(d).kind in "iu" and len(s) == 2)
                for n, s, d in parsed]
    if samples is None:
        raise InputSpecError("give --input-shape (e.g. 1x3x224x224) or --calib data so the model's "
                             "input shapes are known")
    arrays = samples.arrays
    if len(arrays) == 1 and len(names) >= 1 and names[0] not in arrays:
        arrays = {names[0]: next(iter(arrays.values()))}
    ordered = [n for n in names if n in arrays] or list(arrays)
    missing = [n for n in arrays if n not in ordered]
    if missing:
        raise InputSpecError(f"data {samples.source} has arrays {missing} that are not inputs of "
                             f"the model's forward({', '.join(names)})")
    return [dynamic_spec(n, arrays[n].shape, str(arrays[n].dtype),
                         sequence=arrays[n].dtype.kind in "iu" and arrays[n].ndim == 2)
            for n in ordered]


def _random_samples(specs: list[TensorSpec], seed: int) -> Samples:
    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in specs:
        if np.dtype(spec.dtype).kind != "f":
            raise InputSpecError(f"input '{spec.name}' is {spec.dtype}: give --calib data, random "
                                 f"integers are not valid tokens")
        shape = [RANDOM_HELD_OUT] + [d if d > 0 else 16 for d in spec.shape[1:]]
        arrays[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return Samples(arrays, None, "random normal inputs")


def infer_task(specs: list[TensorSpec], reference: dict[str, np.ndarray]) -> str:
    """Token inputs -> embed; a 2-D output with several columns -> classify; else regress."""
    first = next(iter(reference.values()))
    if any(np.dtype(s.dtype).kind in "iu" for s in specs):
        return "embed"
    if first.ndim == 2 and first.shape[1] > 1:
        return "classify"
    return "regress"


def load_labelled(plan: BuildPlan, source: str, flag: str, specs: list[TensorSpec], task: str) -> Samples:
    """A data file fitted to the model's inputs; classifiers need its labels."""
    samples = load_samples(source, plan.data.image, tuple(specs[0].shape) if len(specs) == 1 else None)
    samples.conform(specs)
    if task == "classify" and samples.labels is None:
        raise CalibrationError(f"{flag} {source} has no 'labels' array")
    return samples


def prepare(plan: BuildPlan, say: Callable[[str], None]) -> Prepared:
    """Load the checkpoint, fit the data to the model's inputs, split calibration from held-out data
    and run the original FP32 model on the held-out data: the reference of every accuracy number."""
    source = plan.source
    loaded = load_checkpoint(source.checkpoint, source.arch, source.arch_kwargs, source.trust_checkpoint)
    say(f"loaded {loaded.format} checkpoint {source.checkpoint} (sha256 {loaded.sha256[:12]})")
    notes: list[str] = []
    samples = None
    if plan.data.calib:
        shape_hint = None
        if plan.data.input_shapes:
            shape_hint = parse_input_shapes(plan.data.input_shapes[:1], loaded.input_names)[0][1]
        samples = load_samples(plan.data.calib, plan.data.image, shape_hint)
    specs = _specs(plan, loaded, samples)
    if samples is not None:
        samples.conform(specs)
        max_held = min(plan.data.max_held_out, max(1, len(samples) - 1))
        calibration, held_out = samples.split(plan.data.held_out_fraction, plan.data.seed, max_held)
        if len(calibration) > plan.data.max_calib_samples:
            calibration = calibration.take(np.arange(plan.data.max_calib_samples))
    else:
        calibration, held_out = None, _random_samples(specs, plan.data.seed)
        notes.append("no --calib data: accuracy is measured on random inputs and INT8 cannot be calibrated")
    reference = run_reference(loaded.module, held_out, None)
    output_names = list(reference)
    if plan.task is not None and plan.task not in TASKS:
        raise InputSpecError(f"--task {plan.task!r} is not one of {', '.join(TASKS)}")
    task = plan.task or infer_task(specs, reference)
    prepared = Prepared(loaded, specs, output_names, task, plan.task is None, calibration,
                        held_out, reference, notes=notes, model_kind=model_kind(specs, loaded.module))
    if plan.data.eval_data:
        evaluation = load_labelled(plan, plan.data.eval_data, "--eval-data", specs, task)
        prepared.evaluation = evaluation
        prepared.eval_reference = run_reference(loaded.module, evaluation, output_names)
    return prepared


def evaluate(run: Callable[[Samples], dict[str, np.ndarray]], prepared: Prepared,
             max_drop: float | None) -> dict[str, Any]:
    """Accuracy of a model (``run(samples) -> outputs``) on the held-out and evaluation data, and the gate.

    Always against the original, unpruned FP32 model's outputs.
    """
    first = prepared.output_names[0]
    outputs = run(prepared.held_out)
    accuracy = {"held_out": validate.metrics(prepared.task, prepared.reference[first], outputs[first],
                                             prepared.held_out.labels)}
    baseline = None
    if prepared.evaluation is not None:
        outputs = run(prepared.evaluation)
        accuracy["eval"] = validate.metrics(prepared.task, prepared.eval_reference[first],
                                            outputs[first], prepared.evaluation.labels)
        baseline = validate.metrics(prepared.task, prepared.eval_reference[first],
                                    prepared.eval_reference[first], prepared.evaluation.labels)
        accuracy["eval_fp32_torch"] = baseline
    measured = accuracy.get("eval", accuracy["held_out"])
    verdict = validate.gate(prepared.task, measured, baseline, max_drop)
    return {"accuracy": accuracy, "gate": verdict.to_json()}


def evaluate_runner(runner: Any, prepared: Prepared, max_drop: float | None) -> dict[str, Any]:
    """``evaluate`` for an engine's ``Runner``."""
    return evaluate(lambda samples: runner.infer_all(samples.batches(32)), prepared, max_drop)


def evaluate_module(module: Any, prepared: Prepared, max_drop: float | None) -> dict[str, Any]:
    """``evaluate`` for a PyTorch module (the pruned model before and after recovery)."""
    return evaluate(lambda samples: run_reference(module, samples, prepared.output_names), prepared, max_drop)
