"""``optimize serve`` as a real process on loopback: the protocol, tritonclient, errors, metrics, SIGTERM."""

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from support import SERVED, Server, binary_body, http, infer_body, run_cli, run_process, wait_for

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def bundle(bundles):
    return bundles.get(*SERVED)




def test_metadata_health_config_and_stats(server):
    assert http("GET", server.url + "/v2/health/live")[0] == 200
    status, body, _ = http("GET", server.url + "/v2")
    assert status == 200 and "binary_tensor_data" in json.loads(body)["extensions"]
    meta = json.loads(http("GET", server.url + "/v2/models/tiny")[1])
    assert meta["platform"] == "ort-fp32" and meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3, 16, 16]}]
    version = meta["versions"][0]
    assert http("GET", f"{server.url}/v2/models/tiny/versions/{version}/ready")[0] == 200
    config = json.loads(http("GET", server.url + "/v2/models/tiny/config")[1])
    assert config["max_batch_size"] == 8 and config["input"][0]["dims"] == [3, 16, 16]
    stats = json.loads(http("GET", server.url + "/v2/models/tiny/stats")[1])
    assert stats["model_stats"][0]["name"] == "tiny"


def test_stats_follow_tritons_definitions_and_the_access_log_is_json_lines(bundle):
    """A fresh server: one batch-4 request adds 4 inferences, 1 execution, 1 request to every phase."""
    with Server(bundle, "--target", "ort-fp32", "--access-log") as running:
        before = json.loads(http("GET", running.url + "/v2/models/tiny/stats")[1])["model_stats"][0]
        assert before["inference_count"] == 0 and before["execution_count"] == 0  # warm-up is not counted
        x = np.load(bundle / "data" / "heldout.npz")["x"][:4]
        assert http("POST", running.url + "/v2/models/tiny/infer", infer_body(x))[0] == 200
        assert http("POST", running.url + "/v2/models/tiny/infer", infer_body(x[:1], "nope"))[0] == 400
        stats = json.loads(http("GET", running.url + "/v2/models/tiny/stats")[1])["model_stats"][0]
        running.stop()
    log = running.process.stderr.read()
    assert stats["inference_count"] == 4 and stats["execution_count"] == 1
    phases = stats["inference_stats"]
    assert phases["success"]["count"] == 1 and phases["fail"]["count"] == 1
    for name in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert phases[name]["count"] == 1 and phases[name]["ns"] > 0, name
    inside = sum(phases[n]["ns"] for n in ("queue", "compute_input", "compute_infer", "compute_output"))
    assert inside <= phases["success"]["ns"]  # the phases are parts of the request's time
    assert phases["cache_hit"] == {"count": 0, "ns": 0}
    (batch,) = stats["batch_stats"]
    assert batch["batch_size"] == 4 and batch["compute_infer"]["count"] == 1
    assert batch["compute_infer"]["ns"] == phases["compute_infer"]["ns"]
    lines = [json.loads(ln) for ln in log.splitlines() if ln.startswith("{")]
    infer = [ln for ln in lines if ln["route"] == "/v2/models/tiny/infer"]
    assert [(ln["method"], ln["status"]) for ln in infer] == [("POST", 200), ("POST", 400)]
    assert infer[0]["rows"] == 4 and infer[0]["duration_ms"] > 0 and infer[0]["client"] == "127.0.0.1"
    assert "access log: JSON lines on stderr" in log and "serving tiny version" in log


def test_tritonclient_json_and_binary_match_the_engine(server, bundle):
    import tritonclient.http as triton

    from optimize.bundle import load_runner

    x = np.load(bundle / "data" / "heldout.npz")["x"][:3]
    want = load_runner(bundle, "ort-fp32").infer({"x": x})["output"]
    client = triton.InferenceServerClient(server.url[len("http://"):])
    assert client.is_server_ready() and client.is_model_ready("tiny")
    for binary in (False, True):
        tensor = triton.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        result = client.infer("tiny", [tensor], outputs=[triton.InferRequestedOutput("output", binary_data=binary)])
        assert np.allclose(result.as_numpy("output"), want, atol=1e-5), binary


