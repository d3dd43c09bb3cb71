"""The calibration contract adapted to ONNX Runtime's quantizer: one reader, one method table.

Both the ``ort-int8`` static quantizer and the Q/DQ graph TensorRT builds from take activation
ranges from ONNX Runtime's calibrators, fed by ``Samples.batches()``.
"""

from __future__ import annotations

from typing import Any

from optimize.quiet import on_terminal
from optimize.inputs.calibration import Samples


def calibration_method(name: str) -> Any:
    """ONNX Runtime's ``CalibrationMethod`` for one of ``optimize.targets.base.CALIBRATION_METHODS``."""
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


def whole_batches(samples: Samples, batch_size: int) -> Samples:
    """``samples`` without the ragged last batch: ONNX Runtime's histogram calibrators (entropy,
    percentile) stack every batch's tensors into one array and fail on a shorter last one."""
    import numpy as np

    keep = len(samples) // batch_size * batch_size
    return samples if keep in (0, len(samples)) else samples.take(np.arange(keep))


def calibration_reader(samples: Samples, batch_size: int, progress: str | None = None) -> Any:
    """A ``CalibrationDataReader`` over ``samples`` in batches; ``progress`` labels a progress bar."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            batches = samples.batches(batch_size)
            if progress:
                from tqdm import tqdm

                total = (len(samples) + batch_size - 1) // batch_size
                batches = tqdm(batches, total=total, desc=progress, unit="batch", leave=False, disable=not on_terminal())
            self._it = iter(batches)

        def get_next(self):
            return next(self._it, None)

    return Reader()
