"""Triton's own load generator, perf_analyzer, against ``optimize serve`` and against PyTriton's real
Triton serving the same ONNX file, over HTTP and gRPC, at concurrency 1 and 8, with real inputs
(``optimize export perf-data``: held-out samples), interleaved.

For the digits CNN and ResNet-18, both ``ort-int8``: each round runs perf_analyzer once per server,
protocol and concurrency, in turn, so a noisy neighbour disturbs one round of each rather than all
of one. perf_analyzer's own numbers are reported (throughput, p50 and p99 from its CSV); medians
over rounds with their range. The engine's in-process p50 at batch 1 is measured in the same run,
so the server's added latency is ours minus it. The server's stderr is checked for warnings, and
the same perf_analyzer with its default random data (NaN, infinities) is run once against ours.

    python -m benchmarks.perf_analyzer_vs_triton [--rounds 3] [--models digits,resnet18]
        [--bundle digits=PATH ...]     # reuse built bundles (ort-int8)
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_serve import ServerProcess, build
from benchmarks.common import environment, markdown_table, write_results
from benchmarks.serve_vs_triton import TARGET, TRITON_PYTHON, TritonProcess
from optimize.bench.run import tiled_feeds
from optimize.bundle import load_runner, read_manifest
from optimize.deploy.perf_data import write_perf_data

ROOT = Path(__file__).resolve().parent.parent
PERF = Path(sys.executable).parent / "perf_analyzer"
LIB = ROOT / ".venv-perf" / "nvidia" / "cuda_runtime" / "lib"


def perf_analyzer(model: str, url: str, protocol: str, concurrency: int, data: Path | None, out: Path) -> dict:
    env = {**os.environ, "LD_LIBRARY_PATH": f"{LIB}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    args = [str(PERF), "-m", model, "-u", url, "-i", protocol, "--concurrency-range", str(concurrency),
            "--measurement-interval", "2000", "--stability-percentage", "25", "--max-trials", "6", "-f", str(out)]
    if data is not None:
        args += ["--input-data", str(data)]
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    if result.returncode != 0 or not out.is_file():
        return {"error": (result.stdout + result.stderr).strip().splitlines()[-1]}
    row = next(csv.DictReader(out.open()))
    return {"throughput_per_s": float(row["Inferences/Second"]), "p50_ms": float(row["p50 latency"]) / 1000,
            "p99_ms": float(row["p99 latency"]) / 1000, "server_queue_us": float(row.get("Server Queue") or 0),
            "server_compute_us": float(row.get("Server Compute Infer") or 0)}


def engine_p50_ms(bundle: Path, seconds: float = 3.0) -> float:
    manifest = read_manifest(bundle)
    held = np.load(bundle / "data" / "heldout.npz")
    feeds = tiled_feeds({s.name: held[s.name] for s in manifest.inputs}, list(manifest.inputs), 1)
    with load_runner(bundle, TARGET) as engine:
        times, end = [], time.perf_counter() + seconds
        while time.perf_counter() < end:
            start = time.perf_counter()
            engine.infer(feeds)
            times.append(time.perf_counter() - start)
    return float(np.median(times[len(times) // 10:]) * 1000)


def measure(bundle: Path, rounds: int, work: Path) -> dict:
    manifest = read_manifest(bundle)
    record = manifest.record(TARGET, bundle)
    onnx = bundle / record.folder / next(f for f in record.files if f.endswith(".onnx"))
    threads = manifest.runner_config.threads or 2
    data = work / f"{manifest.model_name}-perf.json"
    write_perf_data(bundle, data, rows=64)
    ours = ServerProcess(bundle, TARGET, "--untuned")
    triton = TritonProcess(onnx, manifest.model_name, threads)
    servers = {"optimize serve": ours, "Triton (PyTriton)": triton}
    cells = [(server, protocol, c) for c in (1, 8) for protocol in ("http", "grpc") for server in servers]
    results: dict = {f"{s} {p} c{c}": [] for s, p, c in cells}
    engine = []
    try:
        for round_ in range(rounds):
            engine.append(engine_p50_ms(bundle))
            for server, protocol, c in cells:
                process = servers[server]
                url = (process.url if protocol == "http" else process.grpc_url).split("://", 1)[1]
                got = perf_analyzer(manifest.model_name, url, protocol, c, data, work / f"r{round_}.csv")
                results[f"{server} {protocol} c{c}"].append(got)
                print(server, protocol, c, got, flush=True)
        noise = perf_analyzer(manifest.model_name, ours.url.split("://", 1)[1], "http", 1, None, work / "noise.csv")
    finally:
        ours.stop()
        triton.stop()
    stderr = ours.stderr_text()
    warnings = [line for line in stderr.splitlines() if "Warning" in line or "Traceback" in line]
    return {"target": TARGET, "threads": threads, "engine_p50_ms": engine, "cells": results,
            "random_data_run": noise, "server_warning_lines": warnings,
            "server_non_finite_notice": any("NaN or infinite input" in line for line in stderr.splitlines())}


def _mr(values: list[float], digits: int = 2) -> str:
    return f"{np.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default="digits,resnet18")
    parser.add_argument("--bundle", action="append", default=[], help="NAME=PATH of an ort-int8 bundle to reuse")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if not TRITON_PYTHON.is_file() or not PERF.is_file():
        raise SystemExit("needs .venv-triton (PyTriton) and perf_analyzer with .venv-perf: run scripts/test.sh first")
    given = dict(item.split("=", 1) for item in args.bundle)
    work = Path(tempfile.mkdtemp(prefix="bench-perf-"))
    results = {}
    for name in args.models.split(","):
        bundle = Path(given[name]) if name in given else build(work / name, name, (TARGET,))
        results[name] = measure(bundle, args.rounds, work)
    rows = [["model", "server", "protocol", "concurrency", "inferences/s", "p50 ms", "p99 ms"]]
    for name, r in results.items():
        for key, values in r["cells"].items():
            server, protocol, c = key.rsplit(" ", 2)
            ok = [v for v in values if "error" not in v]
            if not ok:
                rows.append([name, server, protocol, c[1:], values[0]["error"], "", ""])
                continue
            rows.append([name, server, protocol.upper(), c[1:], _mr([v["throughput_per_s"] for v in ok], 0),
                         _mr([v["p50_ms"] for v in ok]), _mr([v["p99_ms"] for v in ok])])
    lines = []
    for name, r in results.items():
        ours = [v["p50_ms"] for v in r["cells"]["optimize serve http c1"] if "error" not in v]
        theirs = [v["p50_ms"] for v in r["cells"]["Triton (PyTriton) http c1"] if "error" not in v]
        if ours and theirs:
            lines.append(f"- {name}: engine in process p50 {_mr(r['engine_p50_ms'], 3)} ms; over HTTP at concurrency "
                         f"1 ours adds {np.median(ours) - np.median(r['engine_p50_ms']):.3f} ms (p50), Triton "
                         f"{np.median(theirs) - np.median(r['engine_p50_ms']):.3f} ms; ours is "
                         f"{np.median(theirs) / np.median(ours):.2f}x faster at p50.")
        noise = r["random_data_run"]
        lines.append(f"- {name}: perf_analyzer's default random data against ours: "
                     + (f"{noise['throughput_per_s']:.0f}/s, p99 {noise['p99_ms']:.2f} ms" if "error" not in noise
                        else noise["error"])
                     + f"; server warnings on stderr: {len(r['server_warning_lines'])}; the one-time NaN/inf notice "
                       f"{'logged' if r['server_non_finite_notice'] else 'not logged'}.")
    from optimize.cpu import detect

    env = environment()
    md = ("# perf_analyzer against optimize serve and Triton (PyTriton), HTTP and gRPC\n\n"
          f"`python -m benchmarks.perf_analyzer_vs_triton --rounds {args.rounds} --models {args.models}` on "
          f"{detect().summary()}; perf_analyzer, both servers and nothing else share the "
          f"machine's cores. Real inputs (optimize export perf-data: 64 held-out samples); perf_analyzer's "
          f"--measurement-interval 2000 --stability-percentage 25 --max-trials 6; medians of {args.rounds} "
          "interleaved rounds (range). Both servers run the same ONNX Runtime engine file with the bundle's "
          "thread count, batches up to 8, no batching delay; Triton in PyTriton's Python callback (its "
          "Python-backend path), ours with --untuned.\n\n" + markdown_table(rows) + "\n\n" + "\n".join(lines) + "\n")
    write_results(Path(args.out) / "perf_analyzer_vs_triton", {**results, "environment": env}, md)
    print(md)


if __name__ == "__main__":
    main()
