"""The same requests to a real Triton server and to ``optimize serve``, over HTTP and gRPC: what a
client sees must be the same, case by case, or the difference is written down in ``DIFFERENT``
with the reason Triton's answer is not the one to copy.

Triton runs from PyTriton in its own virtualenv (``.venv-triton``, which ``scripts/test.sh``
makes), serving the bundle's ONNX file through ONNX Runtime. With ``CONFORMANCE_REPORT=path`` the
table of every case (Triton's answer, ours, same or different and why) is written there.
"""

from __future__ import annotations

import http.client
import contextlib
import json
import os
import signal
import subprocess
import sysconfig
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from support import ROOT, Server, free_port, stop_process, wait_ready

pytestmark = [pytest.mark.service, pytest.mark.slow]
TRITON_PYTHON = ROOT / ".venv-triton" / "bin" / "python"
MODEL = "tiny"
X = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
X4 = np.random.default_rng(1).standard_normal((4, 3, 16, 16)).astype(np.float32)
# Where ours answers differently on purpose: case -> why Triton's answer is not the one to copy.
DIFFERENT: dict[str, str] = {
    "http unknown model ready": "Triton answers 400 here but 404 for the same unknown model's metadata and infer "
                                "routes; ours is 404 on all three (either status reads as not ready to a client)",
    "http short data": "Triton answers 500 for a caller's mistake; a 5xx fires server-error alerts and invites "
                       "retries of a request that can never succeed, so ours is 400 naming the input",
    "http body not json": "as above: Triton's 500 for a body that is not JSON; ours is 400",
    "grpc health (unknown service)": "Triton answers SERVING for any service name; grpc.health.v1 says NOT_FOUND "
                                     "for a service the server does not know, which ours answers",
    "http repository index": "PyTriton starts Triton with its repository API restricted (403); an open "
                             "Triton lists each model's name, version and state, which ours answers",
    "grpc repository index": "as above (UNAVAILABLE from PyTriton's Triton)",
    "while draining: http ready": "PyTriton stops Triton at once on SIGTERM, so there is no drain to compare; ours "
                                  "keeps answering for --drain-delay with readiness false",
    "while draining: grpc health": "as above",
}


def _missing() -> str | None:
    if not TRITON_PYTHON.is_file():
        return f"{TRITON_PYTHON} is missing (scripts/test.sh makes it: pip install nvidia-pytriton onnxruntime)"
    probe = subprocess.run([str(TRITON_PYTHON), "-c", "import pytriton, onnxruntime"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"PyTriton does not import in {TRITON_PYTHON}: {probe.stderr.strip()[-300:]}"
    return None


class Endpoint:
    """One server as a client sees it: raw HTTP (status, headers, body) and the raw gRPC stub."""

    def __init__(self, name: str, http_port: int, grpc_port: int):
        import grpc

        from optimize.oip import grpc_service_pb2_grpc

        self.name, self.http_port, self.grpc_port = name, http_port, grpc_port
        self.channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        self.stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(self.channel)

    def http(self, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=30)
        try:
            connection.request(method, path, body, headers or {})
            response = connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            connection.close()

    def grpc(self, rpc: str, request: Any) -> tuple[str, Any]:
        """(status code name, response or the error's details)."""
        import grpc

        try:
            return "OK", getattr(self.stub, rpc)(request, timeout=30)
        except grpc.RpcError as error:
            return error.code().name, error.details()


@pytest.fixture(scope="module")
def endpoints(bundles):
    reason = _missing()
    if reason:
        pytest.skip(reason)
    bundle = bundles.get("--target", "ort-fp32")
    http_port, grpc_port = free_port(), free_port()
    env = {**os.environ, "LD_LIBRARY_PATH": sysconfig.get_config_var("LIBDIR") or ""}
    with contextlib.ExitStack() as stack:
        triton = subprocess.Popen([str(TRITON_PYTHON), str(ROOT / "tests" / "fixtures" / "pytriton_onnx.py"),
                                   str(bundle / "model.onnx"), MODEL, str(http_port), str(grpc_port), "8"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        stack.callback(stop_process, triton)
        ours = stack.enter_context(Server(bundle, "--target", "ort-fp32", "--drain-delay", "3"))
        wait_ready(triton, f"http://127.0.0.1:{http_port}/v2/models/{MODEL}/ready", "Triton", timeout_s=120)
        yield {"triton": Endpoint("triton", http_port, grpc_port), "ours": Endpoint("ours", ours.port, ours.grpc_port),
               "processes": {"triton": triton, "ours": ours.process}}


# -- the requests ---------------------------------------------------------------------------------
def _json_infer(x: np.ndarray, **extra: Any) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.reshape(-1).tolist()}], **extra}).encode()


