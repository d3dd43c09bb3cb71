"""``optimize serve`` over HTTP and gRPC against a real Triton (PyTriton) over HTTP and gRPC, each
against the same engine run in process.

For the digits CNN and ResNet-18, both ``ort-int8``: ours and Triton serve the same engine file
(Triton through ONNX Runtime in PyTriton's Python callback, with the thread count the bundle
recorded), the same client code drives both (``optimize bench``'s HTTP client with binary tensors,
its gRPC client with raw contents), and every round measures all five in turn, so a noisy
neighbour disturbs one round of each rather than all of one.

1. Added latency: concurrency 1, batch 1, closed loop; p50 and p99 of each, minus the engine's
   in-process p50/p99 of the same round; medians over rounds and their range.
2. Throughput: closed loop at concurrency 16, requests/s per round.

Needs the PyTriton virtualenv (``.venv-triton``, made by ``scripts/test.sh``).

    python -m benchmarks.serve_vs_triton [--rounds 5] [--duration 3] [--models digits,resnet18]
"""

from __future__ import annotations

import argparse
import http.client
import os
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_serve import ServerProcess, build, free_port
from benchmarks.common import environment, markdown_table, write_results
from optimize.bench.grpc_runner import GrpcRunner
from optimize.bench.http_runner import HttpRunner
from optimize.bench.load import closed_loop
from optimize.bench.run import tiled_feeds
from optimize.bundle import load_runner, read_manifest

ROOT = Path(__file__).resolve().parent.parent
TRITON_PYTHON = ROOT / ".venv-triton" / "bin" / "python"
TARGET = "ort-int8"


class TritonProcess:
    """PyTriton serving one ONNX file under the bundle's model name."""

    def __init__(self, onnx: Path, model: str, threads: int):
        self.port, self.grpc_port = free_port(), free_port()
        self.url, self.grpc_url = f"http://127.0.0.1:{self.port}", f"grpc://127.0.0.1:{self.grpc_port}"
        env = {**os.environ, "LD_LIBRARY_PATH": sysconfig.get_config_var("LIBDIR") or ""}
        self.process = subprocess.Popen([str(TRITON_PYTHON), str(ROOT / "tests" / "fixtures" / "pytriton_onnx.py"),
                                         str(onnx), model, str(self.port), str(self.grpc_port), "8", str(threads)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("Triton exited at start-up")
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                connection.request("GET", f"/v2/models/{model}/ready")
                if connection.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError("Triton did not become ready")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def measure(bundle: Path, rounds: int, duration: float) -> dict:
    manifest = read_manifest(bundle)
    record = manifest.record(TARGET, bundle)
    onnx = bundle / record.folder / next(f for f in record.files if f.endswith(".onnx"))
    threads = manifest.runner_config.threads or 2
    inputs, outputs = list(manifest.inputs), manifest.output_names
    held = np.load(bundle / "data" / "heldout.npz")
    feeds = tiled_feeds({s.name: held[s.name] for s in inputs}, inputs, 1)
    ours = ServerProcess(bundle, TARGET)
    triton = TritonProcess(onnx, manifest.model_name, threads)
    clients = {}
    try:
        with load_runner(bundle, TARGET) as engine:
            clients = {"engine in process": engine,
                       "ours HTTP": HttpRunner(ours.url, manifest.model_name, inputs, outputs),
                       "ours gRPC": GrpcRunner(ours.grpc_url, manifest.model_name, inputs, outputs),
                       "Triton HTTP": HttpRunner(triton.url, manifest.model_name, inputs, outputs),
                       "Triton gRPC": GrpcRunner(triton.grpc_url, manifest.model_name, inputs, outputs)}
            reference = engine.infer(feeds)
            for name, client in clients.items():  # same answers everywhere before timing anything
                got = client.infer(feeds)
                for key, value in reference.items():
                    np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-5, err_msg=name)
            latency = {name: {"p50": [], "p99": []} for name in clients}
            throughput = {name: [] for name in clients if name != "engine in process"}
            for _ in range(rounds):
                for name, client in clients.items():
                    summary = closed_loop(lambda batch, c=client: c.infer(feeds), 1, duration).summary()
                    latency[name]["p50"].append(summary["p50_ms"])
                    latency[name]["p99"].append(summary["p99_ms"])
                for name in throughput:
                    client = clients[name]
                    summary = closed_loop(lambda batch, c=client: c.infer(feeds), 16, duration).summary()
                    throughput[name].append(summary["requests_per_s"])
            client_ms = {name: c.client_overhead_ms(feeds) for name, c in clients.items() if name != "engine in process"}
    finally:
        for name, client in clients.items():
            if name != "engine in process":
                client.close()
        ours.stop()
        triton.stop()
    base = latency["engine in process"]
    added = {name: {q: (np.asarray(v[q]) - np.asarray(base[q])).tolist() for q in ("p50", "p99")}
             for name, v in latency.items() if name != "engine in process"}
    return {"target": TARGET, "input_bytes": int(sum(a.nbytes for a in feeds.values())), "threads": threads,
            "latency_ms": latency, "added_ms": added, "requests_per_s": throughput, "client_overhead_ms": client_ms}


def _median_range(values: list[float]) -> str:
    return f"{np.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per load point per round")
    parser.add_argument("--models", default="digits,resnet18")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if not TRITON_PYTHON.is_file():
        raise SystemExit(f"{TRITON_PYTHON} is missing: scripts/test.sh makes it (pip install nvidia-pytriton)")
    work = Path(tempfile.mkdtemp(prefix="bench-triton-"))
    results = {}
    for name in args.models.split(","):
        bundle = build(work / name, name, (TARGET,))
        results[name] = measure(bundle, args.rounds, args.duration)
    rows = [["model", "front end", "p50 ms", "added p50 ms", "p99 ms", "added p99 ms", "req/s at concurrency 16",
             "client cost ms"]]
    for name, r in results.items():
        e = r["latency_ms"]["engine in process"]
        rows.append([f"{name} ({r['input_bytes'] / 1000:.1f} KB in)", "engine in process", _median_range(e["p50"]), "",
                     _median_range(e["p99"]), "", "", ""])
        for front in r["added_ms"]:
            lat, add = r["latency_ms"][front], r["added_ms"][front]
            rows.append(["", front, _median_range(lat["p50"]), _median_range(add["p50"]), _median_range(lat["p99"]),
                         _median_range(add["p99"]), f"{np.median(r['requests_per_s'][front]):.0f} "
                         f"({min(r['requests_per_s'][front]):.0f}-{max(r['requests_per_s'][front]):.0f})",
                         f"{r['client_overhead_ms'][front]:.3f}"])
    md = ("# optimize serve against Triton (PyTriton), HTTP and gRPC\n\n"
          f"`python -m benchmarks.serve_vs_triton --rounds {args.rounds} --duration {args.duration:g} --models "
          f"{args.models}`; client and servers share the machine's cores; medians of {args.rounds} interleaved "
          "rounds (range).\n\nAdded = the front end's latency minus the same engine's in process, in the same "
          "round. Both servers run the same ONNX Runtime engine file with the bundle's thread count; Triton "
          "runs it in PyTriton's Python callback (its Python-backend path), ours in its batching loop. The "
          "client cost (encode a request, decode an answer, no network) is inside every server number.\n\n"
          + markdown_table(rows))
    write_results(Path(args.out) / "serve_vs_triton", {**results, "environment": environment()}, md)
    print(md)


if __name__ == "__main__":
    main()
