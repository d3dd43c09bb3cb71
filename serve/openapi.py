"""The OpenAPI 3.1 description of what this server serves, at ``GET /openapi.json``.

Made from ``ServedModel.signatures()``, the same table the request check uses: the input names,
datatypes and shapes (batch from 1 to the server's max batch, fixed axes as constants) are JSON
Schema here and Python checks there, so the two cannot disagree on what a valid request is.

``data`` must hold as many elements as the shape says. Where every axis but the batch is fixed
(images, tables), the schema states it: one variant per batch size up to the server's max batch,
each with its exact shape and element count. Where another axis varies too (token sequences),
JSON Schema cannot relate the two, and the description says it. The JSON body is the schema's
subject; the binary extension's byte counts are described on the route and checked by the server.
"""

from __future__ import annotations

from typing import Any

import math

import numpy as np

from serve.model import ServedModel
from serve.protocol import DATATYPES, datatype_of

JSON_TYPES = {"BOOL": {"type": "boolean"}, "BYTES": {"type": "string"}, "FP16": {"type": "number"},
              "FP32": {"type": "number"}, "FP64": {"type": "number"}}


def _element(datatype: str) -> dict[str, Any]:
    if datatype in JSON_TYPES:
        return JSON_TYPES[datatype]
    info = np.iinfo(DATATYPES[datatype])
    return {"type": "integer", "minimum": int(info.min), "maximum": int(info.max)}


def _nested(datatype: str) -> dict[str, Any]:
    """``data``: a flat list in row-major order, or nested lists (any depth) of the element type."""
    return {"type": "array", "items": {"anyOf": [_element(datatype), {"$ref": f"#/components/schemas/data_{datatype}"}]}}


def input_schema(rule: dict[str, Any], max_batch: int) -> dict[str, Any]:
    dims = [{"type": "integer", "minimum": 1, "maximum": max_batch}]
    dims += [{"type": "integer", "minimum": 0} if d == -1 else {"const": d} for d in rule["shape"][1:]]
    fixed = -1 not in rule["shape"][1:]
    schema: dict[str, Any] = {
        "type": "object", "required": ["name", "shape", "datatype", "data"],
        "description": f"'{rule['name']}': {rule['datatype']} of shape {rule['shape']} (-1: any size; the first "
                       f"axis is the batch, at most {max_batch}). 'data' holds the elements in row-major order, "
                       f"as many as the shape" + ("." if fixed else " (not stated here: another axis than the "
                                                  "batch varies, which JSON Schema cannot relate to the count)."),
        "properties": {
            "name": {"const": rule["name"]},
            "datatype": {"const": rule["datatype"]},
            "shape": {"type": "array", "prefixItems": dims, "items": False,
                      "minItems": len(dims), "maxItems": len(dims)},
            "data": {"$ref": f"#/components/schemas/data_{rule['datatype']}"},
        },
    }
    if fixed:
        row = math.prod(rule["shape"][1:])
        schema["oneOf"] = [{"properties": {
            "shape": {"const": [batch, *rule["shape"][1:]]},
            "data": {"type": "array", "items": _element(rule["datatype"]), "minItems": batch * row,
                     "maxItems": batch * row}}} for batch in range(1, max_batch + 1)]
    return schema


def request_schema(model: ServedModel) -> dict[str, Any]:
    """One input set of ``signatures()``: exactly those inputs, each once, in any order."""
    sets = []
    for signature in model.signatures():
        names = [r["name"] for r in signature]
        sets.append({
            "type": "object", "required": ["inputs"],
            "properties": {
                "id": {"type": "string"},
                "inputs": {"type": "array", "minItems": len(names), "maxItems": len(names),
                           "items": {"oneOf": [input_schema(r, model.max_batch) for r in signature]},
                           "allOf": [{"contains": {"properties": {"name": {"const": n}}, "required": ["name"]}}
                                     for n in names]},
                "outputs": {"type": "array", "items": {"oneOf": [output_schema(o) for o in model.outputs]}},
                "parameters": {"type": "object", "properties": {"binary_data_output": {"type": "boolean"}}},
            },
        })
    return sets[0] if len(sets) == 1 else {"oneOf": sets}


