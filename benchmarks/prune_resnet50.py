"""ResNet-50 pruned by 30% and 50% of its channels: MACs against measured latency, same run.

Builds ``--targets`` (default ``ort-fp32`` and ``openvino-fp32``; add ``ort-int8,openvino-int8`` for
pruning with INT8 on top) for the unpruned model and for each pruning ratio with
``optimize`` (the same plan the CLI makes: torch-pruning, magnitude importance, uniform,
channels rounded to multiples of 8), then times every engine and torch eager (unpruned) interleaved,
round after round. Weights are random (no ImageNet weights can be downloaded), so this measures
speed only and recovery is skipped. Reports per engine the median p50 over rounds, its spread, the
paired speedup over the same backend's unpruned engine, and the MACs ratio beside it: MACs are
not latency.

    python -m benchmarks.prune_resnet50 [--ratios 0.3,0.5] [--rounds 5] [--threads 2] [--depth 50] [--targets ...]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import environment, markdown_table, time_interleaved, write_results
from optimize.bundle import load_runner
from optimize.passes.prune import PruneConfig, count
from optimize.passes.distill import DistillConfig
from optimize.build.pipeline import run_build
from optimize.build.plan import BuildPlan, DataConfig, SourceConfig
from optimize.targets.base import RunnerConfig

BACKENDS = ("ort-fp32", "openvino-fp32")


def build(work: Path, depth: int, ratio: float | None, threads: int, backends: tuple[str, ...]):
    plan = BuildPlan(source=SourceConfig(work / f"resnet{depth}.pt", f"models.resnet:resnet{depth}"),
                     out=work / f"bundle-{ratio or 0}", targets=backends,
                     data=DataConfig(calib=str(work / "resnet_calib.npz"), held_out_fraction=0.25),
                     runner=RunnerConfig(threads=threads), max_accuracy_drop=100.0,
                     prune=PruneConfig(ratio, round_to=8) if ratio else None, distill=DistillConfig(steps=0))
    return run_build(plan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", default="0.3,0.5")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--depth", type=int, choices=(18, 50), default=50)
    parser.add_argument("--targets", default=",".join(BACKENDS))
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    backends = tuple(t for t in args.targets.split(",") if t)

    import torch

    from models.resnet import make_checkpoint, resnet18, resnet50

    torch.set_num_threads(args.threads)
    ratios = [float(r) for r in args.ratios.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-prune-"))
    make_checkpoint(work, args.depth, calib_samples=64 if any("int8" in b for b in backends) else 32)
    model = {18: resnet18, 50: resnet50}[args.depth]()
    model.load_state_dict(torch.load(work / f"resnet{args.depth}.pt", weights_only=True))
    model.eval()
    x1 = np.load(work / "resnet_calib.npz")["x"][:1]
    base_macs, base_params, _ = count(model, (torch.from_numpy(x1),))

    bundles = {}
    for ratio in [None, *ratios]:
        label = "unpruned" if ratio is None else f"pruned {ratio:.0%}"
        result = build(work, args.depth, ratio, args.threads, backends)
        stage = result.manifest.to_json()["stages"].get("prune")
        macs = stage["macs_after"] if stage else base_macs
        params = stage["params_after"] if stage else base_params
        bundles[label] = (result.bundle, macs, params)

    calls = {"torch-eager-fp32 (unpruned)": lambda: model(torch.from_numpy(x1))}
    runners = {}
    for label, (bundle, _, _) in bundles.items():
        for backend in backends:
            runner = load_runner(bundle, backend)
            runners[(label, backend)] = runner
            calls[f"{backend} {label}"] = (lambda r: lambda: r.infer({"x": x1}))(runner)
    with torch.no_grad():
        timing = time_interleaved(calls, args.rounds, baseline="torch-eager-fp32 (unpruned)")

    rows = [["engine", "MACs (G)", "MACs ratio", "params (M)", "p50 ms", "spread %",
             "speedup vs same backend unpruned (range)", "speedup vs torch eager (range)"]]
    summary = {}
    for label, (_, macs, params) in bundles.items():
        for backend in backends:
            name = f"{backend} {label}"
            mine = np.asarray(timing[name]["p50_ms_per_round"])
            base = np.asarray(timing[f"{backend} unpruned"]["p50_ms_per_round"])
            speedup = base / mine
            summary[name] = {"macs": macs, "params": params, "macs_ratio": base_macs / macs,
                             "latency_speedup_vs_unpruned": float(np.median(speedup)),
                             "latency_speedup_range": [float(speedup.min()), float(speedup.max())],
                             **timing[name]}
            rows.append([name, f"{macs / 1e9:.2f}", f"{base_macs / macs:.2f}x", f"{params / 1e6:.1f}",
                         f"{timing[name]['p50_ms']:.1f}", f"{timing[name]['p50_spread_pct']:.1f}",
                         f"{np.median(speedup):.2f}x ({speedup.min():.2f}-{speedup.max():.2f})",
                         f"{timing[name]['speedup_vs_torch-eager-fp32 (unpruned)']:.2f}x "
                         f"({timing[name]['speedup_vs_torch-eager-fp32 (unpruned)_range'][0]:.2f}-"
                         f"{timing[name]['speedup_vs_torch-eager-fp32 (unpruned)_range'][1]:.2f})"])
    eager = timing["torch-eager-fp32 (unpruned)"]
    rows.append(["torch-eager-fp32 (unpruned)", f"{base_macs / 1e9:.2f}", "1.00x", f"{base_params / 1e6:.1f}",
                 f"{eager['p50_ms']:.1f}", f"{eager['p50_spread_pct']:.1f}", "-", "1.00x"])
    results = {"benchmark": f"resnet{args.depth} channel pruning, batch 1, {args.threads} threads",
               "rounds": args.rounds, "ratios": ratios, "engines": summary, "torch_eager": eager,
               "environment": environment()}
    md = (f"# ResNet-{args.depth}: channel pruning, MACs against latency (batch 1, {args.threads} threads)\n\n"
          f"`python -m benchmarks.prune_resnet50 --depth {args.depth} --ratios {args.ratios} --rounds {args.rounds} "
          f"--threads {args.threads} --targets {args.targets}`\n\n" + markdown_table(rows)
          + "\nRandom weights (speed only); magnitude importance, uniform across layers, channels rounded to 8; "
            "the classifier keeps its width. Speedups are paired per round.\n\n"
          f"Machine: {results['environment']['machine']['cpu']}, {results['environment']['machine']['cores']} cores.\n")
    suffix = "_int8" if any("int8" in b for b in backends) else ""
    write_results(Path(args.out) / f"prune_resnet{args.depth}{suffix}", results, md)
    print(md)


if __name__ == "__main__":
    main()
