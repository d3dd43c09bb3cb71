"""The Open Inference Protocol (KServe v2) on the wire: decoding requests, encoding responses.

JSON tensors carry ``data`` as a flat (or nested) list in row-major order. The binary tensor
extension puts a JSON header of ``Inference-Header-Content-Length`` bytes first, then the raw
little-endian bytes of every input whose ``parameters.binary_data_size`` says so, in input order;
outputs come back the same way when asked (``binary_data`` per output or ``binary_data_output``).
Every mistake is a ``ProtocolError`` with a 4xx status and a message naming the tensor.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np

from optimize.inputs.specs import OIP_DATATYPES, oip_datatype

HEADER_LENGTH = "inference-header-content-length"
MAX_DIMENSION = 1 << 31  # no tensor is this long; beyond it numpy's shapes overflow
DATATYPES = {name: np.dtype(numpy) for name, numpy in OIP_DATATYPES.items()}


class ProtocolError(Exception):
    """A malformed request: ``status`` is the 4xx (or 503) to answer with, ``headers`` any that
    answer needs (``Allow`` on a 405)."""

    def __init__(self, message: str, status: int = 400, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


@dataclasses.dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray | list[str]]
    datatypes: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    binary_outputs: dict[str, bool]
    binary_default: bool
    requested: list[str] | None
    truncated: int = 0  # texts cut at the model's serving length (reported in the response's parameters)
    classification: dict[str, int] = dataclasses.field(default_factory=dict)  # output -> top k (the extension)
    non_finite: int = 0  # samples whose inputs hold NaN or an infinity


datatype_of = oip_datatype


def _json(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a JSON object")
    return value


def _parameters(owner: Any, what: str) -> dict[str, Any]:
    value = owner.get("parameters", {}) if isinstance(owner, dict) else {}
    if not isinstance(value, dict):
        raise ProtocolError(f"{what}: 'parameters' must be an object")
    return value


def _flag(parameters: dict[str, Any], key: str, what: str) -> bool:
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise ProtocolError(f"{what}: parameters.{key} must be true or false, not {value!r}")
    return value


def _shape(tensor: dict[str, Any], name: str) -> tuple[int, ...]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ProtocolError(f"input '{name}': 'shape' must be a list of non-negative integers")
    if any(d > MAX_DIMENSION for d in shape):
        raise ProtocolError(f"input '{name}': shape {shape} has a dimension above {MAX_DIMENSION}")
    return tuple(shape)


def _bytes_elements(buffer: memoryview, count: int, name: str) -> list[str]:
    """BYTES in binary form: each element is a 4-byte little-endian length, then that many bytes."""
    items, offset = [], 0
    while offset < len(buffer):
        if offset + 4 > len(buffer):
            raise ProtocolError(f"input '{name}': BYTES data is truncated")
        size = int.from_bytes(buffer[offset:offset + 4], "little")
        offset += 4
        if offset + size > len(buffer):
            raise ProtocolError(f"input '{name}': BYTES data is truncated")
        items.append(bytes(buffer[offset:offset + size]).decode("utf-8", errors="replace"))
        offset += size
    if len(items) != count:
        raise ProtocolError(f"input '{name}': {len(items)} BYTES elements but the shape holds {count}")
    return items


def encode_bytes(items: list[Any]) -> bytes:
    """BYTES elements in binary form (the inverse of ``_bytes_elements``)."""
    parts = []
    for item in items:
        raw = item if isinstance(item, bytes) else str(item).encode()
        parts += [len(raw).to_bytes(4, "little"), raw]
    return b"".join(parts)


def decode_tensor(tensor: Any, binary: memoryview | None) -> tuple[str, str, tuple[int, ...], Any]:
    """One input: its name, datatype, shape and value (an array, or a list of strings for BYTES),
    from JSON ``data`` or from its binary bytes; a ``ProtocolError`` naming it when they disagree."""
    if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
        raise ProtocolError("every entry of 'inputs' must be an object with a 'name'")
    name = tensor["name"]
    datatype = tensor.get("datatype")
    if not isinstance(datatype, str) or (datatype != "BYTES" and datatype not in DATATYPES):
        raise ProtocolError(f"input '{name}': unknown datatype {datatype!r}; one of BOOL, INT8-64, "
                            f"UINT8-64, FP16, FP32, FP64, BYTES")
    shape = _shape(tensor, name)
    count = math.prod(shape)  # Python integers: a huge shape must not wrap around to a small count
    if binary is not None:
        if datatype == "BYTES":
            return name, datatype, shape, _bytes_elements(binary, count, name)
        dtype = np.dtype(DATATYPES[datatype]).newbyteorder("<")
        if len(binary) != count * dtype.itemsize:
            raise ProtocolError(f"input '{name}': {len(binary)} bytes of binary data but shape {list(shape)} "
                                f"of {datatype} needs {count * dtype.itemsize}")
        return name, datatype, shape, np.frombuffer(binary, dtype=dtype).reshape(shape)
    if "data" not in tensor:
        raise ProtocolError(f"input '{name}' has neither 'data' nor binary_data_size")
    data = tensor["data"]
    if datatype == "BYTES":
        flat = np.asarray(data, dtype=object).reshape(-1).tolist() if isinstance(data, list) else [data]
        if len(flat) != count or not all(isinstance(x, str) for x in flat):
            raise ProtocolError(f"input '{name}': BYTES data must be {count} strings for shape {list(shape)}")
        return name, datatype, shape, flat
    try:
        array = np.asarray(data, dtype=DATATYPES[datatype])
    except (TypeError, ValueError, OverflowError):
        raise ProtocolError(f"input '{name}': 'data' is not a list of {datatype} numbers") from None
    if array.size != count:
        raise ProtocolError(f"input '{name}': 'data' has {array.size} elements but shape {list(shape)} "
                            f"needs {count}")
    return name, datatype, shape, array.reshape(shape)


def decode_request(body: bytes, header_length: str | None) -> InferRequest:
    """Parse a JSON or binary-extension infer request body."""
    if header_length is not None:
        try:
            split = int(header_length)
        except ValueError:
            raise ProtocolError(f"Inference-Header-Content-Length {header_length!r} is not an integer") from None
        if not 0 < split <= len(body):
            raise ProtocolError(f"Inference-Header-Content-Length {split} is outside the body of {len(body)} bytes")
        header, rest = _json(body[:split], "the inference header"), memoryview(body)[split:]
    else:
        header, rest = _json(body, "the request body"), memoryview(b"")
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError("the request needs a non-empty 'inputs' list")
    decoded: dict[str, Any] = {}
    datatypes: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    offset = 0
    for tensor in inputs:
        size = _parameters(tensor, f"input '{tensor.get('name')}'" if isinstance(tensor, dict) else "input")\
            .get("binary_data_size")
        chunk = None
        if size is not None:
            if not isinstance(size, int) or size < 0:
                raise ProtocolError(f"input '{tensor.get('name')}': binary_data_size must be a non-negative integer")
            if offset + size > len(rest):
                raise ProtocolError(f"input '{tensor.get('name')}': binary data is truncated ({len(rest) - offset} "
                                    f"bytes left, binary_data_size {size})")
            chunk = rest[offset:offset + size]  # a view: the arrays share the body's memory
            offset += size
        name, datatype, shape, value = decode_tensor(tensor, chunk)
        if name in decoded:
            raise ProtocolError(f"input '{name}' is given twice")
        decoded[name], datatypes[name], shapes[name] = value, datatype, shape
    if offset != len(rest):
        raise ProtocolError(f"{len(rest) - offset} bytes after the last binary input are not claimed by any "
                            f"binary_data_size")
    parameters = _parameters(header, "the request")
    outputs = header.get("outputs")
    requested, binary = None, {}
    if "outputs" in header:
        if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs):
            raise ProtocolError("'outputs' must be a list of objects with a 'name'")
        requested = [o["name"] for o in outputs] or None  # an empty list asks for every output, as none does
        binary = {o["name"]: _flag(_parameters(o, f"output '{o['name']}'"), "binary_data", f"output '{o['name']}'")
                  for o in outputs}
        given = {o["name"]: _parameters(o, f"output '{o['name']}'") for o in outputs}
        classification = {name: classification_count(p["classification"], name) for name, p in given.items()
                          if "classification" in p}
    else:
        classification = {}
    request_id = header.get("id")
    if "id" in header and not isinstance(request_id, str):
        raise ProtocolError(f"'id' must be a string, not {request_id!r}")
    return InferRequest(request_id, decoded, datatypes, shapes, binary,
                        _flag(parameters, "binary_data_output", "the request"), requested,
                        classification=classification)


def classification_count(value: Any, name: str) -> int:
    """The ``classification`` parameter of a requested output: how many top classes to return."""
    if isinstance(value, float) and value.is_integer():  # JSON's 3.0 is the integer 3
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ProtocolError(f"output '{name}': parameters.classification must be a positive integer (the number "
                            f"of top classes to return), not {value!r}")
    return value


def classify(array: np.ndarray, count: int, labels: list[str] | None) -> np.ndarray:
    """The classification extension's answer for one output: per row, its ``count`` highest values,
    highest first, each as the string ``value:index`` or ``value:index:label`` (BYTES, [batch, count])."""
    order = np.argsort(-array, axis=1, kind="stable")[:, :count]
    rows = [[f"{array[r, i]:f}:{i}" + (f":{labels[i]}" if labels else "") for i in order[r]]
            for r in range(array.shape[0])]
    return np.asarray(rows, dtype=object).reshape(array.shape[0], count)


def json_values(array: np.ndarray) -> tuple[list, int]:
    """A tensor's values for a JSON body, and how many were not finite. Strict JSON has no NaN or
    infinity (JavaScript's and Go's parsers reject Python's ``NaN`` literal), so each is ``null``
    and the output's ``parameters.non_finite`` counts them; binary outputs carry them exactly."""
    flat = array.reshape(-1)
    if flat.dtype.kind != "f":
        return flat.tolist(), 0
    bad = ~np.isfinite(flat)
    if not bad.any():
        return flat.tolist(), 0
    values = flat.astype(object)
    values[bad] = None
    return values.tolist(), int(bad.sum())


def encode_response(model: str, version: str, request: InferRequest,
                    outputs: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    """The response body and extra headers (the header length when any output is binary)."""
    entries, chunks = [], []
    for name, array in outputs.items():
        text = array.dtype == object  # BYTES: the classification extension's strings
        entry: dict[str, Any] = {"name": name, "datatype": "BYTES" if text else datatype_of(array.dtype),
                                 "shape": list(array.shape)}
        if request.binary_outputs.get(name, request.binary_default):
            raw = (encode_bytes(array.reshape(-1).tolist()) if text
                   else np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes())
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"], missing = json_values(array)
            if missing:
                entry["parameters"] = {"non_finite": missing}
        entries.append(entry)
    response: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": entries}
    if request.truncated:
        response["parameters"] = {"text_truncated": request.truncated}
    if request.id is not None:
        response["id"] = request.id
    header = json.dumps(response, separators=(",", ":"), allow_nan=False).encode()
    if not chunks:
        return header, {}
    return header + b"".join(chunks), {"Inference-Header-Content-Length": str(len(header))}