def test_openapi_and_the_server_agree_on_what_is_valid(server):
    from jsonschema import Draft202012Validator
    from openapi_spec_validator import validate

    document = json.loads(http("GET", server.url + "/openapi.json")[1])
    validate(document)  # a valid OpenAPI 3.1 document
    assert "/v2/models/tiny/infer" in document["paths"]
    schema = Draft202012Validator({"$ref": "#/components/schemas/infer_request", "components": document["components"]})
    x = np.zeros((2, 3, 16, 16), np.float32).reshape(-1).tolist()

    def tensor(**changes):
        return {"name": "x", "shape": [2, 3, 16, 16], "datatype": "FP32", "data": x, **changes}

    good = [{"inputs": [tensor()]}, {"inputs": [tensor()], "outputs": [{"name": "output"}]},
            {"inputs": [tensor(shape=[1, 3, 16, 16], data=x[:768])], "outputs": []}]
    bad = {"wrong name": {"inputs": [tensor(name="y")]}, "no inputs": {"inputs": []},
           "extra input": {"inputs": [tensor(), tensor(name="z")]}, "same input twice": {"inputs": [tensor(), tensor()]},
           "wrong datatype": {"inputs": [tensor(datatype="FP64")]},
           "wrong rank": {"inputs": [tensor(shape=[2, 3, 16], data=x[:2 * 3 * 16])]},
           "wrong fixed axis": {"inputs": [tensor(shape=[2, 3, 8, 32])]},
           "batch above max": {"inputs": [tensor(shape=[9, 3, 16, 16], data=[0.0] * 9 * 768)]},
           "empty batch": {"inputs": [tensor(shape=[0, 3, 16, 16], data=[])]},
           "strings for FP32": {"inputs": [tensor(data=["a"] * len(x))]},
           "no data": {"inputs": [{k: v for k, v in tensor().items() if k != "data"}]},
           "unknown output": {"inputs": [tensor()], "outputs": [{"name": "logits"}]},
           "short data": {"inputs": [tensor(data=x[:-1])]},
           "data for another batch": {"inputs": [tensor(shape=[1, 3, 16, 16])]},
           "null parameters": {"inputs": [tensor()], "parameters": None},
           "id not a string": {"inputs": [tensor()], "id": 7},
           "binary_data_output not a flag": {"inputs": [tensor()], "parameters": {"binary_data_output": "yes"}}}
    url = server.url + "/v2/models/tiny/infer"
    for request in good:
        assert schema.is_valid(request)
        assert http("POST", url, json.dumps(request).encode())[0] == 200
    for kind, request in bad.items():
        assert not schema.is_valid(request), kind
        assert http("POST", url, json.dumps(request).encode())[0] == 400, kind
    # Nested lists are accepted as well (the protocol allows them); the schema states the flat form,
    # the one whose element count it can state.
    nested = {"inputs": [tensor(data=[[v] for v in x])]}
    assert not schema.is_valid(nested) and http("POST", url, json.dumps(nested).encode())[0] == 200


@pytest.mark.parametrize("kind", ["model", "missing", "extra", "datatype", "shape", "length", "truncated",
                                  "oversized", "json", "header", "batch"])