def output_schema(output: dict[str, Any]) -> dict[str, Any]:
    """A requested output: its name and parameters. Triton's classification extension (the top k of
    a [batch, classes] output) where the output is one; elsewhere that parameter is refused."""
    shape = list(output["shape"])
    classes = shape[1] if len(shape) == 2 and shape[1] > 0 else None
    classification = {"type": "integer", "minimum": 1, "maximum": classes} if classes else False
    return {"type": "object", "required": ["name"], "properties": {
        "name": {"const": output["name"]},
        "parameters": {"type": "object", "properties": {"binary_data": {"type": "boolean"},
                                                         "classification": classification}}}}


def openapi(model: ServedModel) -> dict[str, Any]:
    datatypes = sorted({r["datatype"] for sig in model.signatures() for r in sig}
                       | {datatype_of(o["dtype"]) for o in model.outputs})
    base = f"/v2/models/{model.name}"
    json_ok = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
    error = {"description": "The caller's mistake, named",
             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/error"}}}}

    def get(summary: str, *extra: tuple[str, dict]) -> dict[str, Any]:
        return {"get": {"summary": summary, "responses": {"200": json_ok, **dict(extra)}}}

    not_ready = ("503", {"description": "Not ready (warming up or draining)"})
    return {
        "openapi": "3.1.0",
        "info": {"title": f"{model.name} ({model.target}, {model.precision})", "version": model.version,
                 "description": "Open Inference Protocol (KServe v2) with the binary tensor extension."},
        "paths": {
            "/v2/health/live": get("Process is up"),
            "/v2/health/ready": get("Ready to serve", not_ready),
            "/v2": get("Server metadata and extensions"),
            base: get("Model metadata: inputs and outputs", ("404", error)),
            f"{base}/ready": get("Model ready", not_ready),
            f"{base}/config": get("Model configuration (Triton's layout)"),
            f"{base}/stats": get("Inference statistics (Triton's layout)"),
            "/v2/models/stats": get("Every served model's inference statistics (Triton's layout)"),
            "/v2/repository/index": {"post": {
                "summary": "The models served, their versions and states (Triton's repository index)",
                "requestBody": {"required": False, "content": {"application/json": {"schema": {
                    "type": "object", "properties": {"ready": {"type": "boolean"}}}}}},
                "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": {
                    "type": "array", "items": {"type": "object", "required": ["name", "version", "state"]}}}}},
                              "400": error}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {
                "description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            f"{base}/infer": {"post": {
                "summary": "Inference",
                "description": "JSON tensors (this schema), or the binary tensor extension: a body whose first "
                               "Inference-Header-Content-Length bytes are a JSON header like this schema in which "
                               "an input may give parameters.binary_data_size instead of 'data', followed by the "
                               "raw little-endian bytes of those inputs in order (BYTES: a 4-byte length before "
                               "each element). Not stated as a schema: its validity depends on the header's "
                               "byte counts, which the server checks.",
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/infer_request"}}}},
                "responses": {"200": {"description": "Outputs: JSON, or with binary outputs asked for "
                                                     "(binary_data, binary_data_output) the JSON header of "
                                                     "Inference-Header-Content-Length bytes and the raw outputs",
                                      "content": {"application/json": {
                                          "schema": {"$ref": "#/components/schemas/infer_response"}},
                                          "application/octet-stream": {"schema": {"type": "string",
                                                                                  "format": "binary"}}}},
                              "400": error, "404": error, "413": error,
                              "405": {"description": "Another method than POST (the Allow header names it)"},
                              "503": {"description": "Queue full or not ready: retry later", "content": {
                                  "application/json": {"schema": {"$ref": "#/components/schemas/error"}}}}}}},
        },
        "components": {"schemas": {
            "infer_request": request_schema(model),
            "infer_response": {"type": "object", "required": ["model_name", "outputs"], "properties": {
                "model_name": {"const": model.name}, "model_version": {"const": model.version},
                "id": {"type": "string"},
                "outputs": {"type": "array", "items": {
                    "type": "object", "required": ["name", "datatype", "shape"],
                    "properties": {"data": {"type": "array", "description": "Row-major values; a NaN or an "
                                            "infinity is null (strict JSON has neither), counted in "
                                            "parameters.non_finite; binary outputs carry them as they are"},
                                   "parameters": {"type": "object", "properties": {
                                       "binary_data_size": {"type": "integer"},
                                       "non_finite": {"type": "integer"}}}}}}}},
            "error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
            **{f"data_{d}": _nested(d) for d in datatypes},
        }},
    }

