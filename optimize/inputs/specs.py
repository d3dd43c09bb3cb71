"""What a model takes and gives: tensor names, shapes (with -1 for dynamic axes) and dtypes."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from optimize.errors import InputSpecError

DTYPES = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")
TASKS = ("classify", "embed", "regress")

# A dynamic axis is written -1 in shapes; its symbolic name is recorded beside it.
BATCH_AXIS = "batch"
SEQUENCE_AXIS = "sequence"


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, shape with -1 where an axis is dynamic, dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    axis_names: tuple[str | None, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                "axis_names": list(self.axis_names)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TensorSpec":
        return cls(data["name"], tuple(data["shape"]), data["dtype"],
                   tuple(data.get("axis_names") or ()))

    def describe(self) -> str:
        dims = ["N" if d == -1 and i == 0 else ("S" if d == -1 else str(d))
                for i, d in enumerate(self.shape)]
        return f"({', '.join(dims)}) {self.dtype}"

    def check(self, array: np.ndarray, where: str) -> None:
        """Raise InputSpecError when ``array`` cannot be fed as this input."""
        if array.ndim != len(self.shape):
            raise InputSpecError(
                f"{where}: input '{self.name}' has shape {tuple(array.shape)} but the model "
                f"expects {self.describe()}")
        for axis, (have, want) in enumerate(zip(array.shape, self.shape)):
            if want != -1 and have != want:
                raise InputSpecError(
                    f"{where}: input '{self.name}' has shape {tuple(array.shape)} but the model "
                    f"expects {self.describe()} (axis {axis} must be {want})")
        if np.dtype(array.dtype) != np.dtype(self.dtype) and not _castable(array.dtype, self.dtype):
            raise InputSpecError(
                f"{where}: input '{self.name}' has dtype {array.dtype} but the model expects "
                f"{self.dtype}")


def _castable(have: np.dtype, want: str) -> bool:
    have, want_dt = np.dtype(have), np.dtype(want)
    # Floats convert among themselves and integers among themselves; never across.
    return (have.kind == want_dt.kind) or (have.kind in "iu" and want_dt.kind in "iu")


def dynamic_spec(name: str, example_shape: tuple[int, ...], dtype: str,
                 sequence: bool) -> TensorSpec:
    """Batch axis dynamic always; axis 1 dynamic too for token inputs (the sequence axis)."""
    shape = list(example_shape)
    names: list[str | None] = [None] * len(shape)
    shape[0], names[0] = -1, BATCH_AXIS
    if sequence and len(shape) >= 2:
        shape[1], names[1] = -1, SEQUENCE_AXIS
    return TensorSpec(name, tuple(shape), dtype, tuple(names))


_SHAPE = re.compile(r"^\d+(x\d+)*$")


def parse_input_shapes(values: tuple[str, ...], forward_names: list[str]) -> list[tuple[str, tuple[int, ...], str]]:
    """Parse ``--input-shape`` values into (name, example shape, dtype).

    Accepted: ``1x3x224x224`` (one input, named after the model's forward argument) or
    ``name:1x3x224x224[:dtype]`` (repeat the flag for several inputs). The first dimension is
    the batch and is made dynamic.
    """
    parsed = []
    for i, value in enumerate(values):
        parts = value.split(":")
        if len(parts) == 1:
            if len(values) > 1:
                raise InputSpecError(
                    f"--input-shape {value!r}: with several inputs, name each one as "
                    f"name:1x3x224x224:float32")
            name = forward_names[0] if forward_names else "input"
            shape_text, dtype = parts[0], "float32"
        elif len(parts) in (2, 3):
            name, shape_text = parts[0], parts[1]
            dtype = parts[2] if len(parts) == 3 else "float32"
        else:
            raise InputSpecError(
                f"--input-shape {value!r} is not SHAPE or NAME:SHAPE[:DTYPE], e.g. 1x3x224x224 "
                f"or pixels:1x3x224x224:float32")
        if not _SHAPE.match(shape_text):
            raise InputSpecError(
                f"--input-shape {value!r}: shape must be dimensions joined by 'x', batch first, "
                f"e.g. 1x3x224x224")
        if dtype not in DTYPES:
            raise InputSpecError(
                f"--input-shape {value!r}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        shape = tuple(int(d) for d in shape_text.split("x"))
        if any(d <= 0 for d in shape):
            raise InputSpecError(f"--input-shape {value!r}: every dimension must be positive")
        if forward_names and name not in forward_names and len(parts) > 1:
            raise InputSpecError(
                f"--input-shape {value!r}: the model has no input {name!r}; its inputs are "
                f"{', '.join(forward_names)}")
        parsed.append((name, shape, dtype))
    return parsed


# Open Inference Protocol (KServe v2) datatype names, shared by the server and the bench client.
OIP_DATATYPES = {"BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
                 "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
                 "FP16": "float16", "FP32": "float32", "FP64": "float64"}
_NUMPY_TO_OIP = {np.dtype(v).str: k for k, v in OIP_DATATYPES.items()}


def oip_datatype(dtype: Any) -> str:
    """The protocol's name for a numpy dtype (``float32`` -> ``FP32``)."""
    text = np.dtype(dtype).str
    if text not in _NUMPY_TO_OIP:
        raise ValueError(f"no Open Inference Protocol datatype for {dtype}")
    return _NUMPY_TO_OIP[text]
