"""Does the user's data fit the model? Checked before any stage runs.

Three checks, each ending in one line that names the input, what it is, what the model wants
where the model tells, and the likely fix:

- names and count (``optimize.inputs.calibration.match_arrays``: every required argument of ``forward`` has
  an array, no array is left over) and dtype (float data takes the model's parameter dtype, a wider float is cast
  with a note; integers are never fed to a float model or the reverse);
- ``trial_forward``: the model's own forward on two samples; a failure is explained from the first
  layer (a missing channel axis, channels-last data, one channel where three were given and the
  reverse, a feature count) instead of PyTorch's traceback;
- ``class_labels``: integer class indices below the class count; one-hot rows are accepted by argmax
  with a note; fractional, negative or out-of-range values are refused.

Bugs in our own code keep their tracebacks; what is raised here is about the user's data.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import TYPE_CHECKING

import numpy as np

from optimize.inputs.calibration import DataOrigin
from optimize.errors import CalibrationError

if TYPE_CHECKING:
    import torch

LAYER_RANK = {"Conv1d": 3, "Conv2d": 4, "Conv3d": 5}
TRIAL_ROWS = 2


class DataFitError(CalibrationError):
    """The data (or the shapes given) cannot be fed to the model as they are."""


@dataclasses.dataclass(frozen=True)
class FirstLayer:
    """The first weight layer registered in the model: what its first input most likely meets."""

    kind: str  # Conv1d | Conv2d | Conv3d | Linear | Embedding
    width: int  # in_channels, in_features or the vocabulary size

    @property
    def rank(self) -> int | None:
        return LAYER_RANK.get(self.kind)

    def wants(self) -> str:
        if self.rank:
            spatial = ", ".join("HWD"[i] if i < 2 else "D" for i in range(self.rank - 2))
            return f"(N, {self.width}, {spatial}) float from its first layer {self.kind}"
        if self.kind == "Linear":
            return f"(N, ..., {self.width}) float from its first layer Linear"
        return f"integer ids below {self.width} from its first layer Embedding"


def first_layer(module: torch.nn.Module) -> FirstLayer | None:
    for child in module.modules():
        kind = type(child).__name__
        if kind in LAYER_RANK and isinstance(getattr(child, "in_channels", None), int):
            return FirstLayer(kind, child.in_channels)
        if kind == "Linear" and isinstance(getattr(child, "in_features", None), int):
            return FirstLayer(kind, child.in_features)
        if kind == "Embedding" and isinstance(getattr(child, "num_embeddings", None), int):
            return FirstLayer(kind, child.num_embeddings)
    return None


def model_float_dtype(module: torch.nn.Module) -> str:
    """The dtype of the model's first floating parameter (``float32`` when it has none numpy can hold)."""
    for parameter in module.parameters():
        if parameter.is_floating_point():
            name = str(parameter.dtype).removeprefix("torch.")
            return name if name in ("float16", "float32", "float64") else "float32"
    return "float32"


def required_inputs(module: torch.nn.Module, names: list[str]) -> list[str]:
    """The forward arguments without a default: each needs data."""
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return list(names)
    return [n for n in names if n not in parameters or parameters[n].default is inspect.Parameter.empty]


def float_dtype_for(name: str, array: np.ndarray, model_dtype: str, origin: DataOrigin,
                    notes: list[str]) -> str:
    """The dtype ``array`` is fed as: the model's float dtype for float data (with a note when cast)."""
    if array.dtype.kind == "f":
        if array.dtype != np.dtype(model_dtype):
            notes.append(f"input '{name}' from {origin.where} is {array.dtype}: cast to {model_dtype}, the "
                         f"model's parameter dtype")
        return model_dtype
    if array.dtype.kind in "iub":
        return str(array.dtype)
    raise DataFitError(f"data {origin.where}: input '{name}' has dtype {array.dtype}; give float or integer arrays")


def trial_forward(module: torch.nn.Module, arrays: dict[str, np.ndarray], origin: DataOrigin) -> dict[str, np.ndarray]:
    """Run the model on the first rows; a failure becomes one line with the likely fix."""
    from optimize.passes.onnx_export import output_names_for, torch_outputs

    feeds = {k: np.ascontiguousarray(v[:TRIAL_ROWS]) for k, v in arrays.items()}
    try:
        return torch_outputs(module, feeds, output_names_for(64))
    except Exception as exc:  # the user's forward on the user's data: explained, --debug keeps the cause
        raise DataFitError(explain(exc, arrays, first_layer(module), origin)) from exc


def _first_line(exc: BaseException, limit: int = 160) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # TorchScript wraps the error in its own traceback: the last line names it.
    text = next((ln for ln in reversed(lines) if re.match(r"^\w*(Error|Exception):", ln)), lines[0] if lines else "")
    text = re.sub(r"^\w*(Error|Exception):\s*", "", text) or type(exc).__name__
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " ..."
    return text


