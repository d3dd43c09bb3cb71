"""all-MiniLM-L6-v2 (real weights) with a share of its attention heads pruned, recovered by distillation.

For each head-pruning ratio, ``optimize build`` removes that share of the heads of every layer
(magnitude importance), recovers the model by distillation on unlabelled real sentences (the
calibration split of the corpus plus disjoint docstring paragraphs), and builds ``ort-fp32``.
Fidelity is measured on held-out real sentences against the unpruned model: mean cosine of the
embeddings and nearest-neighbour retrieval agreement, before and after recovery. Latency (batch 1,
sequence 64) of each pruned engine is timed interleaved with the unpruned one.

    python -m benchmarks.prune_minilm [--ratios 0.25,0.5] [--steps 400] [--batch-size 16] [--rounds 5]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import environment, markdown_table, time_interleaved, write_results
from optimize.bundle import load_runner
from optimize.passes.distill import DistillConfig
from optimize.passes.prune import PruneConfig
from optimize.build.pipeline import run_build
from optimize.build.plan import BuildPlan, DataConfig, SourceConfig
from optimize.targets.base import RunnerConfig

TARGET = "ort-fp32"


def build(work: Path, ratio: float | None, steps: int, batch_size: int, threads: int):
    plan = BuildPlan(source=SourceConfig(work / "minilm.pt", "models.minilm:MiniLM"),
                     out=work / f"bundle-{ratio or 0}", targets=(TARGET,),
                     data=DataConfig(calib=str(work / "minilm_text.npz"),
                                     train_data=str(work / "minilm_extra_text.npz") if ratio else None),
                     runner=RunnerConfig(threads=threads), max_accuracy_drop=100.0,
                     prune=PruneConfig(ratio) if ratio else None, distill=DistillConfig(steps=steps, batch_size=batch_size))
    return run_build(plan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", default="0.25,0.5")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    from models.minilm import make_checkpoint

    work = Path(tempfile.mkdtemp(prefix="bench-prune-minilm-"))
    made = make_checkpoint(work)
    ratios = [float(r) for r in args.ratios.split(",")]
    builds = {"unpruned": build(work, None, args.steps, args.batch_size, args.threads)}
    for ratio in ratios:
        builds[f"heads pruned {ratio:.0%}"] = build(work, ratio, args.steps, args.batch_size, args.threads)

    held = np.load(builds["unpruned"].bundle / "data" / "heldout.npz")
    one = {k: held[k][:1] for k in ("input_ids", "attention_mask")}
    calls = {}
    for label, result in builds.items():
        runner = load_runner(result.bundle, TARGET)
        calls[label] = (lambda r: lambda: r.infer(one))(runner)
    timing = time_interleaved(calls, args.rounds, baseline="unpruned")

    rows = [["model", "heads", "MACs ratio", "params (M)", "mean cosine: pruned -> recovered",
             "retrieval agreement %: pruned -> recovered", f"{TARGET} mean cosine", "p50 ms", "speedup (range)"]]
    summary = {}
    for label, result in builds.items():
        stage = result.manifest.to_json()["stages"].get("prune")
        entry = result.manifest.to_json()["targets"][TARGET]
        t = timing[label]
        low, high = t["speedup_vs_unpruned_range"]
        if stage is None:
            rows.append([label, "72", "1.00x", "-", "1 (reference)", "100 (reference)",
                         f"{entry['accuracy']['held_out']['mean_cosine']:.4f}", f"{t['p50_ms']:.1f}", "1.00x"])
            summary[label] = {"timing": t}
            continue
        acc = stage["accuracy"]
        heads = sum(h["after"] for h in stage["heads"].values())
        summary[label] = {"heads_after": heads, "macs_ratio": stage["macs_ratio"], "params_after": stage["params_after"],
                          "pruned": acc["pruned"]["held_out"], "recovered": acc["recovered"]["held_out"],
                          "recovery": stage["recovery"], "target": entry["accuracy"]["held_out"], "timing": t}
        rows.append([label, str(heads), f"{stage['macs_ratio']:.2f}x", f"{stage['params_after'] / 1e6:.1f}",
                     f"{acc['pruned']['held_out']['mean_cosine']:.4f} -> {acc['recovered']['held_out']['mean_cosine']:.4f}",
                     f"{acc['pruned']['held_out']['retrieval_agreement_pct']:.1f} -> "
                     f"{acc['recovered']['held_out']['retrieval_agreement_pct']:.1f}",
                     f"{entry['accuracy']['held_out']['mean_cosine']:.4f}", f"{t['p50_ms']:.1f}",
                     f"{t['speedup_vs_unpruned']:.2f}x ({low:.2f}-{high:.2f})"])
    results = {"benchmark": "all-MiniLM-L6-v2 attention-head pruning with distillation recovery",
               "steps": args.steps, "sentences": made, "models": summary, "environment": environment()}
    first = next(v for v in summary.values() if "recovery" in v)
    md = (f"# all-MiniLM-L6-v2: attention heads pruned, recovered by distillation\n\n"
          f"`python -m benchmarks.prune_minilm --ratios {args.ratios} --steps {args.steps} --batch-size {args.batch_size} --rounds {args.rounds}`\n\n"
          + markdown_table(rows)
          + f"\nFidelity on {len(held['input_ids'])} held-out real sentences against the unpruned model. "
            f"Recovery: {args.steps} steps (batch {args.batch_size}) of distillation on {first['recovery']['samples']} unlabelled sentences "
            f"({first['recovery']['seconds']:.0f} s). MACs count the linear layers (attention products are "
            f"not layers). Latency at batch 1, sequence {held['input_ids'].shape[1]}, {args.threads} threads, "
            f"paired per round.\n")
    write_results(Path(args.out) / "prune_minilm", results, md)
    print(md)


if __name__ == "__main__":
    main()
