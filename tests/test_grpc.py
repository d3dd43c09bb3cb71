"""``optimize serve``'s gRPC front end as a real process: tritonclient.grpc unchanged, the health
service, status codes, a fuzz of malformed requests, and SIGTERM under keep-alive load on both
protocols without a lost request."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from support import ROOT, wait_for
from support import SERVED, Server, http

pytestmark = pytest.mark.service
grpc = pytest.importorskip("grpc")
from optimize.oip import grpc_service_pb2 as pb, grpc_service_pb2_grpc  # noqa: E402 (after the skip)


@pytest.fixture(scope="module")
def bundle(bundles):
    return bundles.get(*SERVED)


def _stub(server):
    channel = grpc.insecure_channel(server.grpc_url)
    return channel, grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)


def test_the_generated_modules_are_what_the_vendored_protos_compile_to():
    pytest.importorskip("grpc_tools", reason="grpcio-tools is a test dependency (pip install -e '.[test]')")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_grpc.py"), "--check"], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr


def test_tritonclient_grpc_infers_unchanged_raw_and_typed_equal_to_the_engine(server, bundle):
    import tritonclient.grpc as triton

    from optimize.bundle import load_runner

    x = np.random.default_rng(3).standard_normal((3, 3, 16, 16)).astype(np.float32)
    with load_runner(bundle, "ort-fp32") as runner:
        expected = runner.infer({"x": x})["output"]
    client = triton.InferenceServerClient(server.grpc_url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
    assert not client.is_model_ready("nope")
    meta = client.get_model_metadata("tiny", as_json=True)
    assert meta["platform"] == "ort-fp32" and meta["inputs"][0]["shape"] == ["-1", "3", "16", "16"]
    config = client.get_model_config("tiny", as_json=True)["config"]
    assert config["max_batch_size"] == 8 and config["input"][0]["data_type"] == "TYPE_FP32"
    tensor = triton.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    raw = client.infer("tiny", [tensor], outputs=[triton.InferRequestedOutput("output")], request_id="r1")
    np.testing.assert_allclose(raw.as_numpy("output"), expected, rtol=1e-6, atol=1e-6)
    assert raw.get_response().id == "r1"
    request = pb.ModelInferRequest(model_name="tiny")  # typed contents, which tritonclient never sends
    request.inputs.add(name="x", datatype="FP32", shape=x.shape).contents.fp32_contents.extend(x.reshape(-1).tolist())
    channel, stub = _stub(server)
    with channel:
        typed = stub.ModelInfer(request, timeout=30)
    np.testing.assert_allclose(np.frombuffer(typed.raw_output_contents[0], np.float32).reshape(3, 5), expected,
                               rtol=1e-6, atol=1e-6)
    stats = client.get_inference_statistics("tiny", as_json=True)["model_stats"][0]
    assert int(stats["inference_count"]) >= 6
    metrics = http("GET", server.url + "/metrics")[1].decode()
    grpc_ok = [line for line in metrics.splitlines()
               if line.startswith("inference_requests_total{") and 'protocol="grpc"' in line and 'outcome="ok"' in line]
    assert grpc_ok and float(grpc_ok[0].split()[-1]) >= 2


def test_the_health_service_answers_through_the_standard_client(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(server.grpc_url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as unknown:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def _request(**fields):
    tensor = fields.pop("tensor", {"name": "x", "datatype": "FP32", "shape": [1, 3, 16, 16]})
    raw = fields.pop("raw", [np.zeros((1, 3, 16, 16), np.float32).tobytes()])
    request = pb.ModelInferRequest(model_name=fields.pop("model", "tiny"), **fields)
    if tensor is not None:
        request.inputs.add(**tensor)
    request.raw_input_contents.extend(raw)
    return request


@pytest.mark.parametrize("fields, code, says", [
    ({"model": "nope"}, "NOT_FOUND", "model 'nope' is not served here"),
    ({"model_version": "7"}, "NOT_FOUND", "has no version '7'"),
    ({"tensor": {"name": "x", "datatype": "FP32", "shape": [1, 3, 8, 32]}}, "INVALID_ARGUMENT",
     "input 'x' has shape [1, 3, 8, 32] but the model expects [-1, 3, 16, 16]"),
    ({"tensor": {"name": "x", "datatype": "FP16", "shape": [1, 3, 16, 16]}, "raw": []}, "INVALID_ARGUMENT",
     "FP16 has no typed contents field; send it in raw_input_contents"),
    ({"raw": [b"\0" * 12]}, "INVALID_ARGUMENT", "12 bytes of binary data but shape [1, 3, 16, 16] of FP32 needs 3072"),
    ({"raw": [b"", b""]}, "INVALID_ARGUMENT", "2 raw_input_contents for 1 inputs"),
    ({"raw": [np.zeros((1 << 20) // 4 + 1, np.float32).tobytes()]}, "RESOURCE_EXHAUSTED", ""),
])
def test_mistakes_get_triton_s_status_code_and_a_message_naming_the_problem(server, fields, code, says):
    channel, stub = _stub(server)
    with channel, pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(_request(**fields), timeout=30)
    assert error.value.code().name == code and says in error.value.details(), error.value.details()


def test_a_full_queue_is_unavailable_at_once_as_triton_answers(slow_bundle):
    x = np.zeros((1, 3, 192, 192), np.float32)
    codes = []
    with Server(slow_bundle, "--queue-capacity", "1", "--max-batch", "1", "--drain-delay", "0") as running:
        channel, stub = _stub(running)

        def hammer():
            for _ in range(10):
                try:
                    stub.ModelInfer(_request(tensor={"name": "x", "datatype": "FP32", "shape": list(x.shape)},
                                             raw=[x.tobytes()]), timeout=30)
                    codes.append(("OK", ""))
                except grpc.RpcError as exc:
                    codes.append((exc.code().name, exc.details()))

        threads = [threading.Thread(target=hammer) for _ in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        channel.close()
        assert {c for c, _ in codes} == {"OK", "UNAVAILABLE"}, codes
        assert all("overloaded" in d for c, d in codes if c == "UNAVAILABLE")
        metrics = http("GET", running.url + "/metrics")[1].decode()
        rejected = sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(
            "inference_requests_total{") and 'protocol="grpc"' in line and 'outcome="rejected"' in line)
        assert rejected == sum(c == "UNAVAILABLE" for c, _ in codes)


def test_a_fuzz_of_malformed_requests_gets_no_internal_error_and_the_server_keeps_serving(server):
    """Random datatypes, shapes, contents of the wrong kind or length, unknown names, huge shapes."""
    rng = np.random.default_rng(11)
    datatypes = ["FP32", "FP16", "FP64", "INT8", "INT64", "UINT8", "BOOL", "BYTES", "BF16", "fp32", "", "X" * 40]
    fields = ["fp32_contents", "int_contents", "int64_contents", "bool_contents", "bytes_contents", "uint_contents"]
    codes: dict[str, int] = {}
    channel, stub = _stub(server)
    sent = 0
    with channel:
        for _ in range(600):
            request = pb.ModelInferRequest(model_name=str(rng.choice(["tiny", "tiny", "nope", ""])))
            for _ in range(int(rng.integers(0, 3))):
                rank = int(rng.integers(0, 6))
                shape = [int(rng.choice([-3, 0, 1, 3, 16, 1 << 40])) for _ in range(rank)]
                tensor = request.inputs.add(name=str(rng.choice(["x", "y", ""])), datatype=str(rng.choice(datatypes)),
                                            shape=shape)
                if rng.random() < 0.5:
                    size = int(rng.integers(0, 4000))
                    request.raw_input_contents.append(rng.bytes(size))
                else:
                    field = str(rng.choice(fields))
                    count = int(rng.integers(0, 800))
                    values = getattr(tensor.contents, field)
                    if field == "bytes_contents":
                        values.extend(rng.bytes(3) for _ in range(count))
                    elif field == "bool_contents":
                        values.extend(bool(v) for v in rng.integers(0, 2, count))
                    elif field == "fp32_contents":
                        values.extend(rng.standard_normal(count).tolist())
                    else:
                        values.extend(int(v) for v in rng.integers(0, 100, count))
            if rng.random() < 0.2:
                request.outputs.add(name=str(rng.choice(["output", "nope"])))
            sent += 1
            try:
                stub.ModelInfer(request, timeout=30)
                codes["OK"] = codes.get("OK", 0) + 1
            except grpc.RpcError as exc:
                codes[exc.code().name] = codes.get(exc.code().name, 0) + 1
    print(f"gRPC fuzz: {sent} requests, answers {codes}")
    assert not {"INTERNAL", "UNKNOWN", "UNAVAILABLE"} & set(codes), codes
    assert server.process.poll() is None
    import tritonclient.grpc as triton

    assert triton.InferenceServerClient(server.grpc_url).is_server_ready()


class KeepAliveLoad:
    """Clients, each on one keep-alive connection (HTTP) or one channel (gRPC), sending until told
    to stop. A request whose bytes went out on an open connection and got no answer is *lost*;
    a refused connection (the listener closed) is not."""

    def __init__(self, server, protocol: str, clients: int = 8):
        self.server, self.protocol = server, protocol
        self.answered, self.lost, self.refused, self.rejected = [], [], 0, 0
        self.first_resets: list[float] = []  # when a fresh connection's first request was reset (HTTP)
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client) for _ in range(clients)]
        for thread in self.threads:
            thread.start()

    def _client(self) -> None:
        if self.protocol == "http":
            self._http_client()
        else:
            self._grpc_client()

    def _http_client(self) -> None:
        import http.client
        import json

        x = np.zeros((1, 3, 16, 16), np.float32)
        header = json.dumps({"inputs": [{"name": "x", "shape": [1, 3, 16, 16], "datatype": "FP32",
                                         "parameters": {"binary_data_size": x.nbytes}}]}).encode()
        headers = {"Inference-Header-Content-Length": str(len(header))}
        connection, used = None, 0
        while not self.stopping.is_set():
            if connection is None:
                used = 0
                connection = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=30)
                try:
                    connection.connect()
                except (ConnectionRefusedError, ConnectionResetError):  # the listener closed under the connect
                    with self.lock:
                        self.refused += 1
                    connection = None
                    time.sleep(0.01)
                    continue
            try:
                connection.request("POST", "/v2/models/tiny/infer", header + x.tobytes(), headers)
                response = connection.getresponse()
                response.read()
                used += 1
                with self.lock:
                    if response.status == 503:  # the drain's answer from the accept queue
                        self.rejected += 1
                    else:
                        self.answered.append(time.monotonic())
                if response.getheader("connection", "").lower() == "close":
                    connection.close()
                    connection = None
            except (OSError, http.client.HTTPException) as exc:
                with self.lock:
                    self.lost.append(f"{type(exc).__name__}: {exc} (request {used + 1} of its connection)")
                    if used == 0 and isinstance(exc, ConnectionResetError):
                        self.first_resets.append(time.monotonic())
                connection.close()
                connection = None

    def _grpc_client(self) -> None:
        x = np.zeros((1, 3, 16, 16), np.float32)
        channel, stub = _stub(self.server)
        request = _request(raw=[x.tobytes()])
        with channel:
            while not self.stopping.is_set():
                try:
                    stub.ModelInfer(request, timeout=30)
                    with self.lock:
                        self.answered.append(time.monotonic())
                except grpc.RpcError as exc:
                    details = exc.details() or ""
                    with self.lock:
                        if exc.code() == grpc.StatusCode.UNAVAILABLE and (
                                "connect" in details.lower() or "refused" in details.lower()):
                            self.refused += 1
                        elif exc.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in details:
                            self.rejected += 1  # an answer: go elsewhere
                        else:
                            self.lost.append(f"{exc.code().name}: {details}")
                    time.sleep(0.01)

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=60)


CLOSE_WINDOW_S = 1.5  # from the drain's close of the listener to the process's exit: its last answers


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_sigterm_under_keep_alive_load_loses_no_request(bundle, protocol):
    load = None
    with Server(bundle, "--target", "ort-fp32", "--drain-delay", "2", "--grace", "10") as running:
        try:
            load = KeepAliveLoad(running, protocol)
            wait_for(lambda: len(load.answered) > 200, 30, "the load to get going")
            signalled = time.monotonic()
            running.process.send_signal(signal.SIGTERM)
            assert running.process.wait(timeout=60) == 0
            exited = time.monotonic()
            time.sleep(0.3)
            load.stop()
            before = sum(t < signalled for t in load.answered)
            after = len(load.answered) - before
            print(f"SIGTERM under {protocol} load: {before} answered before, {after} after, {len(load.lost)} lost, "
                  f"{load.refused} refused connections, {load.rejected} answered UNAVAILABLE (shutting down)")
            print("lost:", load.lost)
            log = running.process.stderr.read()
            if protocol == "http":
                # Connections still in the kernel's accept queue are answered 503, not reset. Only a
                # connection whose handshake completes between the drain's last accept and its close (the
                # drain's end, just before the process exits) is reset unread: refused, as at connect.
                closing = sum(t >= exited - CLOSE_WINDOW_S for t in load.first_resets)
                lost = load.lost[:]
                for _ in range(closing):
                    lost.remove(next(x for x in lost if x.startswith("ConnectionResetError") and "(request 1 " in x))
                assert not lost, lost[:5]
                assert "closing 0 idle connection(s)" in log, log[-2000:]
            else:
                # grpc's shutdown cancels the calls it has received but not yet handed to a handler; with
                # clients that keep sending after UNAVAILABLE, a few are in that state when it starts.
                cancelled = [x for x in load.lost if x.startswith("CANCELLED")]
                assert len(cancelled) == len(load.lost) and len(cancelled) <= after / 100, load.lost
            assert after > 100  # the drain delay kept answering
        finally:
            if load is not None:
                load.stop()


def test_bench_drives_the_grpc_endpoint_with_the_same_loads(server, bundles, tmp_path):
    import json

    from support import run_cli

    bundle = bundles.copy(tmp_path / "bundle", *SERVED)  # bench writes its report into the bundle
    result = run_cli("bench", bundle, "--url", f"grpc://{server.grpc_url}", "--target", "ort-fp32", "--no-torch",
                     "--no-cross-check", "--duration", "0.5s", "--batch-sizes", "1,4", "--concurrency", "1,2",
                     "--rate", "50", "--rounds", "1")
    assert result.returncode == 0, result.stderr
    report = json.loads((bundle / "bench" / "report.json").read_text())
    settings = report["engines"]["server"]["settings"]
    assert settings["backend"] == "grpc" and settings["platform"] == "ort-fp32"
    assert [p["load"] for p in report["engines"]["server"]["points"]] == [
        "batch=1", "batch=4", "concurrency=1", "concurrency=2", "rate=50"]
    assert report["server"]["added_latency"]["batch=1"]["p50_ms"] > 0
    missing = run_cli("bench", bundle, "--url", "grpc://127.0.0.1:1", "--no-torch", "--no-cross-check")
    assert missing.returncode != 0 and "no gRPC server at 127.0.0.1:1" in missing.stderr
    assert "Traceback" not in missing.stderr
