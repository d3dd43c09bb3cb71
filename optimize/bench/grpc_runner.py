"""A running Open Inference Protocol gRPC server (``optimize serve``, Triton, KServe) as a ``Runner``.

The counterpart of ``HttpRunner``: one channel per calling thread, raw tensor contents both ways,
the messages compiled from Triton's protos (``optimize.oip``). Its own cost per call is measured
(``client_overhead_ms``) so a server's added latency can be stated net of it.
"""

from __future__ import annotations

import threading
import time
import urllib.parse
from typing import Any

import numpy as np

from optimize.errors import BundleError
from optimize.inputs.specs import OIP_DATATYPES, TensorSpec, oip_datatype
from optimize.targets.base import Runner


class GrpcRunner(Runner):
    """``infer(feeds)`` as ``ModelInfer`` with ``raw_input_contents``."""

    def __init__(self, url: str, model: str, inputs: list[TensorSpec], output_names: list[str]):
        try:
            import grpc

            from optimize.oip import grpc_service_pb2, grpc_service_pb2_grpc
        except ImportError as exc:
            raise BundleError(f"--url grpc:// needs grpcio and protobuf ({exc}): pip install 'optimize[serve]'") from None
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme != "grpc" or not parsed.hostname:
            raise BundleError(f"--url {url!r} must be grpc://host:port")
        self.target = f"{parsed.hostname}:{parsed.port or 8001}"
        self.model, self.inputs = model, inputs
        self.outputs = [TensorSpec(n, (-1,), "float32") for n in output_names]
        self._grpc, self._pb, self._stubs = grpc, grpc_service_pb2, grpc_service_pb2_grpc
        self._local = threading.local()
        self._channels: list[Any] = []
        self._lock = threading.Lock()
        self._check()

    def _stub(self) -> Any:
        stub = getattr(self._local, "stub", None)
        if stub is None:
            channel = self._grpc.insecure_channel(self.target, options=[("grpc.max_receive_message_length", -1),
                                                                        ("grpc.max_send_message_length", -1)])
            with self._lock:
                self._channels.append(channel)
            stub = self._local.stub = self._stubs.GRPCInferenceServiceStub(channel)
        return stub

    def _check(self) -> None:
        try:
            meta = self._stub().ModelMetadata(self._pb.ModelMetadataRequest(name=self.model), timeout=10)
        except self._grpc.RpcError as exc:
            if exc.code() == self._grpc.StatusCode.UNAVAILABLE:
                raise BundleError(f"no gRPC server at {self.target} ({exc.details()})") from None
            raise BundleError(f"model '{self.model}' is not served at grpc://{self.target}: "
                              f"{exc.code().name} {exc.details()}") from None
        self.platform = meta.platform

    def encode(self, feeds: dict[str, np.ndarray]) -> Any:
        request = self._pb.ModelInferRequest(model_name=self.model)
        for spec in self.inputs:
            array = np.ascontiguousarray(feeds[spec.name])
            request.inputs.add(name=spec.name, datatype=oip_datatype(array.dtype), shape=array.shape)
            request.raw_input_contents.append(array.tobytes())
        for output in self.outputs:
            request.outputs.add(name=output.name)
        return request

    @staticmethod
    def decode(response: Any) -> dict[str, np.ndarray]:
        outputs = {}
        for tensor, raw in zip(response.outputs, response.raw_output_contents):
            outputs[tensor.name] = np.frombuffer(raw, np.dtype(OIP_DATATYPES[tensor.datatype])).reshape(tensor.shape)
        return outputs

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return self.decode(self._stub().ModelInfer(self.encode(feeds), timeout=60))
        except self._grpc.RpcError as exc:
            raise RuntimeError(f"server answered {exc.code().name}: {exc.details()[:200]}") from None

    def client_overhead_ms(self, feeds: dict[str, np.ndarray], calls: int = 2000) -> float:
        """Median time to encode and serialize a request and parse and decode an answer of the same
        size, without the network."""
        answer = self._pb.ModelInferResponse(model_name=self.model)
        for output in self.outputs:
            answer.outputs.add(name=output.name, datatype="FP32", shape=[1, 1])
            answer.raw_output_contents.append(b"\0" * 4)
        wire = answer.SerializeToString()
        samples = []
        for _ in range(calls):
            start = time.perf_counter()
            self.encode(feeds).SerializeToString()
            self.decode(self._pb.ModelInferResponse.FromString(wire))
            samples.append(time.perf_counter() - start)
        return float(np.median(samples) * 1000)

    @property
    def settings(self) -> dict[str, Any]:
        return {"backend": "grpc", "url": f"grpc://{self.target}", "model": self.model, "platform": self.platform,
                "client": "grpcio channel per thread, raw tensor contents"}

    def close(self) -> None:
        with self._lock:
            for channel in self._channels:
                channel.close()
            self._channels.clear()