def _describe(name: str, array: np.ndarray) -> str:
    dims = ("N", *map(str, array.shape[1:]))
    return f"input '{name}' ({', '.join(dims)}) {array.dtype}"


def explain(exc: BaseException, arrays: dict[str, np.ndarray], layer: FirstLayer | None,
            origin: DataOrigin) -> str:
    """One line: which input, what it is, what the model wants, what to change."""
    message = _first_line(exc)
    where = ", ".join(_describe(n, a) for n, a in arrays.items()) + f" from {origin.where}"
    fix = _likely_fix(message, arrays, layer, origin)
    wants = f"; the model wants {layer.wants()}" if layer is not None and len(arrays) == 1 else ""
    return f"the model's forward fails on {where}{wants}: {message}" + (f". Likely fix: {fix}" if fix else "")


def _likely_fix(message: str, arrays: dict[str, np.ndarray], layer: FirstLayer | None,
                origin: DataOrigin) -> str | None:
    name, array = next(iter(arrays.items()))
    lower = message.lower()
    if "scalar type" in lower or "indices" in lower or "dtype" in lower:
        if array.dtype.kind == "f":
            return f"input '{name}' is {array.dtype} but the model takes integer ids: give int64 token ids"
        return (f"input '{name}' is {array.dtype} but the model computes in floats: give float data "
                f"(e.g. pixels scaled to [0, 1]), not integers")
    if "cannot be multiplied" in lower:
        shapes = re.findall(r"\((\d+)x(\d+) and (\d+)x(\d+)\)", message)
        if shapes:
            _, got, want, _ = shapes[0]
            return (f"a Linear layer wants {want} features and got {got}: check the last axis of each input"
                    + (f" ('{name}' has {array.shape[-1]})" if len(arrays) == 1 else ""))
    if layer is None or layer.rank is None:
        return None
    channels, rank = layer.width, layer.rank
    if array.ndim == rank - 1:
        return f"the channel axis is missing: give (N, {channels}, ...) data, e.g. x[:, None] for one channel"
    if array.ndim != rank:
        return f"{layer.kind} takes rank-{rank} batches (N, C, ...); input '{name}' has rank {array.ndim}"
    if array.shape[1] == channels:
        return None
    if array.shape[-1] == channels:
        return f"the data looks channels-last (N, ..., {channels}): transpose it to channels-first (N, {channels}, ...)"
    if origin.kind == "images":
        if channels == 1 and not origin.grayscale:
            return "the model takes one channel: pass --grayscale"
        if channels == 3 and origin.grayscale:
            return "the model takes three channels: drop --grayscale"
    if origin.kind == "input-shape":
        shape = "x".join(str(d) for d in (1, channels, *array.shape[2:]))
        return f"the model takes {channels} channel(s): --input-shape {shape}"
    return f"the model takes {channels} channel(s) on axis 1 and the data has {array.shape[1]}"


def class_labels(labels: np.ndarray, classes: int | None, where: str, notes: list[str]) -> np.ndarray:
    """Labels as int64 class indices; one-hot rows are converted (with a note), anything else refused."""
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iubf":
        raise DataFitError(f"labels in {where} have dtype {labels.dtype}; give integer class indices")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim == 2:
        if classes is not None and labels.shape[1] != classes:
            raise DataFitError(f"labels in {where} have {labels.shape[1]} columns but the model has {classes} "
                               f"classes: give class indices, or one-hot rows of {classes}")
        onehot = np.isin(labels, (0, 1)).all() and (labels.sum(1) == 1).all()
        if not onehot:
            raise DataFitError(f"labels in {where} are {labels.shape} rows that are not one-hot (soft or "
                               f"multi-label targets): give one integer class index per sample")
        notes.append(f"labels in {where} are one-hot: taken as class indices (argmax)")
        return labels.argmax(1).astype(np.int64)
    if labels.ndim != 1:
        raise DataFitError(f"labels in {where} have shape {labels.shape}; give one class index per sample")
    if labels.dtype.kind == "f":
        if not np.isfinite(labels).all() or (labels != np.round(labels)).any():
            bad = labels[~np.isfinite(labels) | (labels != np.round(labels))][0]
            raise DataFitError(f"labels in {where} hold fractional values (e.g. {bad:g}): classification labels "
                               f"are integer class indices; for a regression model pass --task regress")
    if labels.dtype.kind == "b":
        labels = labels.astype(np.int64)
    if len(labels) and labels.min() < 0:
        raise DataFitError(f"labels in {where} hold negative values (min {labels.min():g}): class indices start "
                           f"at 0 (an ignore-index such as -100 is not a label)")
    if classes is not None and len(labels) and labels.max() >= classes:
        raise DataFitError(f"labels in {where} go up to {labels.max():g} but the model has {classes} outputs "
                           f"(classes 0..{classes - 1}): are the labels 1-based, or is this another model's data?")
    return labels.astype(np.int64)
