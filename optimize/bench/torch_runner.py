"""Torch eager FP32 as a ``Runner``: the baseline every target's speed is reported against.

It runs the bundle's ``program.pt2`` (the model after pruning, exported with ``torch.export``), so
the baseline needs neither the model's class nor a pickle.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from optimize.errors import BundleError
from optimize.inputs.specs import TensorSpec
from optimize.passes.onnx_export import output_tensors
from optimize.targets.base import Runner, RunnerConfig


class TorchProgramRunner(Runner):
    """``program.pt2`` in eager mode under ``torch.inference_mode`` with fixed intra-op threads."""

    def __init__(self, program_path: Path, inputs: list[TensorSpec], output_names: list[str],
                 config: RunnerConfig = RunnerConfig()):
        import torch

        if not Path(program_path).is_file():
            raise BundleError(f"{program_path} is missing: the torch-eager baseline needs the bundle's "
                              f"program.pt2 (TorchScript sources have none; use --no-torch)")
        threads = config.threads or max(1, (os.cpu_count() or 2))
        self._threads_before = torch.get_num_threads()  # the process's own setting, restored on close
        torch.set_num_threads(threads)
        self._module = torch.export.load(str(program_path)).module()
        self._threads = threads
        self.inputs = inputs
        self.outputs = [TensorSpec(n, (-1,), "float32") for n in output_names]
        self._names = output_names

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            result = self._module(*(torch.from_numpy(feeds[s.name]) for s in self.inputs))
        values = output_tensors(result)  # a dict or ModelOutput in its fields' order
        return {name: value.numpy() for name, value in zip(self._names, values)}

    def close(self) -> None:
        import torch

        torch.set_num_threads(self._threads_before)

    @property
    def settings(self) -> dict[str, Any]:
        import torch

        return {"backend": "torch", "mode": "eager (torch.export program)", "intra_op_threads": self._threads,
                "torch": torch.__version__}
