"""``optimize bench`` on ResNet-18 and ResNet-50 (random weights): every CPU target against torch eager.

Builds the four CPU targets with ``optimize build``, then runs ``optimize bench``'s engine twice
with the same load plan (batch sweep, closed loop, open loop at 0.5x, 0.9x and 1.5x of each
engine's measured capacity). Records the targets table with ratios against torch eager, the
batch-size curve, the open-loop runs (above capacity: growing latency and late sends) and the
repeatability of the two runs (p50 at batch 1, run B / run A).

    python -m benchmarks.bench_resnet [--depths 18,50] [--duration 4]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.common import environment, markdown_table, write_results
from optimize.bench.load import LoadPlan
from optimize.bench.run import BenchConfig, bench_bundle
from optimize.auto import Selection, build_and_select
from optimize.build.plan import BuildPlan, DataConfig, SourceConfig
from optimize.select import LoadSpec
from optimize.targets.base import RunnerConfig

TARGETS = ("ort-fp32", "ort-int8", "openvino-fp32", "openvino-int8")


def point(engine: dict, load: str) -> dict:
    return next(p for p in engine["points"] if p["load"] == load)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", default="18,50")
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    from models.resnet import make_checkpoint

    plan = LoadPlan(batch_sizes=(1, 4, 16), concurrency=(1, 2), rate_fractions=(0.5, 0.9, 1.5),
                    duration_s=args.duration)
    for depth in (int(d) for d in args.depths.split(",")):
        work = Path(tempfile.mkdtemp(prefix=f"bench-resnet{depth}-"))
        make_checkpoint(work, depth, calib_samples=64)
        build = BuildPlan(source=SourceConfig(work / f"resnet{depth}.pt", f"models.resnet:resnet{depth}"),
                          out=work / "bundle", targets=TARGETS,
                          data=DataConfig(calib=str(work / "resnet_calib.npz"), held_out_fraction=0.25),
                          runner=RunnerConfig(threads=args.threads))
        # builds, benchmarks (run A) and picks the winner
        built = build_and_select(build, Selection(LoadSpec("batch", 1), bench=BenchConfig(plan=plan)))
        again = bench_bundle(built.bundle, BenchConfig(plan=plan), None, LoadSpec("batch", 1))[0]
        runs = [built.report, again]
        first, second = runs
        engines = list(first["engines"])
        rows = [["engine", "p50 ms (run A / B)", "p99 ms", "throughput /s", "vs torch eager (A / B)",
                 "repeat: B/A p50"]]
        repeat = {}
        for name in engines:
            a, b = point(first["engines"][name], "batch=1"), point(second["engines"][name], "batch=1")
            repeat[name] = b["p50_ms"] / a["p50_ms"]
            rows.append([name, f"{a['p50_ms']:.2f} / {b['p50_ms']:.2f}", f"{a['p99_ms']:.2f}",
                         f"{a['throughput_items_per_s']:.1f}",
                         f"{first['ratios_vs_torch'][name]['batch=1']:.2f}x / "
                         f"{second['ratios_vs_torch'][name]['batch=1']:.2f}x", f"{repeat[name]:.3f}"])
        curve = [["engine", *[f"batch {b}: ms/request (images/s)" for b in plan.batch_sizes]]]
        for name in engines:
            cells = []
            for b in plan.batch_sizes:
                p = point(first["engines"][name], f"batch={b}")
                cells.append(f"{p['p50_ms']:.1f} ({p['throughput_items_per_s']:.0f})")
            curve.append([name, *cells])
        open_rows = [["engine", "offered /s", "achieved /s", "p50 ms", "p99 ms", "late sends", "unfinished"]]
        for name in engines:
            for p in first["engines"][name]["points"]:
                if p["kind"] == "rate":
                    open_rows.append([name, f"{p['offered_rate_per_s']:.1f}", f"{p['requests_per_s']:.1f}",
                                      f"{p['p50_ms']:.1f}", f"{p['p99_ms']:.1f}",
                                      f"{p['late_sends']} ({p['late_send_pct']:.0f}%)", str(p["unfinished"])])
        worst = max(abs(r - 1) for r in repeat.values())
        md = (f"# optimize bench: ResNet-{depth} (random weights), {args.threads} threads\n\n"
              f"`python -m benchmarks.bench_resnet --depths {depth} --duration {args.duration:g}`\n\n"
              f"## Targets at batch 1, one caller, against torch eager FP32 (two runs)\n\n" + markdown_table(rows)
              + f"\nRepeatability: the two runs' p50 at batch 1 differ by at most {worst * 100:.1f}%.\n\n"
              f"## Batch-size curve (run A)\n\n" + markdown_table(curve)
              + "\n## Open loop at 0.5x, 0.9x and 1.5x of each engine's capacity (run A)\n\n"
              + markdown_table(open_rows)
              + "\nLatency counts from each request's scheduled time, so above capacity the backlog shows.\n\n"
              f"Winner at batch 1: {first['winner']['reason']}\n")
        write_results(Path(args.out) / f"bench_resnet{depth}",
                      {"depth": depth, "plan": plan.to_json(), "runs": runs, "repeat_p50_ratio": repeat,
                       "environment": environment()}, md)
        print(md)


if __name__ == "__main__":
    main()