def test_bad_requests_get_a_4xx_naming_the_problem(server, kind):
    x = np.zeros((1, 3, 16, 16), np.float32)
    url = server.url + "/v2/models/tiny/infer"
    headers = {}
    body = infer_body(x)
    if kind == "model":
        url = server.url + "/v2/models/other/infer"
    elif kind == "missing":
        body = json.dumps({"inputs": []}).encode()
    elif kind == "extra":
        body = json.dumps({"inputs": json.loads(infer_body(x))["inputs"] * 1 + json.loads(infer_body(x, "y"))["inputs"]}).encode()
    elif kind == "datatype":
        body = infer_body(x.astype(np.int32), datatype="INT32")
    elif kind == "shape":
        body = infer_body(np.zeros((1, 3, 8, 8), np.float32))
    elif kind == "length":
        payload = json.loads(body)
        payload["inputs"][0]["data"] = payload["inputs"][0]["data"][:-1]
        body = json.dumps(payload).encode()
    elif kind == "truncated":
        header = json.dumps({"inputs": [{"name": "x", "shape": [1, 3, 16, 16], "datatype": "FP32",
                                         "parameters": {"binary_data_size": x.nbytes}}]}).encode()
        body = header + x.tobytes()[:100]
        headers = {"Inference-Header-Content-Length": str(len(header))}
    elif kind == "oversized":
        # Declared larger than the limit: answered at once, before the body is sent.
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 2097152\r\n\r\n" + b" " * 1000)
            reply = b""
            while b"larger than the limit" not in reply:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
            reply = reply.decode()
        status_line, _, rest = reply.partition("\r\n")
        assert " 413 " in status_line and "larger than the limit" in rest
        assert http("POST", server.url + "/v2/models/tiny/infer", infer_body(x))[0] == 200
        return
    elif kind == "json":
        body = b"{not json"
    elif kind == "header":
        headers = {"Inference-Header-Content-Length": "99999999"}
    elif kind == "batch":
        body = infer_body(np.zeros((9, 3, 16, 16), np.float32))
    status, raw, _ = http("POST", url, body, headers)
    assert 400 <= status < 500, (kind, status, raw)
    message = json.loads(raw)["error"]
    expected = {"model": "not served here", "missing": "non-empty 'inputs'", "extra": "unknown input",
                "datatype": "expects FP32", "shape": "expects [-1, 3, 16, 16]", "length": "needs 768",
                "truncated": "truncated", "oversized": "larger than the limit", "json": "not valid JSON",
                "header": "outside the body", "batch": "at most 8 rows"}[kind]
    assert expected in message, (kind, message)
    assert http("POST", server.url + "/v2/models/tiny/infer", infer_body(x))[0] == 200


