"""Preparing a build: the model, its input specs, the data split and the reference outputs."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from optimize.inputs.calibration import DataOrigin, ImageOptions, Samples, load_samples, match_arrays
from optimize.inputs.checkpoint import LoadedModel, load_checkpoint
from optimize.errors import CalibrationError, InputSpecError
from optimize.passes.onnx_export import torch_outputs
from optimize.passes.prune import HEAD_COUNT_ATTRS
from optimize.inputs.specs import TASKS, TensorSpec, dynamic_spec, parse_input_shapes
from optimize import validate
from optimize.build import fit

if TYPE_CHECKING:
    import torch
    from optimize.build.plan import DataConfig, SourceConfig

log = logging.getLogger(__name__)

RANDOM_HELD_OUT = 64
# The selection split: what recovery and INT8 candidates are chosen on, never the gate's held-out
# data (choosing on it would bias the gate). A tenth of the data, at most this many samples.
SELECTION_FRACTION = 0.1
MAX_SELECTION = 1000
MIN_SELECTION = 20


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
    warnings: list[str] = dataclasses.field(default_factory=list)  # results that are probably wrong
    max_length: tuple[int, str] | None = None  # token models with a tokenizer: (serving length, its source)
    long_held: Samples | None = None  # held-out token rows at the serving length, when beyond the data's
    long_reference: dict[str, np.ndarray] | None = None
    chance: validate.ChanceLevel | None = None
    train: Samples | None = None  # every sample neither held out nor selection: all of it for recovery
    selection: Samples | None = None  # chooses recovery's stopping point and INT8 candidates
    selection_reference: dict[str, np.ndarray] | None = None

    def gate_data(self) -> validate.GateData:
        """The splits every accuracy number is measured on. Where the data were too few for a
        selection split, candidates are chosen on the held-out data, and the split's name says so."""
        held = validate.Split(self.held_out, self.reference, "held-out data")
        if self.selection is not None and self.selection_reference is not None:
            selection = validate.Split(self.selection, self.selection_reference, "selection split")
        else:
            selection = validate.Split(self.held_out, self.reference,
                                       "held-out data (too few samples for a selection split)")
        labelled = (validate.Split(self.evaluation, self.eval_reference, "evaluation data")
                    if self.evaluation is not None and self.eval_reference is not None else None)
        long = (validate.Split(self.long_held, self.long_reference, f"held-out data at {self.max_length[0]} tokens")
                if self.long_held is not None and self.long_reference is not None and self.max_length else None)
        return validate.GateData(self.task, self.output_names[0], held, selection, labelled, long,
                                 self.max_length[0] if long is not None else None)


ATTENTION_OPS = ("matmul", "bmm", "scaled_dot_product_attention", "baddbmm")


def model_kind(specs: list[TensorSpec], module: torch.nn.Module) -> str:
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


def run_reference(module: torch.nn.Module, samples: Samples, output_names: list[str] | None,
                  batch_size: int = 64) -> dict[str, np.ndarray]:
    """The original FP32 model's outputs on ``samples``: what every accuracy number is against."""
    chunks = [torch_outputs(module, batch, output_names) for batch in samples.batches(batch_size)]
    return {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}


def _origin(data: DataConfig, source: str | None) -> DataOrigin:
    if source is None:
        return DataOrigin("--input-shape", "input-shape")
    kind = "images" if Path(source).is_dir() else "file"
    return DataOrigin(source, kind, data.image.grayscale)


def _specs(data: DataConfig, loaded: LoadedModel, samples: Samples | None, notes: list[str]) -> list[TensorSpec]:
    """The model's input specs from ``--input-shape`` or from the data, checked against ``forward``."""
    names = loaded.input_names
    required = fit.required_inputs(loaded.module, names)
    if data.input_shapes:
        parsed = parse_input_shapes(data.input_shapes, names)
        loaded.bind(list(match_arrays({n: s for n, s, _ in parsed}, names, required, _origin(data, None))))
        return [dynamic_spec(n, s, d, sequence=np.dtype(d).kind in "iu" and len(s) == 2)
                for n, s, d in parsed]
    if samples is None:
        raise InputSpecError("give --input-shape (e.g. 1x3x224x224) or --calib data so the model's "
                             "input shapes are known")
    origin = _origin(data, data.calib)
    if names:
        samples.arrays = match_arrays(samples.arrays, names, required, origin)
        loaded.bind(list(samples.arrays))
    model_dtype = fit.model_float_dtype(loaded.module)
    return [dynamic_spec(n, a.shape, fit.float_dtype_for(n, a, model_dtype, origin, notes),
                         sequence=a.dtype.kind in "iu" and a.ndim == 2)
            for n, a in samples.arrays.items()]


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


