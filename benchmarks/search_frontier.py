"""``optimize search`` against the best default build, and its parallel wall time.

Two measurements:

1. ``--model digits`` or a zoo model (``efficientnet``: its fastest target, ORT INT8, misses the
   budget by default): ``optimize build --target auto`` (one fixed build per CPU target, the
   fastest within budget wins) against ``optimize search`` over the family's default space. The
   two winners' engines are then timed in one run, interleaved, batch 1: the search's is faster only
   if the gap exceeds the spread of both.
2. ``--model resnet18`` (random weights: speed only, the accuracy budget off): a search over prune
   ratio x target x scheme run with Ray's parallelism and again one trial at a time (each in a
   fresh folder, so neither reuses the other's stages): the wall time of each, the builds Ray ran
   at once, and the trials' benchmark spread against a standalone ``optimize bench`` of the
   winner's engine with the same settings.

    python -m benchmarks.search_frontier --model digits
    python -m benchmarks.search_frontier --model efficientnet
    python -m benchmarks.search_frontier --model resnet18
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import environment, markdown_table, write_results
from optimize.bench.load import LoadPlan
from optimize.bench.run import BenchConfig, bench_engines, run_bench
from optimize.bundle import load_runner, read_manifest
from optimize.build.plan import BuildPlan, DataConfig, SourceConfig
from optimize.search.plan import SearchPlan
from optimize.search.runner import model_family, run_search
from optimize.search.space import parse_space
from optimize.select import LoadSpec

LOAD = LoadSpec("batch", 1.0)
CPU_TARGETS = ("ort-fp32", "ort-int8", "openvino-fp32", "openvino-int8")


def trial_bench(duration_s: float, rounds: int) -> BenchConfig:
    """What ``optimize search --duration --rounds`` gives every trial."""
    return BenchConfig(plan=LoadPlan(batch_sizes=(), concurrency=(), rates=(), rate_fractions=(),
                                     duration_s=duration_s * rounds, rounds=rounds), cross_check=False)


def source(model: str, work: Path) -> tuple[SourceConfig, DataConfig, str | None]:
    """(source, data, task) of a reference model made in ``work``."""
    if model == "digits":
        from models.digits import make_checkpoint

        make_checkpoint(work)
        return (SourceConfig(work / "digits.pt", "models.digits:DigitsNet"),
                DataConfig(calib=str(work / "digits_calib.npz"), eval_data=str(work / "digits_test.npz")), None)
    if model == "resnet18":
        from models.resnet import make_checkpoint

        make_checkpoint(work, 18, calib_samples=64)
        return (SourceConfig(work / "resnet18.pt", "models.resnet:resnet18"),
                DataConfig(calib=str(work / "resnet_calib.npz"), held_out_fraction=0.25), None)
    from models.zoo import ZOO, make

    make(model, work)
    zoo = ZOO[model]
    return (SourceConfig(work / "model.pt", zoo.arch),
            DataConfig(calib=str(work / "calib.npz"), eval_data=str(work / "eval.npz") if zoo.gate_labels else None),
            zoo.task)


def search(plan: BuildPlan, space: Any, bench: BenchConfig, parallel: int | None = None,
           budget_disabled: bool = False, load: LoadSpec = LOAD) -> Any:
    return run_search(SearchPlan(plan=plan, space=space, load=load, bench=bench, parallel=parallel,
                                 budget_disabled=budget_disabled), fresh=True)


def same_run(engines: dict[str, tuple[Path, str]], rounds: int, batch: int = 1) -> dict[str, dict[str, Any]]:
    """Each (bundle, target) timed at ``batch`` in one run, interleaved by round."""
    plan = LoadPlan(batch_sizes=(batch,), concurrency=(), rates=(), rate_fractions=(), duration_s=3.0 * rounds,
                    rounds=rounds)
    with contextlib.ExitStack() as stack:
        runners = {name: stack.enter_context(load_runner(bundle, target)) for name, (bundle, target) in engines.items()}
        bundle = next(iter(engines.values()))[0]
        held_file = np.load(bundle / "data" / "heldout.npz")
        held = {s.name: held_file[s.name] for s in read_manifest(bundle).inputs}
        points = bench_engines(runners, held, plan, threading.Event(), lambda engine, label: None)
    out = {}
    for name, measured in points.items():
        summary = measured[0].summary()
        rounds_ms = summary["round_p50_ms"]
        out[name] = {"p50_ms": summary["p50_ms"], "p99_ms": summary["p99_ms"], "round_p50_ms": rounds_ms,
                     "low": min(rounds_ms), "high": max(rounds_ms), "spread_pct": summary["spread_pct"]}
    return out


def versus_default(model: str, work: Path, rounds: int, batch: int) -> tuple[dict[str, Any], str]:
    from optimize.auto import Selection, build_and_select

    load = LoadSpec("batch", float(batch))
    src, data, task = source(model, work / "model")
    # --target auto without its baselines (torch-compile is measured, never chosen)
    base = BuildPlan(source=src, out=work / "default", targets=CPU_TARGETS, data=data, task=task)
    started = time.time()
    default = build_and_select(base, Selection(load=load))
    default_s = time.time() - started
    default_target = default.manifest.winner_target
    plan = dataclasses.replace(base, out=work / "searched", targets=("ort-fp32",))
    space = parse_space(model_family(plan, print))
    result = search(plan, space, trial_bench(3.0, 3), load=load)
    winner = result.winner
    searched = next(r for r in result.records if r["key"] == winner["key"])
    timed = same_run({"default build winner": (default.bundle, default_target),
                      "search winner": (result.bundle, searched["config"]["target"])}, rounds, batch)
    a, b = timed["default build winner"], timed["search winner"]
    faster = b["p50_ms"] < a["p50_ms"] and a["p50_ms"] - b["p50_ms"] > max(a["high"] - a["low"], b["high"] - b["low"])
    candidates = {n: {"status": t.status, "drop": (t.gate or {}).get("drop"), "reason": t.reason}
                  for n, t in default.manifest.targets.items()}
    tag = model + (f"_batch{batch}" if batch != 1 else "")
    shutil.copyfile(result.search_dir / "frontier.png", Path("benchmarks/results") / f"search_{tag}_frontier.png")
    results = {"model": model, "load": load.label, "default": {"winner": default_target, "reason": default.manifest.winner["reason"],
                                           "targets": candidates, "wall_s": round(default_s, 1)},
               "search": {"winner": searched["label"], "reason": winner["reason"], "summary": result.summary,
                          "front": [r["label"] for r in result.front]},
               "same_run": timed, "search_faster_beyond_spread": faster, "environment": environment()}
    rows = [[name, f"{v['p50_ms']:.4f}", f"{v['low']:.4f}-{v['high']:.4f}", f"{v['spread_pct']:.1f}"]
            for name, v in timed.items()]
    default_rows = [[n, c["status"], "-" if c["drop"] is None else f"{c['drop']:.3g}", c["reason"] or ""]
                    for n, c in candidates.items()]
    md = "\n".join([
        f"# optimize search against the best default build: {model}", "",
        f"`python -m benchmarks.search_frontier --model {model} --batch {batch}`; the default build and the search "
        f"both judge at {load.label}; the two winners timed in one run at that batch, "
        f"{rounds} interleaved rounds (p50 of the median round, range of round p50s).", "",
        f"Default build (`--target auto`, {default_s:.0f} s): winner **{default_target}** ({default.manifest.winner['reason']})",
        "", markdown_table([["target", "status", "accuracy drop", "reason"], *default_rows]), "",
        f"Search ({result.summary['trials']} trials, {result.summary['failed']} failed, {result.summary['wall_s']:g} s "
        f"wall, up to {result.summary['parallel_builds']} builds at once): winner **{searched['label']}**", "",
        f"![frontier](search_{tag}_frontier.png)", "",
        markdown_table([["engine", "p50 ms", "round range ms", "spread %"], *rows]), "",
        f"Search winner faster than the default build's beyond the spread of both: **{faster}** "
        f"({a['p50_ms'] / b['p50_ms']:.2f}x)", "",
        "## The search's report", "", (result.search_dir / "report.md").read_text().split("\n", 2)[2]])
    return results, md


def parallel_speedup(work: Path, rounds: int) -> tuple[dict[str, Any], str]:
    src, data, task = source("resnet18", work / "model")
    base = BuildPlan(source=src, out=work / "parallel", targets=("ort-fp32",), data=data,
                     max_accuracy_drop=float("inf"))
    space = parse_space("cnn", prune="0,0.3", targets="ort-int8,openvino-int8", schemes="static,weights",
                        methods="minmax")
    bench = trial_bench(3.0, rounds)
    parallel = search(base, space, bench, budget_disabled=True)
    sequential = search(dataclasses.replace(base, out=work / "sequential"), space, bench, parallel=1,
                        budget_disabled=True)
    winner = next(r for r in parallel.records if r["key"] == parallel.winner["key"])
    standalone = run_bench(parallel.bundle, dataclasses.replace(
        bench, plan=dataclasses.replace(bench.plan, batch_sizes=(1,)), targets=(winner["config"]["target"],)), progress=False)
    alone = next(p for p in standalone["engines"][winner["config"]["target"]]["points"] if p["load"] == LOAD.label)
    spreads = [r["spread_pct"] for r in parallel.records if r["status"] == "ok"]
    shutil.copyfile(parallel.search_dir / "frontier.png", Path("benchmarks/results") / "search_resnet18_frontier.png")
    results = {"parallel": parallel.summary, "sequential": sequential.summary,
               "speedup": sequential.summary["wall_s"] / parallel.summary["wall_s"],
               "trial_spread_pct": spreads, "standalone_spread_pct": alone["spread_pct"],
               "standalone_p50_ms": alone["p50_ms"], "winner": winner["label"],
               "front": [r["label"] for r in parallel.front], "environment": environment()}
    md = "\n".join([
        "# optimize search on ResNet-18 (random weights: speed only, the accuracy budget off)", "",
        "`python -m benchmarks.search_frontier --model resnet18`: prune 0,0.3 x ort-int8, openvino-int8 x static, "
        f"weights (minmax calibration); batch 1, {rounds} rounds per trial.", "",
        markdown_table([["run", "trials", "wall s", "trial time s", "builds at once"],
                        ["parallel (Ray, one trial per CPU)", str(parallel.summary["trials"]),
                         f"{parallel.summary['wall_s']:g}", f"{parallel.summary['trial_time_s']:g}",
                         str(parallel.summary["parallel_builds"])],
                        ["one trial at a time", str(sequential.summary["trials"]), f"{sequential.summary['wall_s']:g}",
                         f"{sequential.summary['trial_time_s']:g}", str(sequential.summary["parallel_builds"])]]),
        "", f"Wall-time speed-up of the parallel search: **{results['speedup']:.2f}x**.", "",
        f"Benchmark spread (range of round p50s): trials median {np.median(spreads):.1f}% (range "
        f"{min(spreads):.1f}-{max(spreads):.1f}%); a standalone `optimize bench` of the winner's engine with the same "
        f"settings: {alone['spread_pct']:.1f}% (p50 {alone['p50_ms']:.3f} ms against {winner['latency_ms']['p50']:.3f} ms "
        f"in its trial).", "",
        "![frontier](search_resnet18_frontier.png)", "",
        "## The parallel search's report", "", (parallel.search_dir / "report.md").read_text().split("\n", 2)[2]])
    return results, md


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits", help="digits, resnet18 or a zoo model (efficientnet)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1, help="the batch size both builds are judged and timed at")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-search-") as scratch:
        work = Path(scratch)
        if args.model == "resnet18":
            results, md = parallel_speedup(work, 3)
        else:
            results, md = versus_default(args.model, work, args.rounds, args.batch)
    name = f"search_{args.model}" + (f"_batch{args.batch}" if args.batch != 1 else "")
    write_results(Path(args.out) / name, results, md)
    print(md)


if __name__ == "__main__":
    main()
