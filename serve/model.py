"""What the served model does: check a request's tensors against its inputs, run, describe itself.

The name is the manifest's model name (or ``--model-name``); the version is the bundle's short
hash, so two builds of the same model never answer as one. The target is the model's ``platform``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from optimize.specs import TensorSpec
from serve.protocol import DATATYPES, InferRequest, ProtocolError, datatype_of


def bundle_version(bundle: Path) -> str:
    """The first 12 hex digits of the manifest's hash: the bundle's identity."""
    return hashlib.sha256((Path(bundle) / "manifest.json").read_bytes()).hexdigest()[:12]


@dataclasses.dataclass
class ServedModel:
    name: str
    version: str
    target: str
    precision: str
    inputs: list[TensorSpec]
    outputs: list[dict[str, Any]]
    max_batch: int

    def check(self, request: InferRequest) -> dict[str, np.ndarray]:
        """The feeds for the engine, or a ``ProtocolError`` naming the input and what is wrong."""
        expected = {s.name: s for s in self.inputs}
        missing = [n for n in expected if n not in request.inputs]
        extra = [n for n in request.inputs if n not in expected]
        if missing:
            raise ProtocolError(f"missing input(s) {missing}; the model takes {list(expected)}")
        if extra:
            raise ProtocolError(f"unknown input(s) {extra}; the model takes {list(expected)}")
        feeds = {}
        for name, spec in expected.items():
            value = request.inputs[name]
            want = datatype_of(spec.dtype)
            if request.datatypes[name] != want:
                raise ProtocolError(f"input '{name}' is {request.datatypes[name]} but the model expects {want}")
            array = np.asarray(value)
            if array.ndim != len(spec.shape) or any(d not in (-1, got) for d, got in zip(spec.shape, array.shape)):
                raise ProtocolError(f"input '{name}' has shape {list(array.shape)} but the model expects "
                                    f"{list(spec.shape)} (-1: any size)")
            if array.shape[0] == 0:
                raise ProtocolError(f"input '{name}' has an empty batch")
            if array.shape[0] > self.max_batch:
                raise ProtocolError(f"input '{name}' has a batch of {array.shape[0]}; this server takes at most "
                                    f"{self.max_batch} rows per request")
            feeds[name] = np.ascontiguousarray(array, dtype=DATATYPES[want])
        rows = {a.shape[0] for a in feeds.values()}
        if len(rows) > 1:
            raise ProtocolError(f"inputs disagree on the batch size: {sorted(rows)}")
        return feeds

    def select_outputs(self, request: InferRequest, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if request.requested is None:
            return outputs
        unknown = [n for n in request.requested if n not in outputs]
        if unknown:
            raise ProtocolError(f"unknown output(s) {unknown}; the model gives {list(outputs)}")
        return {n: outputs[n] for n in request.requested}

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "versions": [self.version], "platform": self.target,
                "inputs": [{"name": s.name, "datatype": datatype_of(s.dtype), "shape": list(s.shape)}
                           for s in self.inputs],
                "outputs": [{"name": o["name"], "datatype": datatype_of(o["dtype"]), "shape": list(o["shape"])}
                            for o in self.outputs]}

    def config(self, batching: dict[str, Any]) -> dict[str, Any]:
        """The model configuration as Triton's tooling reads it (``/v2/models/{m}/config``)."""
        def dims(shape: list[int]) -> list[int]:
            return list(shape[1:])
        return {"name": self.name, "platform": self.target, "backend": self.target.split("-")[0],
                "max_batch_size": self.max_batch,
                "input": [{"name": s.name, "data_type": "TYPE_" + datatype_of(s.dtype), "dims": dims(list(s.shape))}
                          for s in self.inputs],
                "output": [{"name": o["name"], "data_type": "TYPE_" + datatype_of(o["dtype"]),
                            "dims": dims(list(o["shape"]))} for o in self.outputs],
                "dynamic_batching": {"max_queue_delay_microseconds": int(batching["max_delay_s"] * 1e6),
                                     "default_queue_policy": {"max_queue_size": batching["queue_capacity"]}},
                "instance_group": [{"count": batching["instances"], "kind": "KIND_CPU"}]}