def test_metrics_count_outcomes_and_batches(server):
    """Eight callers at once, ten requests each: the counters move by exactly that (the server is the
    run's shared one, so the test reads what its own requests added). Whether calls shared an engine
    call depends on timing; that batches form is tested with held engines in test_batching."""
    version = json.loads(http("GET", server.url + "/v2/models/tiny")[1])["versions"][0]
    labels = f'model="tiny",version="{version}"'

    def counters() -> tuple[float, float, float, str]:
        text = http("GET", server.url + "/metrics")[1].decode()

        def value(prefix: str) -> float:
            return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(prefix)))

        return (value(f'inference_requests_total{{model="tiny",outcome="ok",protocol="http",version="{version}"}}'),
                value(f'inference_batch_size_count{{{labels}}}'), value(f'inference_batch_size_sum{{{labels}}}'), text)

    ok_before, batches_before, rows_before, _ = counters()
    x = np.zeros((1, 3, 16, 16), np.float32)
    threads = [threading.Thread(target=lambda: [http("POST", server.url + "/v2/models/tiny/infer", infer_body(x))
                                                for _ in range(10)]) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ok_after, batches_after, rows_after, text = counters()
    assert ok_after - ok_before == 80
    assert f'inference_queue_capacity{{{labels}}} 64.0' in text
    content = json.loads(http("GET", server.url + "/v2/models/tiny/config")[1])["parameters"]["content_hash"]
    assert (f'model_info{{bundle="bundle",content_hash="{content["string_value"]}",model="tiny",precision="fp32",'
            f'target="ort-fp32",version="{version}"}} 1.0' in text)
    assert version == str(int(version)) and len(content["string_value"]) == 12  # Triton's decimal; the hash beside it
    assert rows_after - rows_before == 80  # every row went through exactly one engine call
    assert 10 <= batches_after - batches_before <= 80  # at most 8 rows a call (max batch 8), at most one call a row
    for name in ("inference_request_duration_seconds_bucket", "inference_queue_duration_seconds_count",
                 "inference_compute_duration_seconds_sum", "inference_batch_size_bucket", "inference_requests_in_flight"):
        assert name in text


def test_overload_gets_prompt_503_and_sigterm_drains(slow_bundle):
    """With one engine and a queue of one, twelve callers overload the server: some requests are
    rejected, and a rejection does not wait for the busy engine (the median 503 comes back before the
    median answer); then SIGTERM turns readiness false and drains. How fast a 503 is, is measured in
    ``benchmarks/bench_serve.py``, not here."""
    x = np.random.default_rng(0).standard_normal((1, 3, 192, 192)).astype(np.float32)
    body, headers = binary_body(x)  # binary tensors: decoding the request costs next to nothing
    statuses = []

    def hammer():
        for _ in range(15):
            started = time.perf_counter()
            status = http("POST", running.url + "/v2/models/tiny/infer", body, headers)[0]
            statuses.append((status, time.perf_counter() - started))

    with Server(slow_bundle, "--queue-capacity", "1", "--max-batch", "1", "--drain-delay", "1", "--grace", "10") as running:
        threads = [threading.Thread(target=hammer) for _ in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert {s for s, _ in statuses} <= {200, 503}, statuses
        rejected = [t for s, t in statuses if s == 503]
        answered = [t for s, t in statuses if s == 200]
        assert rejected and answered, f"{len(rejected)} rejected, {len(answered)} answered"
        print(f"{len(rejected)} rejected in at most {max(rejected):.3f} s (median {np.median(rejected):.3f}); "
              f"{len(answered)} answered, median {np.median(answered):.3f} s")
        assert np.median(rejected) < np.median(answered), (np.median(rejected), np.median(answered))
        metrics = http("GET", running.url + "/metrics")[1].decode()
        counted = sum(float(line.split()[-1]) for line in metrics.splitlines()
                      if line.startswith("inference_requests_total{") and 'outcome="rejected"' in line)
        assert counted == len(rejected)
        running.process.send_signal(signal.SIGTERM)
        wait_for(lambda: http("GET", running.url + "/v2/health/ready")[0] == 503, 5, "readiness to turn false")
        assert http("POST", running.url + "/v2/models/tiny/infer", body, headers)[0] == 200  # still served while draining
        assert running.process.wait(timeout=30) == 0


def test_bench_drives_the_server_with_the_same_loads(server, bundles, tmp_path):
    from optimize.bundle import read_manifest
    from serve.model import content_hash

    bundle = bundles.copy(tmp_path / "bundle", *SERVED)  # bench writes its report into the bundle
    before = read_manifest(bundle)
    version = content_hash(bundle, before, "ort-fp32")
    result = run_cli("bench", bundle, "--url", server.url, "--target", "ort-fp32", "--no-torch", "--no-cross-check",
                     "--duration", "0.5s", "--batch-sizes", "1,4", "--concurrency", "1,2", "--rate", "50", "--rounds", "1")
    assert result.returncode == 0, result.stderr
    report = json.loads((bundle / "bench" / "report.json").read_text())
    assert set(report["engines"]) == {"ort-fp32", "server"}
    loads = [p["load"] for p in report["engines"]["server"]["points"]]
    assert loads == ["batch=1", "batch=4", "concurrency=1", "concurrency=2", "rate=50"]
    assert report["engines"]["server"]["settings"]["platform"] == "ort-fp32"
    added = report["server"]["added_latency"]["batch=1"]
    assert added["p50_ms"] > 0 and report["server"]["client_overhead_ms"] > 0
    assert "Server over its own engine" in (bundle / "bench" / "report.md").read_text()
    after = read_manifest(bundle)
    assert after.winner == before.winner and "winner unchanged" in result.stdout and "(--url)" in result.stdout
    assert after.bench["winner_applied"] is False and content_hash(bundle, after, "ort-fp32") == version


def mutations(rng: np.random.Generator, x: np.ndarray):
    """A seeded stream of malformed infer requests: (body, headers), one category after another."""
    good = json.loads(infer_body(x))
    tensor = good["inputs"][0]
    header = json.dumps({"inputs": [{**{k: v for k, v in tensor.items() if k != "data"},
                                     "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    raw = x.tobytes()
    while True:
        kind = int(rng.integers(0, 12))
        body, headers = None, {}
        if kind == 0:  # random bytes
            body = rng.bytes(int(rng.integers(0, 300)))
        elif kind == 1:  # truncated JSON
            text = json.dumps(good).encode()
            body = text[:int(rng.integers(0, len(text) - 1))]
        elif kind == 2:  # wrong types for fields
            field = ["name", "shape", "datatype", "data", "parameters"][int(rng.integers(0, 5))]
            body = json.dumps({"inputs": [{**tensor, field: [None, {}, "x", -1, 1.5][int(rng.integers(0, 5))]}]}).encode()
        elif kind == 3:  # shape with negative, huge or wrong rank
            shape = [[-1, 3, 16, 16], [1, 3, 16], [10**12, 3, 16, 16], [1, 3, 16, 16, 1], []][int(rng.integers(0, 5))]
            body = json.dumps({"inputs": [{**tensor, "shape": shape}]}).encode()
        elif kind == 4:  # data of the wrong length
            cut = int(rng.integers(1, 700))
            body = json.dumps({"inputs": [{**tensor, "data": tensor["data"][:cut]}]}).encode()
        elif kind == 5:  # unknown datatype or a mismatching one
            body = json.dumps({"inputs": [{**tensor, "datatype": ["FP8", "INT64", "BYTES", "fp32"][int(rng.integers(0, 4))]}]}).encode()
        elif kind == 6:  # binary body shorter or longer than declared
            body = header + raw[:int(rng.integers(0, len(raw)))] if rng.random() < 0.5 else header + raw + b"x" * 7
            headers = {"Inference-Header-Content-Length": str(len(header))}
        elif kind == 7:  # header length that lies
            body = header + raw
            headers = {"Inference-Header-Content-Length": str([0, -5, len(body) + 1, 3, "abc"][int(rng.integers(0, 5))])}
        elif kind == 8:  # top level not an object, or inputs not a list
            body = json.dumps([[], "x", 3, {"inputs": {}}, {"inputs": "x"}][int(rng.integers(0, 5))]).encode()
        elif kind == 9:  # non-numeric data
            data = list(tensor["data"])
            data[int(rng.integers(0, len(data)))] = ["a", None, [1, 2], {"v": 1}][int(rng.integers(0, 4))]
            body = json.dumps({"inputs": [{**tensor, "data": data}]}).encode()
        elif kind == 10:  # duplicated or extra inputs, unknown requested outputs
            body = json.dumps({"inputs": [tensor, tensor]} if rng.random() < 0.5 else
                              {"inputs": [tensor], "outputs": [{"name": "nope"}]}).encode()
        else:  # unknown model or route
            yield json.dumps(good).encode(), {}, "/v2/models/" + ["x", "tiny/versions/0", "tiny/../tiny"][int(rng.integers(0, 3))]
            continue
        yield body, headers, None


def test_a_thousand_malformed_requests_get_4xx_and_the_server_keeps_serving(server):
    rng = np.random.default_rng(7)
    x = np.zeros((1, 3, 16, 16), np.float32)
    statuses = {}
    stream = mutations(rng, x)
    for _ in range(1000):
        body, headers, route = next(stream)
        url = server.url + (route + "/infer" if route else "/v2/models/tiny/infer")
        status = http("POST", url, body, headers)[0]
        statuses[status] = statuses.get(status, 0) + 1
        assert status < 500, (status, body[:200], headers)
    assert sum(v for k, v in statuses.items() if 400 <= k < 500) >= 950
    assert http("POST", server.url + "/v2/models/tiny/infer", infer_body(x))[0] == 200
    assert http("GET", server.url + "/v2/health/ready")[0] == 200


def test_the_server_says_what_it_serves_when_ready_and_a_summary_when_it_stops(bundle):
    with Server(bundle, "--target", "ort-fp32") as running:
        x = np.zeros((2, 3, 16, 16), np.float32)
        assert http("POST", running.url + "/v2/models/tiny/infer", infer_body(x))[0] == 200
        assert http("POST", running.url + "/v2/models/tiny/infer", infer_body(x[:, :1]))[0] == 400
        running.stop()
    log = running.process.stderr.read()
    assert "serving tiny version" in log and "target ort-fp32 (fp32) on http://127.0.0.1:" in log
    assert "engine: backend=onnxruntime" in log and "batching: up to 8 rows" in log and "drift: windows of 20 every 20" in log
    assert "ready: serving tiny" in log
    assert "stopped: 2 inference request(s) (1 client_error, 1 ok); answered p50" in log, log


def test_a_second_ctrl_c_stops_at_once_without_a_traceback(bundle):
    with Server(bundle, "--target", "ort-fp32") as running:
        running.process.send_signal(signal.SIGINT)
        running.process.send_signal(signal.SIGINT)
        assert running.process.wait(timeout=60) == 0
    log = running.process.stderr.read()
    assert "Traceback" not in log and "CancelledError" not in log, log


def test_an_impossible_port_is_a_usage_error(bundle):
    """The usage-error family (click's) through a real process: what the console shows, exit 2."""
    result = run_process("serve", bundle, "--port", "99999")
    assert result.returncode == 2 and "99999 is not in the range 1<=x<=65535" in result.stderr


def test_schemathesis_finds_nothing_with_every_check(bundle):
    """Generated requests from /openapi.json (valid and invalid ones, every check schemathesis has):
    no 5xx, valid requests accepted, invalid ones refused, answers as documented (a 405's Allow)."""
    cli = Path(sys.executable).parent / "schemathesis"
    if not cli.is_file():
        pytest.skip("schemathesis is a test dependency (pip install -e '.[test]')")
    with Server(bundle, "--target", "ort-fp32", "--max-batch", "2", "--no-grpc") as running:
        result = subprocess.run([str(cli), "run", running.url + "/openapi.json", "--checks", "all",
                                 "--max-examples", "80", "--seed", "3", "--no-color"],
                                capture_output=True, text=True, timeout=300)
    summary = [line.strip() for line in result.stdout.splitlines() if " generated" in line]
    print(summary)
    assert result.returncode == 0, result.stdout[-4000:]
    generated = int(summary[-1].split()[0])
    assert generated >= 200 and summary[-1] == f"{generated} generated, {generated} passed", summary


def test_a_wrong_method_is_a_405_naming_the_allowed_one(server):
    status, _, headers = http("GET", server.url + "/v2/models/tiny/infer")
    assert status == 405 and {k.lower(): v for k, v in headers.items()}["allow"] == "POST"
    status, body, headers = http("POST", server.url + "/v2/health/ready", b"{}")
    assert status == 405 and {k.lower(): v for k, v in headers.items()}["allow"] == "GET" and "this route takes GET" in json.loads(body)["error"]
    assert http("DELETE", server.url + "/v2/nothing")[0] == 404  # not a route at all: no Allow to give


def _counted(metrics: str, tensor: str) -> float:
    line = next((ln for ln in metrics.splitlines()
                 if ln.startswith("inference_non_finite_samples_total{") and f'tensor="{tensor}"' in ln), None)
    return float(line.rsplit(" ", 1)[1]) if line else 0.0


def test_nan_and_inf_are_counted_answered_in_strict_json_or_refused(server, bundle):
    def strict(raw: bytes):
        def refuse(constant):
            raise AssertionError(f"not strict JSON: {constant}")
        return json.loads(raw, parse_constant=refuse)

    x = np.load(bundle / "data" / "heldout.npz")["x"][:3].copy()
    x[0, 0, 0, 0], x[2, 1, 2, 3] = np.nan, np.inf
    before = http("GET", server.url + "/metrics")[1].decode()
    status, body, _ = http("POST", server.url + "/v2/models/tiny/infer", infer_body(x))  # NaN and Infinity literals
    assert status == 200, body
    (output,) = strict(body)["outputs"]
    missing = sum(v is None for v in output["data"])
    assert missing > 0 and output["parameters"] == {"non_finite": missing}
    assert all(v is not None for v in output["data"][len(output["data"]) // 3:2 * len(output["data"]) // 3])
    raw, headers = binary_body(x)
    status, answer, got = http("POST", server.url + "/v2/models/tiny/infer", raw, headers)
    header = int({k.lower(): v for k, v in got.items()}["inference-header-content-length"])
    values = np.frombuffer(answer[header:], np.float32).reshape(3, -1)
    assert status == 200 and not np.isfinite(values[0]).all() and np.isfinite(values[1]).all()
    after = http("GET", server.url + "/metrics")[1].decode()
    assert _counted(after, "input") - _counted(before, "input") == 4  # two samples, twice
    assert _counted(after, "output") - _counted(before, "output") == 4
    with Server(bundle, "--target", "ort-fp32", "--reject-non-finite", "--no-grpc") as refusing:
        status, body, _ = http("POST", refusing.url + "/v2/models/tiny/infer", infer_body(x))
        assert status == 400 and json.loads(body)["error"] == (
            "input 'x' holds 2 NaN or infinite value(s), first in row 0; this server refuses them (--reject-non-finite)")
        assert http("POST", refusing.url + "/v2/models/tiny/infer", infer_body(x[1:2]))[0] == 200
        assert _counted(http("GET", refusing.url + "/metrics")[1].decode(), "input") == 2
        refusing.stop()
    log = refusing.process.stderr.read()
    assert "NaN or infinite inputs: refused (400)" in log and "a request holds NaN or infinite input values (refused)" in log