def _binary_infer(x: np.ndarray, outputs: list | None = None, size: int | None = None,
                  **parameters: Any) -> tuple[bytes, dict[str, str]]:
    raw = x.tobytes()
    header: dict[str, Any] = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                          "parameters": {"binary_data_size": len(raw) if size is None else size}}]}
    if outputs is not None:
        header["outputs"] = outputs
    if parameters:
        header["parameters"] = parameters
    text = json.dumps(header).encode()
    return text + raw, {"Inference-Header-Content-Length": str(len(text)), "Content-Type": "application/octet-stream"}


def _status(answer: tuple[int, dict, bytes]) -> dict[str, Any]:
    """What a client branches on for an error: the status, and whether the body is ``{"error": str}``."""
    status, _, body = answer
    try:
        shaped = isinstance(json.loads(body).get("error"), str)
    except (ValueError, AttributeError):
        shaped = False
    return {"status": status, "error_object": shaped if status >= 400 else None}


def _outputs(answer: tuple[int, dict, bytes]) -> dict[str, Any]:
    """Status, framing and the outputs (values rounded: two engines, one ONNX file)."""
    status, headers, body = answer
    if status != 200:
        return _status(answer)
    split = int(headers.get("inference-header-content-length", len(body)))
    header = json.loads(body[:split])
    seen, offset = [], split
    for tensor in header["outputs"]:
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is None:
            values = np.asarray(tensor["data"], np.float32)
        else:
            values = np.frombuffer(body, np.float32, size // 4, offset)
            offset += size
        seen.append({"name": tensor["name"], "datatype": tensor["datatype"], "shape": tensor["shape"],
                     "binary": size is not None, "binary_data_size": size,
                     "values": np.round(values, 3).tolist()})
    return {"status": status, "framed": "inference-header-content-length" in headers, "outputs": seen,
            "id": header.get("id"), "body_fully_claimed": offset == len(body)}


def _tensors(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"name": t["name"], "datatype": t["datatype"], "shape": t["shape"]} for t in items]


def _config(config: dict[str, Any]) -> dict[str, Any]:
    def tensors(items):
        return [{"name": t["name"], "data_type": t["data_type"], "dims": [int(d) for d in t["dims"]]} for t in items]
    return {"name": config["name"], "max_batch_size": config["max_batch_size"], "input": tensors(config["input"]),
            "output": tensors(config["output"]), "dynamic_batching": "dynamic_batching" in config}


def _infer_request(x: np.ndarray, raw: bool = True, model: str = MODEL, name: str = "x", datatype: str = "FP32",
                   shape: list[int] | None = None, data: bytes | None = None, outputs: list[str] | None = None,
                   request_id: str = "") -> Any:
    from optimize.oip import grpc_service_pb2 as pb

    request = pb.ModelInferRequest(model_name=model, id=request_id)
    tensor = request.inputs.add(name=name, datatype=datatype, shape=list(x.shape) if shape is None else shape)
    if raw:
        request.raw_input_contents.append(x.tobytes() if data is None else data)
    else:
        tensor.contents.fp32_contents.extend(x.reshape(-1).tolist())
    for output in outputs or []:
        request.outputs.add(name=output)
    return request


def _grpc_outputs(answer: tuple[str, Any]) -> dict[str, Any]:
    code, response = answer
    if code != "OK":
        return {"code": code}
    seen = []
    for index, tensor in enumerate(response.outputs):
        raw = response.raw_output_contents[index] if response.raw_output_contents else b""
        values = np.frombuffer(raw, np.float32) if raw else np.asarray(tensor.contents.fp32_contents, np.float32)
        seen.append({"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape),
                     "raw": bool(raw), "values": np.round(values, 3).tolist()})
    return {"code": code, "outputs": seen, "id": response.id}


def _grpc_code(answer: tuple[str, Any]) -> dict[str, Any]:
    return {"code": answer[0]}


