"""The gRPC front end: Triton's ``inference.GRPCInferenceService`` and the standard
``grpc.health.v1`` service, on grpcio's asyncio server, in front of the same ``InferenceService``
as HTTP.

Messages are the ones grpcio-tools compiles from Triton's own protos (``optimize/oip``). Inputs come
as typed ``contents`` or as ``raw_input_contents`` (little-endian bytes, BYTES as 4-byte length
prefixes, the binary extension's layout); outputs always go back as ``raw_output_contents``, as
Triton answers. A caller's mistake is the status code Triton uses for it (``CODES``), with a
message naming the tensor. Repository, shared-memory, trace, log and streaming RPCs are not
offered (UNIMPLEMENTED): one model per server, no shared memory across a network.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any, Awaitable, Callable

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from optimize.oip import grpc_service_pb2 as pb
from optimize.oip import grpc_service_pb2_grpc as pb_grpc
from optimize.oip import model_config_pb2
from serve.protocol import (DATATYPES, InferRequest, ProtocolError, classification_count, datatype_of, decode_tensor,
                            encode_bytes)
from serve.service import InferenceService

LOG = logging.getLogger("serve")
SERVICE = "inference.GRPCInferenceService"
# The HTTP status a ProtocolError carries, as the gRPC code Triton answers the same case with.
CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND, 405: grpc.StatusCode.UNIMPLEMENTED,
         413: grpc.StatusCode.RESOURCE_EXHAUSTED, 500: grpc.StatusCode.INTERNAL, 503: grpc.StatusCode.UNAVAILABLE}
QUIET_S = 0.05  # no inference call for this long: clients have gone elsewhere
QUIET_WAIT_S = 1.0
# Which ``InferTensorContents`` field holds each datatype (FP16 and BF16 have none: raw only).
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
            "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def _answers(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """A ``ProtocolError`` becomes the matching status code and its message."""
    @functools.wraps(handler)
    async def answering(self: "InferenceServicer", request: Message, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(self, request, context)
        except ProtocolError as exc:
            await context.abort(CODES.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT), str(exc))
    return answering


def decode_infer(message: pb.ModelInferRequest) -> InferRequest:
    """A ``ModelInferRequest`` as the ``InferRequest`` HTTP decodes to, with the same checks."""
    if not message.inputs:
        raise ProtocolError("the request needs at least one input")
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise ProtocolError(f"{len(raw)} raw_input_contents for {len(message.inputs)} inputs: give raw contents "
                            f"for every input or for none")
    inputs: dict[str, Any] = {}
    datatypes: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for index, tensor in enumerate(message.inputs):
        header: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if raw:
            if tensor.HasField("contents"):
                raise ProtocolError(f"input '{tensor.name}' has both contents and raw_input_contents")
            chunk: memoryview | None = memoryview(raw[index])
        else:
            chunk = None
            field = CONTENTS.get(tensor.datatype)
            if field is None and tensor.datatype in DATATYPES:
                raise ProtocolError(f"input '{tensor.name}': {tensor.datatype} has no typed contents field; "
                                    f"send it in raw_input_contents")
            values = getattr(tensor.contents, field) if field else []
            header["data"] = ([v.decode("utf-8", errors="replace") for v in values] if tensor.datatype == "BYTES"
                              else np.asarray(values))
        name, datatype, shape, value = decode_tensor(header, chunk)
        if name in inputs:
            raise ProtocolError(f"input '{name}' is given twice")
        inputs[name], datatypes[name], shapes[name] = value, datatype, shape
    requested = [o.name for o in message.outputs] or None
    classification = {}
    for output in message.outputs:
        if "classification" in output.parameters:
            parameter = output.parameters["classification"]
            value = parameter.int64_param if parameter.WhichOneof("parameter_choice") == "int64_param" else None
            classification[output.name] = classification_count(value, output.name)
    return InferRequest(message.id or None, inputs, datatypes, shapes, {}, True, requested,
                        classification=classification)


def encode_infer(model: str, version: str, request: InferRequest,
                 outputs: dict[str, np.ndarray]) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=model, model_version=version, id=request.id or "")
    for name, array in outputs.items():
        if array.dtype == object:
            raw, datatype = encode_bytes(array.reshape(-1).tolist()), "BYTES"
        else:
            raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            datatype = datatype_of(array.dtype)
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        response.raw_output_contents.append(raw)
    if request.truncated:
        response.parameters["text_truncated"].int64_param = request.truncated
    return response


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Each RPC answers what the HTTP route of the same name answers."""

    def __init__(self, service: InferenceService):
        self.service = service
        self.closing = False  # after the drain delay: new inference is UNAVAILABLE, as Triton answers
        self.last_call = 0.0  # monotonic time of the latest ModelInfer

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.service.ready)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        """An unknown model is not ready (OK, ready false), as Triton answers; HTTP's route says 404."""
        try:
            self.service.find_model(request.name, request.version)
        except ProtocolError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.service.ready)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(**self.service.server_metadata())

    @_answers
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        self.service.find_model(request.name, request.version)
        return json_format.ParseDict(self.service.model.metadata(), pb.ModelMetadataResponse())

    @_answers
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext) -> pb.ModelConfigResponse:
        self.service.find_model(request.name, request.version)
        config = json_format.ParseDict(self.service.config(), model_config_pb2.ModelConfig())
        return pb.ModelConfigResponse(config=config)

    @_answers
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext) -> pb.ModelStatisticsResponse:
        if request.name:  # no name: every model's, as Triton answers; that is this one
            self.service.find_model(request.name, request.version)
        return json_format.ParseDict(self.service.statistics(), pb.ModelStatisticsResponse())

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest,
                              context: grpc.aio.ServicerContext) -> pb.RepositoryIndexResponse:
        models = [m for m in self.service.repository_index() if not request.ready or m["state"] == "READY"]
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**m) for m in models])

    @_answers
    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        self.last_call = time.monotonic()
        service = self.service
        if self.closing:
            raise ProtocolError("the server is shutting down; retry on another replica", 503)
        service.find_model(request.model_name, request.model_version)

        async def decode() -> InferRequest:
            return decode_infer(request)

        def encode(decoded: InferRequest, outputs: dict[str, np.ndarray]) -> pb.ModelInferResponse:
            return encode_infer(service.model.name, service.model.version, decoded, outputs)

        return await service.infer(decode, encode, "grpc")


