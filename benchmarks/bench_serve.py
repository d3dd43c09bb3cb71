"""``optimize serve`` against its own engine: added latency, batching gain, behaviour at 3x capacity.

Real servers (``optimize serve`` subprocesses) on loopback, driven by the lean keep-alive client of
``optimize bench --url`` (binary tensors) on the same two cores, so the client's own cost is
measured and stated.

1. Overhead: concurrency 1, batch 1, server p50/p99 against the same engine's in-process p50 in
   the same run (9 interleaved rounds), for the digits CNN (``ort-fp32``, 8x8 input) and
   ResNet-18 ``ort-int8``.
2. Batching gain: closed loop at concurrency 16, batching on (``--max-batch 8``) against off
   (``--max-batch 1``), both servers up, rounds interleaved; digits CNN and ResNet-50.
3. Overload: an open loop at 3x the measured capacity (ResNet-18 ``ort-int8``, queue of 32):
   how many requests are rejected, how fast a 503 comes back, and the server's memory over the run.

    python -m benchmarks.bench_serve [--duration 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.common import environment, markdown_table, write_results
from optimize.bench.http_runner import HttpRunner
from optimize.bench.load import LoadPlan, closed_loop, open_loop
from optimize.bench.run import BenchConfig, run_bench, tiled_feeds
from optimize.bundle import read_manifest
from optimize.build.pipeline import run_build
from optimize.build.plan import BuildPlan, DataConfig, SourceConfig
from optimize.targets.base import RunnerConfig
from optimize.tune.search import ServerUnderTest, free_port  # noqa: F401 (free_port: the other benchmarks' import)


class ServerProcess(ServerUnderTest):
    """``optimize serve`` of ``target`` with ``flags``, ready; ``rss_mb`` reads its memory."""

    def __init__(self, bundle: Path, target: str, *flags: str):
        super().__init__(bundle, target, *flags)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")



def build(work: Path, kind: str, targets: tuple[str, ...]) -> Path:
    if kind == "digits":
        from models.digits import make_checkpoint

        make_checkpoint(work)
        source = SourceConfig(work / "digits.pt", "models.digits:DigitsNet")
        data = DataConfig(calib=str(work / "digits_calib.npz"))
    else:
        from models.resnet import make_checkpoint

        depth = int(kind[len("resnet"):])
        make_checkpoint(work, depth, calib_samples=64)
        source = SourceConfig(work / f"resnet{depth}.pt", f"models.resnet:resnet{depth}")
        data = DataConfig(calib=str(work / "resnet_calib.npz"), held_out_fraction=0.25)
    plan = BuildPlan(source=source, out=work / "bundle", targets=targets, data=data, runner=RunnerConfig(threads=2))
    return run_build(plan).bundle


def client_for(bundle: Path, url: str) -> tuple[HttpRunner, dict[str, np.ndarray]]:
    manifest = read_manifest(bundle)
    inputs = list(manifest.inputs)
    runner = HttpRunner(url, manifest.model_name, inputs, manifest.output_names)
    held = np.load(bundle / "data" / "heldout.npz")
    return runner, tiled_feeds({s.name: held[s.name] for s in inputs}, inputs, 1)


def overhead(bundle: Path, target: str, rounds: int) -> dict:
    server = ServerProcess(bundle, target)
    try:
        plan = LoadPlan(batch_sizes=(1,), concurrency=(1,), rates=(), rate_fractions=(), duration_s=2.0 * rounds,
                        rounds=rounds)
        report = run_bench(bundle, BenchConfig(plan=plan, targets=(target,), torch_baseline=False, cross_check=False,
                                               url=server.url), progress=False)
    finally:
        server.stop()
    engine = {p["load"]: p for p in report["engines"][target]["points"]}
    served = {p["load"]: p for p in report["engines"]["server"]["points"]}
    return {"target": target, "client_overhead_ms": report["server"]["client_overhead_ms"],
            "engine": engine, "server": served, "added": report["server"]["added_latency"]}


def batching_gain(bundle: Path, target: str, duration: float, rounds: int) -> dict:
    servers = {"on": ServerProcess(bundle, target, "--max-batch", "8"),
               "off": ServerProcess(bundle, target, "--max-batch", "1")}
    rates: dict[str, list[float]] = {"on": [], "off": []}
    p50: dict[str, list[float]] = {"on": [], "off": []}
    try:
        clients = {name: client_for(bundle, s.url) for name, s in servers.items()}
        for _ in range(rounds):
            for name, (client, feeds) in clients.items():
                point = closed_loop(lambda batch, c=client, f=feeds: c.infer(f), 16, duration)
                summary = point.summary()
                rates[name].append(summary["requests_per_s"])
                p50[name].append(summary["p50_ms"])
    finally:
        for server in servers.values():
            server.stop()
    ratio = [a / b for a, b in zip(rates["on"], rates["off"])]
    return {"target": target, "requests_per_s": rates, "p50_ms": p50, "gain_per_round": ratio,
            "gain": float(np.median(ratio))}


def overload(bundle: Path, target: str, capacity: float, duration: float) -> dict:
    server = ServerProcess(bundle, target, "--queue-capacity", "32")
    rejected_s: list[float] = []
    memory: list[float] = []
    lock = threading.Lock()
    running = threading.Event()
    running.set()

    def sample() -> None:
        while running.is_set():
            memory.append(server.rss_mb())
            time.sleep(0.25)

    try:
        client, feeds = client_for(bundle, server.url)
        for _ in range(20):
            client.infer(feeds)
        before = server.rss_mb()

        def send(batch: int) -> None:
            start = time.perf_counter()
            try:
                client.infer(feeds)
            except RuntimeError as exc:
                if "503" in str(exc):
                    with lock:
                        rejected_s.append(time.perf_counter() - start)
                raise

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        point = open_loop(send, 3 * capacity, duration, max_in_flight=256, seed=1)
        running.clear()
        sampler.join()
        after = server.rss_mb()
        # Still serving afterwards, promptly.
        start = time.perf_counter()
        client.infer(feeds)
        after_ms = (time.perf_counter() - start) * 1000
    finally:
        running.clear()
        server.stop()
    summary = point.summary()
    rejected = np.asarray(rejected_s) * 1000
    return {"target": target, "capacity_rps": capacity, "offered_rps": 3 * capacity, "scheduled": summary["scheduled"],
            "answered": summary["requests"], "rejected_503": len(rejected_s), "errors": summary["errors"],
            "late_sends": summary["late_sends"], "answered_p50_ms": summary["p50_ms"], "answered_p99_ms": summary["p99_ms"],
            "rejection_p50_ms": float(np.median(rejected)) if len(rejected) else None,
            "rejection_p99_ms": float(np.percentile(rejected, 99)) if len(rejected) else None,
            "rss_mb_before": before, "rss_mb_max": max(memory, default=before), "rss_mb_after": after,
            "rss_mb_samples": memory[::4], "first_request_after_ms": after_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--overhead-rounds", type=int, default=9, help="interleaved rounds of the overhead runs")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    bundles = {"digits": build(work / "digits", "digits", ("ort-fp32",)),
               "resnet18": build(work / "resnet18", "resnet18", ("ort-int8",)),
               "resnet50": build(work / "resnet50", "resnet50", ("ort-fp32",))}
    results: dict = {"overhead": {}, "batching": {}}
    results["overhead"]["digits"] = overhead(bundles["digits"], "ort-fp32", args.overhead_rounds)
    results["overhead"]["resnet18"] = overhead(bundles["resnet18"], "ort-int8", args.overhead_rounds)
    results["batching"]["digits"] = batching_gain(bundles["digits"], "ort-fp32", args.duration / 2, args.rounds)
    results["batching"]["resnet50"] = batching_gain(bundles["resnet50"], "ort-fp32", args.duration / 2, args.rounds)
    capacity = results["overhead"]["resnet18"]["server"]["concurrency=1"]["requests_per_s"]
    results["overload"] = overload(bundles["resnet18"], "ort-int8", capacity, 2 * args.duration)

    rows = [["model", "engine p50 ms", "server p50 ms", "added p50 ms", "server p99 ms", "added p99 ms",
             "client cost ms"]]
    for name, o in results["overhead"].items():
        e, s, a = o["engine"]["batch=1"], o["server"]["batch=1"], o["added"]["batch=1"]
        rows.append([f"{name} {o['target']}", f"{e['p50_ms']:.3f}", f"{s['p50_ms']:.3f}", f"{a['p50_ms']:.3f}",
                     f"{s['p99_ms']:.3f}", f"{a['p99_ms']:.3f}", f"{o['client_overhead_ms']:.3f}"])
    gain = [["model", "batching on: req/s per round", "off: req/s per round", "gain (median, range)"]]
    for name, b in results["batching"].items():
        gain.append([f"{name} {b['target']}", ", ".join(f"{v:.0f}" for v in b["requests_per_s"]["on"]),
                     ", ".join(f"{v:.0f}" for v in b["requests_per_s"]["off"]),
                     f"{b['gain']:.2f}x ({min(b['gain_per_round']):.2f}-{max(b['gain_per_round']):.2f})"])
    o = results["overload"]
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    md = ("# optimize serve: overhead, batching, overload\n\n`python -m benchmarks.bench_serve "
          f"--duration {args.duration:g} --rounds {args.rounds} --overhead-rounds {args.overhead_rounds}`; "
          "client and server share the machine's cores.\n\n"
          f"## Added latency at concurrency 1, batch 1 (binary tensors, medians of {args.overhead_rounds} "
          "interleaved rounds)\n\n"
          + markdown_table(rows) + "\nAdded = server minus the same engine in process, measured in the same run. "
          "The client cost (encode a request, decode an answer) is part of the server's numbers.\n\n"
          "## Batching gain at concurrency 16 (closed loop)\n\n" + markdown_table(gain)
          + f"\n## Open loop at 3x capacity ({o['offered_rps']:.0f} req/s offered to a "
          f"{o['capacity_rps']:.0f} req/s server, queue of 32, {2 * args.duration:g} s)\n\n"
          + markdown_table([["scheduled", "answered 200", "rejected 503", "other errors", "503 p50 / p99 ms",
                             "answered p50 / p99 ms", "RSS MB before / max / after", "next request after, ms"],
                            [str(o["scheduled"]), str(o["answered"]), str(o["rejected_503"]),
                             str(o["errors"] - o["rejected_503"]),
                             f"{fmt(o['rejection_p50_ms'])} / {fmt(o['rejection_p99_ms'])}",
                             f"{o['answered_p50_ms']:.1f} / {o['answered_p99_ms']:.1f}",
                             f"{o['rss_mb_before']:.0f} / {o['rss_mb_max']:.0f} / {o['rss_mb_after']:.0f}",
                             f"{o['first_request_after_ms']:.1f}"]]))
    write_results(Path(args.out) / "bench_serve", {**results, "environment": environment()}, md)
    print(md)


if __name__ == "__main__":
    main()