def _folder_task(loaded: LoadedModel, trial: dict[str, np.ndarray]) -> str | None:
    """``classify`` for a model folder whose first output has a column per label it names."""
    names = (loaded.folder or {}).get("labels")
    first = next(iter(trial.values()))
    return "classify" if names and first.ndim == 2 and first.shape[1] == len(names) else None


def _fitted(data: DataConfig, loaded: LoadedModel, samples: Samples, specs: list[TensorSpec], source: str | None,
            task: str | None, notes: list[str]) -> str:
    """Conform ``samples`` to ``specs``, run the model on its first rows, check its labels; return the
    task (``task``, or inferred from the trial outputs)."""
    origin = _origin(data, source)
    samples.conform(specs)
    image = data.image
    if origin.kind == "images" and image.grayscale and image.mean[:1] == ImageOptions.mean[:1] \
            and image.std[:1] == ImageOptions.std[:1] and not any(origin.where in n for n in notes):
        notes.append(f"grayscale images from {origin.where} are normalised with ImageNet's first-channel mean "
                     f"{image.mean[0]:g} and std {image.std[0]:g}: pass --mean/--std if the model was trained "
                     f"otherwise (--mean 0 --std 1 for [0, 1] pixels)")
    trial = fit.trial_forward(loaded.module, samples.arrays, origin)
    task = task or _folder_task(loaded, trial) or infer_task(specs, trial)
    names = (loaded.folder or {}).get("labels")
    if samples.labels is not None and samples.classes and names and set(samples.classes) <= set(names) \
            and samples.classes != names[:len(samples.classes)]:
        samples.labels = np.asarray([names.index(samples.classes[i]) for i in samples.labels])
        samples.classes = None
        notes.append(f"the class folders of {origin.where} are matched to the model's label names (config.json id2label)")
    if task == "classify" and samples.labels is not None:
        first = next(iter(trial.values()))
        classes = int(first.shape[-1]) if first.ndim == 2 else None
        samples.labels = fit.class_labels(samples.labels, classes, origin.where, notes)
    return task


def load_labelled(data: DataConfig, prepared: Prepared, source: str, flag: str) -> Samples:
    """A data file fitted to the model's inputs; classifiers need its labels."""
    specs = prepared.inputs
    samples = load_samples(source, data.image, tuple(specs[0].shape) if len(specs) == 1 else None)
    _fitted(data, prepared.loaded, samples, specs, source, prepared.task, prepared.notes)
    if prepared.task == "classify" and samples.labels is None:
        raise CalibrationError(f"{flag} {source} has no 'labels' array")
    return samples


def _preprocessing(data: DataConfig, source: str | None, samples: Samples) -> str:
    """What was done to the data before the model saw it, in words, for a warning."""
    if source and Path(source).is_dir():
        image = data.image
        size = "x".join(map(str, image.size)) if image.size else "the input shape"
        return (f"image folder read as {'grayscale' if image.grayscale else 'RGB'}, resized to {size}, scaled to "
                f"[0, 1], then mean {','.join(f'{m:g}' for m in image.mean)} and std "
                f"{','.join(f'{s:g}' for s in image.std)} (set --mean/--std to the training normalisation, "
                f"e.g. --mean 0 --std 1 for [0, 1] pixels)")
    ranges = ", ".join(f"'{k}' in [{v.min():.3g}, {v.max():.3g}]" for k, v in samples.arrays.items()
                       if v.dtype.kind == "f")
    return f"arrays fed as given ({ranges or 'integer inputs'})"


def _chance_check(data: DataConfig, prepared: Prepared, strict: bool) -> None:
    """Warn (or with --strict, stop) when the FP32 model itself scores at chance on labelled data."""
    if prepared.task != "classify":
        return
    if prepared.evaluation is not None and prepared.evaluation.labels is not None:
        samples, reference, source = prepared.evaluation, prepared.eval_reference, data.eval_data
    elif prepared.held_out.labels is not None:
        samples, reference, source = prepared.held_out, prepared.reference, data.calib
    else:
        return
    first = reference[prepared.output_names[0]]
    if first.ndim != 2:
        return
    level = validate.chance_level(first, samples.labels, str(source))
    prepared.chance = level
    if not level.at_chance:
        return
    message = (f"the FP32 model itself scores {level.accuracy_pct:.2f}% on the labelled data {source} "
               f"({level.samples} samples), within chance ({level.chance_pct:.1f}%, 95% bound "
               f"{level.bound_pct:.1f}%): is the data prepared as in training? In effect: "
               f"{_preprocessing(data, source, samples)}")
    if strict:
        raise CalibrationError(message + " (--strict)")
    prepared.warnings.append(message)
    log.warning(message)


