"""Digits CNN (real data) at 50% channel pruning: recovered accuracy against the amount of data.

For each amount of unlabelled recovery data and each seed, ``optimize build`` prunes half the
channels, recovers by distillation on that data, then builds ``openvino-int8`` and ``ort-int8`` on
the pruned model (calibrated on the same data). Labelled accuracy is measured on the held-back
digits test set, against the unpruned FP32 model. Reports medians over seeds and their range.

    python -m benchmarks.prune_digits [--samples 150,300,600,1258] [--seeds 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import environment, markdown_table, write_results
from optimize.passes.distill import DistillConfig
from optimize.passes.recovery_curve import MIN_RECOVERY_SAMPLES
from optimize.passes.prune import PruneConfig
from optimize.build.pipeline import run_build
from optimize.build.plan import BuildPlan, DataConfig, SourceConfig

TARGETS = ("openvino-int8", "ort-int8")


def one_run(work: Path, samples: int, seed: int, ratio: float) -> dict:
    """One build on the first ``samples`` digits of the calibration file (recovery learns from what is
    neither held out nor kept for selection: about 70% of them)."""
    calib = work / f"calib-{samples}.npz"
    if not calib.is_file():
        np.savez(calib, x=np.load(work / "digits_calib.npz")["x"][:samples])
    plan = BuildPlan(source=SourceConfig(work / "digits.pt", "models.digits:DigitsNet"),
                     out=work / f"b-{samples}-{seed}", targets=TARGETS,
                     data=DataConfig(calib=str(calib), eval_data=str(work / "digits_test.npz")),
                     max_accuracy_drop=100.0, use_cache=False,
                     prune=PruneConfig(ratio), distill=DistillConfig(seed=seed))
    manifest = run_build(plan).manifest.to_json()
    stage = manifest["stages"]["prune"]
    acc = {step: stage["accuracy"][step]["eval"]["accuracy_pct"] for step in stage["accuracy"]}
    for target in TARGETS:
        acc[target] = manifest["targets"][target]["accuracy"]["eval"]["accuracy_pct"]
    return {"accuracy": acc, "samples": stage["recovery_data"]["samples"], "warned": bool(stage["warnings"]),
            "macs_ratio": stage["macs_ratio"], "params_ratio": stage["params_ratio"],
            "recovery_seconds": stage["recovery"]["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", default="150,300,600,1258")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    from models.digits import make_checkpoint

    work = Path(tempfile.mkdtemp(prefix="bench-prune-digits-"))
    made = make_checkpoint(work)
    runs = {int(n): [one_run(work, int(n), seed, args.ratio) for seed in range(args.seeds)]
            for n in args.samples.split(",")}
    fp32 = runs[next(iter(runs))][0]["accuracy"]["original"]
    steps = ("pruned", "recovered", *TARGETS)
    rows = [["recovery samples", "warned", "pruned, not recovered", "recovered (FP32)", "drop (points)",
             *[f"{t} on pruned" for t in TARGETS]]]
    table = {}
    for n, results in runs.items():
        med = {s: float(np.median([r["accuracy"][s] for r in results])) for s in steps}
        rng = {s: (min(r["accuracy"][s] for r in results), max(r["accuracy"][s] for r in results)) for s in steps}
        table[n] = {"median": med, "range": rng, "runs": results}
        cell = lambda s: f"{med[s]:.2f} ({rng[s][0]:.2f}-{rng[s][1]:.2f})"  # noqa: E731
        rows.append([str(results[0]["samples"]), "yes" if results[0]["warned"] else "no", cell("pruned"),
                     cell("recovered"), f"{fp32 - med['recovered']:.2f}", *[cell(t) for t in TARGETS]])
    first = runs[next(iter(runs))][0]
    results = {"benchmark": f"digits CNN, {args.ratio:.0%} channel pruning, distillation recovery",
               "fp32_accuracy_pct": fp32, "test_samples": made["test_samples"], "seeds": args.seeds,
               "macs_ratio": first["macs_ratio"], "params_ratio": first["params_ratio"],
               "min_recovery_samples_before_warning": MIN_RECOVERY_SAMPLES,
               "by_samples": table, "environment": environment()}
    md = (f"# Digits CNN: {args.ratio:.0%} channel pruning, recovered by distillation\n\n"
          f"`python -m benchmarks.prune_digits --samples {args.samples} --seeds {args.seeds}`\n\n"
          f"Unpruned FP32 labelled accuracy: {fp32:.2f}% on {made['test_samples']} held-back test digits. "
          f"MACs reduced {first['macs_ratio']:.2f}x, parameters {first['params_ratio']:.2f}x. "
          f"Cells: median over {args.seeds} seeds (range). The tool warns below "
          f"{MIN_RECOVERY_SAMPLES} recovery samples.\n\n" + markdown_table(rows))
    write_results(Path(args.out) / "prune_digits", results, md)
    print(md)


if __name__ == "__main__":
    main()
