"""A running Open Inference Protocol server as a ``Runner``, so the load models can drive it.

A lean client: one keep-alive ``http.client`` connection per calling thread, binary tensors both
ways (no JSON lists to encode or parse), nothing else on the request path. Its own cost per call
is measured (``client_overhead_ms``) so a server's added latency can be stated net of it.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
from typing import Any

import numpy as np

from optimize.errors import BundleError
from optimize.inputs.specs import OIP_DATATYPES, TensorSpec, oip_datatype
from optimize.targets.base import Runner


class HttpRunner(Runner):
    """``infer(feeds)`` as ``POST /v2/models/{model}/infer`` with binary tensors."""

    def __init__(self, url: str, model: str, inputs: list[TensorSpec], output_names: list[str]):
        parsed = urllib.parse.urlparse(url if "://" in url else f"http://{url}")
        if parsed.scheme != "http" or not parsed.hostname:
            raise BundleError(f"--url {url!r} must be http://host:port")
        self.host, self.port = parsed.hostname, parsed.port or 80
        self.path = f"/v2/models/{model}/infer"
        self.model = model
        self.inputs = inputs
        self.outputs = [TensorSpec(n, (-1,), "float32") for n in output_names]
        self._outputs = [{"name": n, "parameters": {"binary_data": True}} for n in output_names]
        self._local = threading.local()
        self._check()

    def _connection(self) -> http.client.HTTPConnection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = http.client.HTTPConnection(self.host, self.port, timeout=60)
            self._local.connection = connection
        return connection

    def _check(self) -> None:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            connection.request("GET", f"/v2/models/{self.model}")
            response = connection.getresponse()
            body = response.read()
        except OSError as exc:
            raise BundleError(f"no server at http://{self.host}:{self.port} ({exc})") from None
        finally:
            connection.close()
        if response.status != 200:
            raise BundleError(f"model '{self.model}' is not served at http://{self.host}:{self.port} "
                              f"(status {response.status})")
        self.platform = json.loads(body).get("platform")

    def encode(self, feeds: dict[str, np.ndarray]) -> tuple[bytes, int]:
        tensors, chunks = [], []
        for spec in self.inputs:
            array = np.ascontiguousarray(feeds[spec.name])
            raw = array.tobytes()
            tensors.append({"name": spec.name, "shape": list(array.shape), "datatype": oip_datatype(array.dtype),
                            "parameters": {"binary_data_size": len(raw)}})
            chunks.append(raw)
        header = json.dumps({"inputs": tensors, "outputs": self._outputs}).encode()
        return header + b"".join(chunks), len(header)

    @staticmethod
    def decode(body: bytes, header_length: int | None) -> dict[str, np.ndarray]:
        header = json.loads(body[:header_length] if header_length else body)
        offset, outputs = header_length or 0, {}
        for tensor in header["outputs"]:
            size = (tensor.get("parameters") or {}).get("binary_data_size")
            dtype = np.dtype(OIP_DATATYPES[tensor["datatype"]])
            if size is None:
                outputs[tensor["name"]] = np.asarray(tensor["data"], dtype).reshape(tensor["shape"])
                continue
            outputs[tensor["name"]] = np.frombuffer(body, dtype, size // dtype.itemsize, offset).reshape(tensor["shape"])
            offset += size
        return outputs

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        body, header_length = self.encode(feeds)
        headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(header_length)}
        reused = getattr(self._local, "connection", None) is not None
        try:
            response, data = self._post(body, headers)
        except (ConnectionError, http.client.RemoteDisconnected):
            if not reused:
                raise
            # The server closed an idle keep-alive connection (uvicorn does after 5 s): reconnect once.
            response, data = self._post(body, headers)
        if response.status != 200:
            raise RuntimeError(f"server answered {response.status}: {data[:200]!r}")
        length = response.getheader("Inference-Header-Content-Length")
        return self.decode(data, int(length) if length else None)

    def _post(self, body: bytes, headers: dict[str, str]) -> tuple[http.client.HTTPResponse, bytes]:
        connection = self._connection()
        try:
            connection.request("POST", self.path, body, headers)
            response = connection.getresponse()
            return response, response.read()
        except (OSError, http.client.HTTPException):
            connection.close()
            self._local.connection = None
            raise

    def client_overhead_ms(self, feeds: dict[str, np.ndarray], calls: int = 2000) -> float:
        """Median time to encode a request and decode an answer of the same size, without the network."""
        body, header_length = self.encode(feeds)
        answer = {"outputs": [{"name": o.name, "datatype": "FP32", "shape": [1, 1],
                               "parameters": {"binary_data_size": 4}} for o in self.outputs]}
        answer_header = json.dumps(answer).encode()
        answer_body = answer_header + b"\0" * (4 * len(self.outputs))
        samples = []
        for _ in range(calls):
            start = time.perf_counter()
            self.encode(feeds)
            self.decode(answer_body, len(answer_header))
            samples.append(time.perf_counter() - start)
        return float(np.median(samples) * 1000)

    @property
    def settings(self) -> dict[str, Any]:
        return {"backend": "http", "url": f"http://{self.host}:{self.port}{self.path}", "platform": self.platform,
                "client": "http.client keep-alive, binary tensors"}

    def close(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
