"""What the served model does: check a request's tensors against its inputs, run, describe itself.

The name is the manifest's model name (or ``--model-name``). The version is a canonical decimal
integer, as Triton's are (folder names of a model repository; its tools parse them as integers):
the build's UTC time and the target's place in the bundle (``version_number``), so a later build
is a larger version and two targets of one build differ. The content hash of what answers requests
(``content_hash``) is kept beside it: in the model's config parameters, the ``model_info`` metric,
and as an alias in versioned routes. The target is the model's ``platform``.
A token model built with a tokenizer takes one BYTES input (``text``, shape [-1, 1]: one string
per row) and tokenizes it here; its token inputs are still accepted as they are.
Samples whose float inputs hold NaN or an infinity are counted on the request (``non_finite``) and
answered like any other (a load generator's random bytes hold them), unless the server refuses them
(``reject_non_finite``: a 400 naming the input, its count and the first row).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, TYPE_CHECKING

import numpy as np

from optimize.drift.features import non_finite_rows
from optimize.inputs.specs import TensorSpec
from optimize.deploy.triton import model_config
from serve.protocol import DATATYPES, InferRequest, ProtocolError, classify, datatype_of

if TYPE_CHECKING:
    from optimize.bundle.manifest import Manifest


def content_hash(bundle: Path, manifest: Manifest, target: str) -> str:
    """The first 12 hex digits of a hash of what answers requests: the target, its engine files, the
    engine settings, the inputs and outputs, the tokenizer. Benchmark results, a new winner elsewhere
    or a rewritten manifest leave it alone; a rebuilt engine moves it."""
    bundle = Path(bundle)
    record = manifest.record(target, bundle)
    digest = hashlib.sha256()
    served = {"target": target, "precision": record.precision, "runner_config": manifest.runner_config.to_json(),
              "inputs": [s.to_json() for s in manifest.inputs], "outputs": manifest.outputs, "text": manifest.text}
    digest.update(json.dumps(served, sort_keys=True, default=str).encode())
    files = [bundle / record.folder / f for f in (record.files or [])]
    if manifest.text:
        files.append(bundle / manifest.text["tokenizer"])
    files += [bundle / o["labels"] for o in manifest.outputs if o.get("labels")]
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:12]


@dataclasses.dataclass
class ServedModel:
    name: str
    version: str
    target: str
    precision: str
    inputs: list[TensorSpec]
    outputs: list[dict[str, Any]]
    max_batch: int
    text: Any = None  # optimize.inputs.tokenizer.TextEncoder for a token model built with a tokenizer
    labels: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # output -> its class names
    content_hash: str = ""  # what answers requests (``content_hash``): an alias of the version in routes
    reject_non_finite: bool = False  # a NaN or infinity in an input is a 400, not answered and counted

    def signatures(self) -> list[list[dict[str, Any]]]:
        """The input sets this server accepts, each a list of {name, datatype, shape (-1: any)}.

        The one table both the request check below and the OpenAPI description are made from.
        The first is what the metadata lists; a text model also takes its token inputs as they are.
        """
        tokens = [{"name": s.name, "datatype": datatype_of(s.dtype), "shape": list(s.shape)} for s in self.inputs]
        if self.text is None:
            return [tokens]
        return [[{"name": self.text.input, "datatype": "BYTES", "shape": [-1, 1]}], tokens]

    def check(self, request: InferRequest) -> dict[str, np.ndarray]:
        """The feeds for the engine, or a ``ProtocolError`` naming the input and what is wrong."""
        given = set(request.inputs)
        signatures = self.signatures()
        signature = max(signatures, key=lambda sig: len(given & {i["name"] for i in sig}))
        expected = [i["name"] for i in signature]
        takes = " or ".join(str([i["name"] for i in sig]) for sig in signatures)
        missing = [n for n in expected if n not in given]
        extra = [n for n in request.inputs if n not in expected]
        if missing:
            raise ProtocolError(f"missing input(s) {missing}; the model takes {takes}")
        if extra:
            raise ProtocolError(f"unknown input(s) {extra}; the model takes {takes}")
        rows = set()
        for rule in signature:
            name, want, shape = rule["name"], rule["datatype"], request.shapes[rule["name"]]
            if request.datatypes[name] != want:
                raise ProtocolError(f"input '{name}' is {request.datatypes[name]} but the model expects {want}")
            if len(shape) != len(rule["shape"]) or any(d not in (-1, got) for d, got in zip(rule["shape"], shape)):
                raise ProtocolError(f"input '{name}' has shape {list(shape)} but the model expects "
                                    f"{rule['shape']} (-1: any size)")
            if shape[0] == 0:
                raise ProtocolError(f"input '{name}' has an empty batch")
            if shape[0] > self.max_batch:
                raise ProtocolError(f"input '{name}' has a batch of {shape[0]}; this server takes at most "
                                    f"{self.max_batch} rows per request")
            rows.add(shape[0])
        if len(rows) > 1:
            raise ProtocolError(f"inputs disagree on the batch size: {sorted(rows)}")
        self._check_classification(request)
        if signature[0]["datatype"] == "BYTES":
            feeds, request.truncated = self.text.encode_counted(request.inputs[self.text.input])
            return feeds
        feeds = {n: np.ascontiguousarray(request.inputs[n], dtype=DATATYPES[r["datatype"]])
                 for n, r in ((r["name"], r) for r in signature)}
        self._count_non_finite(request, feeds)
        return feeds

    def _count_non_finite(self, request: InferRequest, feeds: dict[str, np.ndarray]) -> None:
        """``request.non_finite``: samples holding a NaN or an infinity; a 400 when they are refused."""
        flagged = {name: rows for name, rows in ((n, non_finite_rows(a)) for n, a in feeds.items()) if rows.any()}
        if not flagged:
            return
        request.non_finite = int(np.logical_or.reduce(list(flagged.values())).sum())
        if self.reject_non_finite:
            name, rows = next(iter(flagged.items()))
            values = int(np.count_nonzero(~np.isfinite(feeds[name])))
            raise ProtocolError(f"input '{name}' holds {values} NaN or infinite value(s), first in row "
                                f"{int(rows.argmax())}; this server refuses them (--reject-non-finite)")

    def _check_classification(self, request: InferRequest) -> None:
        """Triton's classification extension asks for the top k of an output of class scores."""
        shapes = {o["name"]: o["shape"] for o in self.outputs}
        for name, count in request.classification.items():
            shape = shapes.get(name)
            if shape is None:
                continue  # an unknown output is answered as such
            if len(shape) != 2 or shape[1] < 1:
                raise ProtocolError(f"output '{name}' has shape {shape}: classification needs one row of class "
                                    f"scores per input [batch, classes]")
            if count > shape[1]:
                raise ProtocolError(f"output '{name}': classification {count} asks for more classes than the "
                                    f"{shape[1]} it has")

    def select_outputs(self, request: InferRequest, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if request.requested is not None:
            unknown = [n for n in request.requested if n not in outputs]
            if unknown:
                raise ProtocolError(f"unknown output(s) {unknown}; the model gives {list(outputs)}")
            outputs = {n: outputs[n] for n in request.requested}
        return {n: classify(a, request.classification[n], self.labels.get(n)) if n in request.classification else a
                for n, a in outputs.items()}

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "versions": [self.version], "platform": self.target,
                "inputs": self.signatures()[0],
                "outputs": [{"name": o["name"], "datatype": datatype_of(o["dtype"]), "shape": list(o["shape"])}
                            for o in self.outputs]}

    def config(self, batching: dict[str, Any]) -> dict[str, Any]:
        """The model configuration as Triton's tooling reads it (``/v2/models/{m}/config``): the same
        generator ``optimize export triton`` writes ``config.pbtxt`` from, for what this server takes."""
        outputs = [{"name": o["name"], "datatype": datatype_of(o["dtype"]), "shape": list(o["shape"]),
                    **({"label_filename": Path(o["labels"]).name} if o.get("labels") else {})} for o in self.outputs]
        return model_config(self.name, self.target, self.max_batch, self.signatures()[0], outputs,
                            batching["max_delay_s"], batching["queue_capacity"], batching["instances"], strict=False,
                            parameters={"content_hash": self.content_hash} if self.content_hash else None)


def output_labels(bundle: Path, manifest: Manifest) -> dict[str, list[str]]:
    """Each output's class names from the labels file the build wrote beside it (``labels.txt``)."""
    found = {}
    for output in manifest.outputs:
        if output.get("labels"):
            names = (Path(bundle) / output["labels"]).read_text().splitlines()
            if len(names) == output["shape"][-1]:
                found[output["name"]] = names
    return found
