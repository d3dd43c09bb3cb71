"""``optimize bench``: every built target (and torch eager) under the loads of a ``LoadPlan``.

Inputs are the bundle's held-out samples, tiled to each batch size. Every engine runs the same plan;
the batch sweep and closed loops are interleaved across engines in rounds (``LoadPlan.rounds``), so a
noisy neighbour disturbs one round of each rather than all of one. Torch eager FP32 from
``program.pt2`` is the baseline of every ratio.
Rates for the open loop are, unless given, fractions of each engine's measured capacity, so one
plan shows the knee on any machine. Ctrl-C stops cleanly: what was measured is kept and reported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import time
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np

from optimize.quiet import on_terminal
from optimize.bench.load import LoadPlan, LoadPoint, batch_point, closed_loop, merge_rounds, open_loop
from optimize.bundle.folder import read_manifest
from optimize.errors import BundleError
from optimize.bundle.manifest import Manifest
from optimize.inputs.specs import TensorSpec
from optimize.select import LoadSpec, Slo

BASELINE = "torch-eager-fp32"
SERVER = "server"

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    plan: LoadPlan = LoadPlan()
    targets: tuple[str, ...] = ()  # empty: every built target
    torch_baseline: bool = True
    cross_check: bool = True  # OpenVINO's benchmark_app on the same engine files, batch 1
    url: str | None = None  # also drive a running server with the same loads
    model_name: str | None = None  # the server's model name (default: the manifest's)

    def to_json(self) -> dict[str, Any]:
        return {"plan": self.plan.to_json(), "targets": list(self.targets), "torch_baseline": self.torch_baseline,
                "cross_check": self.cross_check, "url": self.url, "model_name": self.model_name}


def tiled_feeds(held: dict[str, np.ndarray], inputs: list[TensorSpec], batch: int) -> dict[str, np.ndarray]:
    """``batch`` held-out samples (repeated when there are fewer), contiguous, per input."""
    count = len(next(iter(held.values())))
    index = np.arange(batch) % count
    return {s.name: np.ascontiguousarray(held[s.name][index]) for s in inputs}


def engines_to_run(manifest: Manifest, wanted: tuple[str, ...]) -> list[str]:
    built = manifest.built_targets()
    if not wanted:
        return built
    missing = [n for n in wanted if n not in built]
    if missing:
        raise BundleError(f"target(s) {', '.join(missing)} not built in this bundle; built: "
                          f"{', '.join(built) or 'none'}")
    return list(wanted)


def steady_points(plan: LoadPlan) -> list[tuple[str, float]]:
    """The loads measured in rounds: the batch sweep and the closed loops."""
    return [("batch", float(b)) for b in plan.batch_sizes] + [("concurrency", float(c)) for c in plan.concurrency]


def rate_points(plan: LoadPlan) -> list[tuple[str, float]]:
    """The open loops, run once per engine after the rounds (fractions need the measured capacity)."""
    if plan.rates:
        return [("rate", float(r)) for r in plan.rates]
    return [("rate-fraction", f) for f in plan.rate_fractions]


def capacity_rps(points: list[LoadPoint]) -> float:
    """Requests (batch 1) per second this engine sustained in the closed-loop and batch-1 runs."""
    best = [p.summary()["requests_per_s"] for p in points
            if (p.kind == "concurrency") or (p.kind == "batch" and p.value == 1)]
    return max(best, default=0.0)


def measure_point(send: Callable[[int], Any], kind: str, value: float, plan: LoadPlan, stop: threading.Event,
                  measured: list[LoadPoint], clock: Callable[[], float] = time.perf_counter) -> LoadPoint | None:
    """One load; ``measured`` (this engine's merged points so far) gives the capacity for rate fractions."""
    if kind == "batch":
        return batch_point(send, int(value), plan.measure, clock)
    if kind == "concurrency":
        duration = max(1.0, plan.duration_s / max(1, plan.rounds))
        return closed_loop(send, int(value), duration, plan.measure.tolerance, stop)
    rate = value if kind == "rate" else round(value * capacity_rps(measured), 1)
    if rate <= 0:
        return None
    return open_loop(send, rate, plan.duration_s, plan.arrivals, plan.seed, plan.max_in_flight,
                     tolerance=plan.measure.tolerance, stop=stop)


def bench_engines(runners: dict[str, Any], held: dict[str, np.ndarray], plan: LoadPlan, stop: threading.Event,
                  tick: Callable[[str, str | None], None], clock: Callable[[], float] = time.perf_counter
                  ) -> dict[str, list[LoadPoint]]:
    """Every load of ``plan`` on every engine, interleaved by round; stops early (keeping what was
    measured, whole rounds only) on Ctrl-C or when ``stop`` is set. ``tick(engine, load)`` follows each
    load measured, ``tick(engine, None)`` each engine's turn in a round; ``clock`` times the batch loads."""
    sends = {}
    for name, runner in runners.items():
        feeds = {b: tiled_feeds(held, runner.inputs, b) for b in {1, *plan.batch_sizes}}
        sends[name] = lambda batch, run=runner.infer, feeds=feeds: run(feeds[batch])
    rounds: dict[str, dict[tuple[str, float], list[LoadPoint]]] = {name: {} for name in runners}
    merged: dict[str, list[LoadPoint]] = {name: [] for name in runners}
    try:
        for _ in range(max(1, plan.rounds)):
            for name in runners:
                for kind, value in steady_points(plan):
                    if stop.is_set():
                        raise KeyboardInterrupt
                    point = measure_point(sends[name], kind, value, plan, stop, [], clock)
                    rounds[name].setdefault((kind, value), []).append(point)
                    tick(name, point.label)
                tick(name, None)
        for name in runners:
            merged[name] = [merge_rounds(points) for points in rounds[name].values()]
            for kind, value in rate_points(plan):
                if stop.is_set():
                    raise KeyboardInterrupt
                point = measure_point(sends[name], kind, value, plan, stop, merged[name])
                if point is not None:
                    merged[name].append(point)
                tick(name, point.label if point else kind)
            tick(name, None)
    except KeyboardInterrupt:
        stop.set()  # callers and senders see it and stop; what was measured is kept
        complete = min((len(v) for r in rounds.values() for v in r.values()), default=0)
        for name in runners:
            if not merged[name]:  # still in the rounds: keep the rounds every load finished
                merged[name] = [merge_rounds(points[:complete]) for points in rounds[name].values() if complete]
    return {name: points for name, points in merged.items() if points}


def ratios(engines: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per engine and load: torch eager p50 / engine p50 (above 1: faster than torch)."""
    base = engines.get(BASELINE)
    if not base:
        return {}
    base_p50 = {p["load"]: p["p50_ms"] for p in base["points"]}
    out: dict[str, dict[str, float]] = {}
    for name, engine in engines.items():
        out[name] = {p["load"]: base_p50[p["load"]] / p["p50_ms"]
                     for p in engine["points"] if p["load"] in base_p50 and p["p50_ms"] > 0}
    return out


def server_overhead(engines: dict[str, dict[str, Any]], client_ms: float | None) -> dict[str, Any]:
    """What the server adds over its own engine in process, per load (p50 and p99, ms)."""
    served = engines[SERVER]["settings"].get("platform")
    engine = engines.get(served)
    added: dict[str, Any] = {}
    if engine:
        mine = {p["load"]: p for p in engine["points"]}
        for point in engines[SERVER]["points"]:
            base = mine.get(point["load"])
            if base:
                added[point["load"]] = {"p50_ms": point["p50_ms"] - base["p50_ms"],
                                        "p99_ms": point["p99_ms"] - base["p99_ms"]}
    return {"target": served, "client_overhead_ms": client_ms, "added_latency": added}


def open_runners(bundle: Path, manifest: Manifest, names: list[str], config: BenchConfig,
                 stack: contextlib.ExitStack) -> dict[str, Any]:
    """Every engine to measure, open at once (the rounds interleave them), closed by ``stack``:
    torch eager first, then the targets, then the server (checked first, before anything is loaded)."""
    from optimize.bundle.folder import load_runner

    inputs, outputs = manifest.inputs, manifest.output_names
    server = None
    if config.url:
        model = config.model_name or manifest.model_name
        if config.url.startswith("grpc://"):
            from optimize.bench.grpc_runner import GrpcRunner

            server = stack.enter_context(GrpcRunner(config.url, model, inputs, outputs))
        else:
            from optimize.bench.http_runner import HttpRunner

            server = stack.enter_context(HttpRunner(config.url, model, inputs, outputs))
    runners: dict[str, Any] = {}
    if config.torch_baseline:
        from optimize.bench.torch_runner import TorchProgramRunner

        runners[BASELINE] = stack.enter_context(
            TorchProgramRunner(bundle / "program.pt2", inputs, outputs, manifest.runner_config))
    for name in names:
        runners[name] = stack.enter_context(load_runner(bundle, name))
    if server is not None:
        runners[SERVER] = server
    return runners


def run_bench(bundle: Path, config: BenchConfig, progress: bool = True) -> dict[str, Any]:
    """Measure, then return the report (``write_report`` saves it in the bundle)."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    names = engines_to_run(manifest, config.targets)
    if not names:
        raise BundleError(f"bundle {bundle} has no built target to benchmark")
    held_file = np.load(bundle / "data" / "heldout.npz")
    held = {s.name: held_file[s.name] for s in manifest.inputs}
    stop = threading.Event()
    with contextlib.ExitStack() as stack:
        runners = open_runners(bundle, manifest, names, config, stack)
        client_overhead = None
        if SERVER in runners:
            client_overhead = runners[SERVER].client_overhead_ms(tiled_feeds(held, manifest.inputs, 1))
        measured = _measure(runners, held, config.plan, stop, progress)
        settings = {name: runner.settings for name, runner in runners.items()}
    return _report(manifest, config, measured, settings, client_overhead, stop.is_set(), bundle)


def _measure(runners: dict[str, Any], held: dict[str, np.ndarray], plan: LoadPlan, stop: threading.Event,
             progress: bool) -> dict[str, list[LoadPoint]]:
    from tqdm.auto import tqdm

    steps = len(runners) * (len(steady_points(plan)) * max(1, plan.rounds) + len(rate_points(plan)))
    log.info(f"measuring {', '.join(runners)} in {max(1, plan.rounds)} round(s)")
    bar_shown = progress and on_terminal()
    done, block = [0], {"engine": None, "loads": []}

    def say_block() -> None:  # redirected, a line per engine per round instead of a bar
        if block["engine"] is not None and progress and not bar_shown:
            log.info(f"  measured {block['engine']}: {', '.join(block['loads'])} ({done[0]}/{steps})")
        block["engine"], block["loads"] = None, []

    def measured(engine: str, label: str | None) -> None:
        if label is None:  # the engine's loads of this round (or its open-loop rates) are done
            say_block()
            return
        bar.update(1)
        done[0] += 1
        block["engine"] = engine
        block["loads"].append(label)

    with tqdm(total=steps, desc="benchmarking", unit="load", disable=not bar_shown, leave=False) as bar:
        try:
            try:
                return bench_engines(runners, held, plan, stop, measured)
            finally:
                say_block()
        except KeyboardInterrupt:
            stop.set()
            return {}


def _report(manifest: Manifest, config: BenchConfig, measured: dict[str, list[LoadPoint]],
            settings: dict[str, Any], client_overhead: float | None, interrupted: bool,
            bundle: Path) -> dict[str, Any]:
    """The report of what was measured: points per engine, ratios to torch, server overhead, cross-check."""
    from optimize.environment import library_versions, machine_info

    engines: dict[str, dict[str, Any]] = {}
    for name, points in measured.items():
        engines[name] = {"settings": settings[name], "points": [p.summary() for p in points],
                         "capacity_rps": capacity_rps(points)}
        log.info(f"{name}: " + ", ".join(f"{p.label} p50 {p.percentile_ms(50):.2f} ms" for p in points[:3]))
    if interrupted:
        log.warning("interrupted: keeping what was measured")
    report = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "model_name": manifest.model_name, "task": manifest.task, "config": config.to_json(),
              "baseline": BASELINE if config.torch_baseline else None, "engines": engines,
              "ratios_vs_torch": ratios(engines), "interrupted": interrupted,
              "server": server_overhead(engines, client_overhead) if SERVER in engines else None,
              "machine": machine_info(), "versions": library_versions(),
              "runner_config": manifest.runner_config.to_json()}
    if config.cross_check and not interrupted:
        from optimize.bench.cross_check import vendor_benchmarks

        report["cross_check"] = vendor_benchmarks(bundle, manifest, engines)
    return report


def plan_with_load(plan: LoadPlan, load: LoadSpec) -> LoadPlan:
    """Make sure the load the winner is chosen at is measured."""
    if load.kind == "batch" and int(load.value) not in plan.batch_sizes:
        return dataclasses.replace(plan, batch_sizes=tuple(sorted({*plan.batch_sizes, int(load.value)})))
    if load.kind == "concurrency" and int(load.value) not in plan.concurrency:
        return dataclasses.replace(plan, concurrency=tuple(sorted({*plan.concurrency, int(load.value)})))
    if load.kind == "rate" and load.value not in plan.rates:
        return dataclasses.replace(plan, rates=tuple(sorted({*plan.rates, load.value})))
    return plan


def winner_change(manifest: Manifest, report: dict[str, Any], decision: dict[str, Any], config: BenchConfig,
                  select: bool) -> str | None:
    """Why this run's decision must not replace the bundle's winner, or None when it may.

    A benchmark records its measurements; it changes what is served only when asked (``select``) or
    when it measured every built target, and nothing else, under the plan the winner was chosen by."""
    previous = manifest.winner or {}
    had = previous.get("target")
    if decision.get("target") is None and had:
        return f"no target qualified in this run, so {had} stays"
    if select:
        return None
    fix = "; pass --select to make this run's choice the winner"
    if config.url:
        return "this run also measured a server (--url)" + fix
    unmeasured = [t for t in manifest.built_targets() if t not in report["engines"]]
    if unmeasured:
        return f"this run did not measure {', '.join(unmeasured)}" + fix
    plan = (previous.get("load"), previous.get("slo"))
    if had and plan != (decision["load"], decision["slo"]):
        return (f"this run's load and SLO ({decision['load']}, {decision['slo'] or 'none'}) differ from those the "
                f"winner was chosen by ({plan[0]}, {plan[1] or 'none'})" + fix)
    return None


def bench_bundle(bundle: Path, config: BenchConfig, slo: Slo | None, load: LoadSpec, progress: bool = True,
                 select: bool = False) -> tuple[dict[str, Any], dict[str, Any] | None, Path]:
    """Benchmark, decide the winner at ``load`` under ``slo``, save the report; record the decision as
    the bundle's winner when ``winner_change`` allows (``select``: the caller asks for it)."""
    from optimize.bench.report import write_report
    from optimize.bundle.folder import write_manifest
    from optimize.select import select as decide

    config = dataclasses.replace(config, plan=plan_with_load(config.plan, load))
    report = run_bench(bundle, config, progress)
    decision = None
    if not report["interrupted"]:
        manifest = read_manifest(bundle)
        decision = decide(manifest, report, slo, load)
        decision["measured_on"] = {k: report["machine"][k] for k in ("cpu", "cores", "isa", "int8_dot",
                                                                      "native_bf16", "native_fp16")
                                   if k in report["machine"]}
        report["winner"] = decision
        held = winner_change(manifest, report, decision, config, select)
        previous = manifest.winner_target
        report["winner_applied"] = held is None
        if held is None:
            manifest.winner = decision
            report["winner_note"] = (f"winner recorded: {decision['target']}" +
                                     (f" (was {previous})" if previous and previous != decision["target"] else ""))
        else:
            report["winner_note"] = f"winner unchanged: {previous or 'none'} ({held})"
        manifest.bench = {"report": "bench/report.md", "created": report["created"],
                          "winner_applied": report["winner_applied"]}
        write_manifest(bundle, manifest)
    folder = write_report(bundle, report)
    return report, decision, folder