def folder_data(source: SourceConfig, data: DataConfig) -> tuple[DataConfig, list[str]]:
    """What a Hugging Face model folder states that the flags left open: its image preprocessing
    (for an image folder given as --calib or --eval-data) and its tokenizer. With the notes saying so."""
    from optimize.inputs import hf_folder

    folder = Path(source.checkpoint)
    if not folder.is_dir():
        return data, []
    said = []
    images = [d for d in (data.calib, data.eval_data) if d and Path(d).is_dir()]
    if images:
        image, text = hf_folder.image_options(folder, data.image, frozenset(data.image.stated))
        if text:
            data = dataclasses.replace(data, image=image)
            said.append(text)
    if data.tokenizer is None and hf_folder.tokenizer_folder(folder) is not None:
        data = dataclasses.replace(data, tokenizer=str(folder))
        said.append(f"the tokenizer in {folder} is kept in the bundle (as --tokenizer {folder} would), so the server "
                    f"takes text")
    return data, said


def prepare(source: SourceConfig, data: DataConfig, task: str | None = None, strict: bool = False) -> Prepared:
    """Load the checkpoint, fit the data to the model's inputs, split calibration from held-out data
    and run the original FP32 model on the held-out data: the reference of every accuracy number.
    ``task`` (None: inferred); ``strict``: an FP32 model at chance on labelled data is an error."""
    loaded = load_checkpoint(source.checkpoint, source.arch, source.arch_kwargs, source.trust_checkpoint)
    log.info(f"loaded {loaded.format} checkpoint {source.checkpoint} (sha256 {loaded.sha256[:12]})")
    if task is not None and task not in TASKS:
        raise InputSpecError(f"--task {task!r} is not one of {', '.join(TASKS)}")
    notes: list[str] = []
    samples = None
    if data.calib:
        shape_hint = None
        if data.input_shapes:
            shape_hint = parse_input_shapes(data.input_shapes[:1], loaded.input_names)[0][1]
        samples = load_samples(data.calib, data.image, shape_hint)
    specs = _specs(data, loaded, samples, notes)
    if samples is not None:
        fitted_task = _fitted(data, loaded, samples, specs, data.calib, task, notes)
        max_held = min(data.max_held_out, max(1, len(samples) - 1))
        train, held_out = samples.split(data.held_out_fraction, data.seed, max_held)
        train, selection = _selection(train, len(samples), data.seed)
        calibration = train
        if len(calibration) > data.max_calib_samples:
            calibration = calibration.take(np.arange(data.max_calib_samples))
    else:
        calibration, held_out, train, selection = None, _random_samples(specs, data.seed), None, None
        fitted_task = _fitted(data, loaded, held_out, specs, None, task, notes)
        notes.append("no --calib data: accuracy is measured on random inputs and INT8 cannot be calibrated")
    reference = run_reference(loaded.module, held_out, None)
    prepared = Prepared(loaded, specs, list(reference), fitted_task, task is None, calibration,
                        held_out, reference, notes=notes, model_kind=model_kind(specs, loaded.module),
                        train=train, selection=selection)
    if selection is not None:
        prepared.selection_reference = run_reference(loaded.module, selection, prepared.output_names)
    if data.eval_data:
        prepared.evaluation = load_labelled(data, prepared, data.eval_data, "--eval-data")
        prepared.eval_reference = run_reference(loaded.module, prepared.evaluation, prepared.output_names)
    if data.tokenizer:
        _serving_length(data, prepared)
    for note in notes:
        log.info(f"note: {note}")
    _chance_check(data, prepared, strict)
    return prepared


def _selection(rest: Samples, total: int, seed: int) -> tuple[Samples, Samples | None]:
    """(the rest, the selection split): a tenth of all samples from what is not held out, when that
    leaves at least as many for calibration and recovery."""
    count = min(MAX_SELECTION, int(round(total * SELECTION_FRACTION)))
    if count < MIN_SELECTION or len(rest) - count < MIN_SELECTION:
        return rest, None
    train, selection = rest.split(count / len(rest), seed + 1)
    return train, Samples(selection.arrays, selection.labels, f"{rest.source} (selection split)")


def _serving_length(data: DataConfig, prepared: Prepared) -> None:
    """The longest text served; beyond the data's length the gate also checks engines there."""
    from optimize.inputs.tokenizer import long_samples, serving_length

    ids = prepared.held_out.arrays.get("input_ids")
    if ids is None:
        return
    length, source = serving_length(Path(data.tokenizer), prepared.loaded.module,
                                    data.max_sequence_length, int(ids.shape[1]))
    prepared.max_length = (length, source)
    if length > ids.shape[1]:
        prepared.long_held = Samples(long_samples(prepared.held_out.arrays, length), None, f"held-out at {length} tokens")
        prepared.long_reference = run_reference(prepared.loaded.module, prepared.long_held, prepared.output_names, 8)
    prepared.notes.append(f"texts are served up to {length} tokens ({source}); longer ones are cut and counted")