def _stats_delta(endpoint: Endpoint, send: Callable[[], Any], read: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    before = read()
    send()
    # Triton records a request's statistics after its response is sent: wait for them to settle.
    deadline, after = time.monotonic() + 10, read()
    while after["success"] == before["success"] and time.monotonic() < deadline:
        time.sleep(0.05)
        after = read()
    keys = ("inference_count", "execution_count", "success")
    return {k: after[k] - before[k] for k in keys}


def _http_stats(endpoint: Endpoint) -> dict[str, Any]:
    stats = json.loads(endpoint.http("GET", f"/v2/models/{MODEL}/stats")[2])["model_stats"][0]
    return {"inference_count": stats["inference_count"], "execution_count": stats["execution_count"],
            "success": stats["inference_stats"]["success"]["count"]}


def _grpc_stats(endpoint: Endpoint) -> dict[str, Any]:
    from optimize.oip import grpc_service_pb2 as pb

    stats = endpoint.grpc("ModelStatistics", pb.ModelStatisticsRequest(name=MODEL))[1].model_stats[0]
    return {"inference_count": stats.inference_count, "execution_count": stats.execution_count,
            "success": stats.inference_stats.success.count}


def _health(endpoint: Endpoint, service: str = "") -> dict[str, Any]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(endpoint.channel)
    try:
        status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
        return {"code": "OK", "status": health_pb2.HealthCheckResponse.ServingStatus.Name(status)}
    except grpc.RpcError as error:
        return {"code": error.code().name}


def _cases() -> dict[str, Callable[[Endpoint], Any]]:
    from optimize.oip import grpc_service_pb2 as pb

    m = f"/v2/models/{MODEL}"
    body, headers = _binary_infer(X)
    short_body, short_headers = _binary_infer(X, size=X.nbytes + 16)
    cases: dict[str, Callable[[Endpoint], Any]] = {
        # HTTP: health, metadata, configuration
        "http live": lambda e: e.http("GET", "/v2/health/live")[0],
        "http ready": lambda e: e.http("GET", "/v2/health/ready")[0],
        "http model ready": lambda e: e.http("GET", f"{m}/ready")[0],
        "http unknown model ready": lambda e: e.http("GET", "/v2/models/nope/ready")[0],
        "http server metadata keys": lambda e: sorted(json.loads(e.http("GET", "/v2")[2])),
        "http model metadata tensors": lambda e: (lambda meta: {"inputs": _tensors(meta["inputs"]),
                                                                "outputs": _tensors(meta["outputs"]),
                                                                "keys": sorted(meta)})(json.loads(e.http("GET", m)[2])),
        "http model config": lambda e: _config(json.loads(e.http("GET", f"{m}/config")[2])),
        "http unknown model metadata": lambda e: _status(e.http("GET", "/v2/models/nope")),
        # HTTP: inference and framing
        "http infer json": lambda e: _outputs(e.http("POST", f"{m}/infer", _json_infer(X))),
        "http infer json batch 4": lambda e: _outputs(e.http("POST", f"{m}/infer", _json_infer(X4))),
        "http binary input, json output": lambda e: _outputs(e.http("POST", f"{m}/infer", body, headers)),
        "http binary output (binary_data_output)": lambda e: _outputs(e.http("POST", f"{m}/infer", *_binary_infer(
            X, binary_data_output=True))),
        "http binary output (per output)": lambda e: _outputs(e.http("POST", f"{m}/infer", *_binary_infer(
            X, outputs=[{"name": "output", "parameters": {"binary_data": True}}]))),
        "http requested output by name": lambda e: _outputs(e.http("POST", f"{m}/infer", _json_infer(
            X, outputs=[{"name": "output"}]))),
        "http request id echoed": lambda e: _outputs(e.http("POST", f"{m}/infer", _json_infer(X, id="req-7"))),
        "http versioned infer route": lambda e: e.http("POST", f"{m}/versions/{_version(e)}/infer", _json_infer(X))[0],
        # HTTP: the same malformed requests
        "http unknown model": lambda e: _status(e.http("POST", "/v2/models/nope/infer", _json_infer(X))),
        "http unknown input": lambda e: _status(e.http("POST", f"{m}/infer", _json_infer(X).replace(b'"x"', b'"y"'))),
        "http unknown output": lambda e: _status(e.http("POST", f"{m}/infer", _json_infer(X, outputs=[{"name": "nope"}]))),
        "http wrong datatype": lambda e: _status(e.http("POST", f"{m}/infer", _json_infer(X).replace(b'"FP32"', b'"FP64"'))),
        "http wrong shape": lambda e: _status(e.http("POST", f"{m}/infer", json.dumps({"inputs": [{
            "name": "x", "shape": [1, 3, 8, 32], "datatype": "FP32", "data": X.reshape(-1).tolist()}]}).encode())),
        "http short data": lambda e: _status(e.http("POST", f"{m}/infer", json.dumps({"inputs": [{
            "name": "x", "shape": [1, 3, 16, 16], "datatype": "FP32", "data": X.reshape(-1)[:100].tolist()}]}).encode())),
        "http truncated binary body": lambda e: _status(e.http("POST", f"{m}/infer", short_body, short_headers)),
        "http batch above max_batch_size": lambda e: _status(e.http("POST", f"{m}/infer", _json_infer(
            np.zeros((9, 3, 16, 16), np.float32)))),
        "http body not json": lambda e: _status(e.http("POST", f"{m}/infer", b"{not json")),
        "http no inputs": lambda e: _status(e.http("POST", f"{m}/infer", b'{"inputs": []}')),
        "http GET on the infer route": lambda e: e.http("GET", f"{m}/infer")[0],
        # What perf_analyzer and Triton's repository tools read: a decimal version, the all-models
        # statistics route, statistics by version, the repository index.
        "http version is a canonical integer": lambda e: (lambda v: v == str(int(v)))(_version(e)),
        "http all-models stats": lambda e: _picked(e.http("GET", "/v2/models/stats"), lambda b: [
            (s["name"], s["version"] == _version(e)) for s in b["model_stats"] if s["name"] == MODEL]),
        "http stats by version": lambda e: _picked(e.http("GET", f"{m}/versions/{_version(e)}/stats"), lambda b: [
            (s["name"], s["version"] == _version(e)) for s in b["model_stats"]]),
        "http repository index": lambda e: _picked(e.http("POST", "/v2/repository/index", b"{}"), lambda b: [
            (i["name"], i.get("version") == _version(e), i.get("state")) for i in b if i["name"] == MODEL]),
        "http stats after a batch-4 request": lambda e: _stats_delta(
            e, lambda: e.http("POST", f"{m}/infer", _json_infer(X4)), lambda: _http_stats(e)),
        # gRPC
        "grpc live": lambda e: (lambda a: (a[0], a[1].live))(e.grpc("ServerLive", pb.ServerLiveRequest())),
        "grpc ready": lambda e: (lambda a: (a[0], a[1].ready))(e.grpc("ServerReady", pb.ServerReadyRequest())),
        "grpc model ready": lambda e: (lambda a: (a[0], a[1].ready))(e.grpc("ModelReady", pb.ModelReadyRequest(name=MODEL))),
        "grpc unknown model ready": lambda e: (lambda a: (a[0], getattr(a[1], "ready", None)))(
            e.grpc("ModelReady", pb.ModelReadyRequest(name="nope"))),
        "grpc server metadata fields": lambda e: (lambda a: (a[0], bool(a[1].name), bool(a[1].version)))(
            e.grpc("ServerMetadata", pb.ServerMetadataRequest())),
        "grpc model metadata tensors": lambda e: (lambda a: [(t.name, t.datatype, list(t.shape)) for t in
                                                            [*a[1].inputs, *a[1].outputs]])(
            e.grpc("ModelMetadata", pb.ModelMetadataRequest(name=MODEL))),
        "grpc unknown model metadata": lambda e: _grpc_code(e.grpc("ModelMetadata", pb.ModelMetadataRequest(name="nope"))),
        "grpc model config": lambda e: (lambda c: {"max_batch_size": c.max_batch_size,
                                                   "input": [(t.name, t.data_type, list(t.dims)) for t in c.input],
                                                   "output": [(t.name, t.data_type, list(t.dims)) for t in c.output]})(
            e.grpc("ModelConfig", pb.ModelConfigRequest(name=MODEL))[1].config),
        "grpc infer raw contents": lambda e: _grpc_outputs(e.grpc("ModelInfer", _infer_request(X))),
        "grpc infer typed contents": lambda e: _grpc_outputs(e.grpc("ModelInfer", _infer_request(X, raw=False))),
        "grpc infer batch 4": lambda e: _grpc_outputs(e.grpc("ModelInfer", _infer_request(X4))),
        "grpc requested output by name": lambda e: _grpc_outputs(e.grpc("ModelInfer", _infer_request(X, outputs=["output"]))),
        "grpc request id echoed": lambda e: _grpc_outputs(e.grpc("ModelInfer", _infer_request(X, request_id="req-7"))),
        "grpc unknown model": lambda e: _grpc_code(e.grpc("ModelInfer", _infer_request(X, model="nope"))),
        "grpc unknown input": lambda e: _grpc_code(e.grpc("ModelInfer", _infer_request(X, name="y"))),
        "grpc unknown output": lambda e: _grpc_code(e.grpc("ModelInfer", _infer_request(X, outputs=["nope"]))),
        "grpc wrong datatype": lambda e: _grpc_code(e.grpc("ModelInfer", _infer_request(
            X, datatype="FP64", data=X.astype(np.float64).tobytes()))),
        "grpc wrong shape": lambda e: _grpc_code(e.grpc("ModelInfer", _infer_request(X, shape=[1, 3, 8, 32]))),
        "grpc raw contents too short": lambda e: _grpc_code(e.grpc("ModelInfer", _infer_request(X, data=X.tobytes()[:-8]))),
        "grpc typed contents too short": lambda e: _grpc_code(e.grpc("ModelInfer", _infer_request(
            X, raw=False, shape=[2, 3, 16, 16]))),
        "grpc batch above max_batch_size": lambda e: _grpc_code(e.grpc("ModelInfer", _infer_request(
            np.zeros((9, 3, 16, 16), np.float32)))),
        "grpc no inputs": lambda e: _grpc_code(e.grpc("ModelInfer", pb.ModelInferRequest(model_name=MODEL))),
        "grpc all-models stats": lambda e: (lambda a: a[0] if a[0] != "OK" else [
            (x.name, x.version == _version(e)) for x in a[1].model_stats if x.name == MODEL])(
            e.grpc("ModelStatistics", pb.ModelStatisticsRequest())),
        "grpc repository index": lambda e: (lambda a: a[0] if a[0] != "OK" else [
            (x.name, x.version == _version(e), x.state) for x in a[1].models if x.name == MODEL])(
            e.grpc("RepositoryIndex", pb.RepositoryIndexRequest())),
        "grpc stats after a batch-4 request": lambda e: _stats_delta(
            e, lambda: e.grpc("ModelInfer", _infer_request(X4)), lambda: _grpc_stats(e)),
        "grpc health (server)": lambda e: _health(e),
        "grpc health (unknown service)": lambda e: _health(e, "nope"),
    }
    return cases


def _picked(answer: tuple, pick: Callable[[Any], Any]) -> Any:
    """``pick`` of a 200 answer's JSON body; else its status, or what could not be read."""
    status, body = answer[0], answer[2]
    if status != 200:
        return status
    try:
        return pick(json.loads(body))
    except (ValueError, KeyError, TypeError) as exc:
        return f"unreadable ({type(exc).__name__}): {body[:200]!r}"


def _version(endpoint: Endpoint) -> str:
    return json.loads(endpoint.http("GET", f"/v2/models/{MODEL}")[2])["versions"][0]


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def test_triton_and_ours_answer_alike(endpoints):
    rows, unexpected = [], []
    for name, case in _cases().items():
        triton, ours = case(endpoints["triton"]), case(endpoints["ours"])
        same = _canonical(triton) == _canonical(ours)
        if same and name in DIFFERENT:
            unexpected.append(f"{name}: now the same as Triton; drop it from DIFFERENT")
        elif not same and name not in DIFFERENT:
            unexpected.append(f"{name}: Triton {_canonical(triton)[:300]} / ours {_canonical(ours)[:300]}")
        rows.append((name, triton, ours, same))
    _report(rows)
    assert len(rows) >= 25
    assert not unexpected, "\n".join(unexpected)


def test_readiness_while_draining(endpoints):
    """SIGTERM to both: readiness goes false at once while inference is still answered (ours for its
    drain delay; Triton until its in-flight work is done)."""
    seen = {}
    for name in ("triton", "ours"):
        endpoint, process = endpoints[name], endpoints["processes"][name]
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        try:
            ready = endpoint.http("GET", "/v2/health/ready")[0]
        except OSError as exc:
            ready = f"{type(exc).__name__}"
        seen[name] = {"http ready": ready, "grpc health": _health(endpoint).get("status", "no answer")}
    _report([(f"while draining: {k}", seen["triton"][k], seen["ours"][k], seen["triton"][k] == seen["ours"][k])
             for k in seen["ours"]], append=True)
    assert seen["ours"] == {"http ready": 503, "grpc health": "NOT_SERVING"}


def _report(rows: list[tuple[str, Any, Any, bool]], append: bool = False) -> None:
    path = os.environ.get("CONFORMANCE_REPORT")
    if not path:
        return
    lines = [] if append else ["| case | Triton | ours | same? |", "|---|---|---|---|"]
    for name, triton, ours, same in rows:
        cell = (lambda v: _canonical(v).replace("|", "\\|")[:160])
        lines.append(f"| {name} | {cell(triton)} | {cell(ours)} | {'same' if same else 'different: ' + DIFFERENT.get(name, '?')} |")
    with open(Path(path), "a" if append else "w") as handle:
        handle.write("\n".join(lines) + "\n")