class GrpcFrontEnd:
    """The listening gRPC server: ``start()``, ``serving(bool)`` for the health service, ``stop(grace)``
    (GOAWAY to every client, running RPCs finish)."""

    def __init__(self, service: InferenceService, host: str, port: int, max_message_bytes: int):
        self.service = service
        self.address = f"{'[::]' if host in ('0.0.0.0', '::') else host}:{port}"
        self.server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_message_bytes),
                                               ("grpc.max_send_message_length", -1),
                                               ("grpc.so_reuseport", 0)])
        self.servicer = InferenceServicer(service)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, self.server)
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port(self.address)  # grpcio raises RuntimeError when it cannot bind
        if self.port == 0:
            raise OSError(f"cannot bind {self.address}")

    async def start(self) -> None:
        await self.serving(False)
        await self.server.start()

    async def serving(self, ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE):
            await self.health.set(name, status)

    async def stop(self, grace_s: float) -> None:
        """Stop: new inference is answered UNAVAILABLE at once until clients have gone quiet (at most
        ``QUIET_WAIT_S``): grpc's shutdown cancels calls it has received but not yet handed to a
        handler, so it starts only when few can be in that state. Then GOAWAY to every client;
        running calls finish within ``grace_s``."""
        self.servicer.closing = True
        deadline = time.monotonic() + QUIET_WAIT_S
        while time.monotonic() < deadline and time.monotonic() - self.servicer.last_call < QUIET_S:
            await asyncio.sleep(QUIET_S / 4)
        await self.server.stop(grace_s)
