"""Every CPU target on the CPU at hand, batch 1: the INT8 scheme chosen by measurement against the
fixed per-family default it replaced, FP32, BF16 where the CPU has it natively, and torch eager.

Three builds of one model through ``run_build`` (what the CLI runs), each in a fresh folder:
- ``fixed``: ``ort-int8`` and ``openvino-int8`` with the old per-family default scheme (static for
  CNNs, weights for transformers), timed;
- ``measured``: the same two targets with no scheme given (every scheme built, judged and timed,
  ``scheme_choice`` in the manifest), timed: the ratio of the two wall times is the choice's cost;
- ``fp``: ``ort-fp32``, ``openvino-fp32``, ``openvino-bf16`` (unavailable, with its reason, on a
  CPU without native BF16) and ``torch-compile`` (BF16 where native, else FP32).
Then every engine and torch eager are timed interleaved in rounds (paired ratios against torch eager
and each engine's own FP32), with the accuracy the gate measured on the held-out data.

    python -m benchmarks.cpu_targets --model resnet50|minilm [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import environment, markdown_table, time_interleaved, timing_parser, write_results
from optimize.bundle import load_runner
from optimize.build.pipeline import run_build
from optimize.build.plan import BuildPlan, DataConfig, QuantConfig, SourceConfig
from optimize.targets import registry
from optimize.targets.base import RunnerConfig

INT8 = ("ort-int8", "openvino-int8")
FLOAT = ("ort-fp32", "openvino-fp32", "openvino-bf16", "torch-compile")


def model_setup(name: str, work: Path):
    """(source, data, fixed default scheme, eager callable factory, feeds of one held-out sample)."""
    import torch

    if name == "minilm":
        from models.minilm import MiniLM, make_checkpoint

        make_checkpoint(work)
        source = SourceConfig(work / "minilm.pt", "models.minilm:MiniLM")
        model = MiniLM()
        model.load_state_dict(torch.load(work / "minilm.pt", weights_only=True))
        return source, DataConfig(calib=str(work / "minilm_text.npz")), "weights", model.eval()
    from models.resnet import make_checkpoint, resnet50

    make_checkpoint(work, 50, calib_samples=80)
    model = resnet50()
    model.load_state_dict(torch.load(work / "resnet50.pt", weights_only=True))
    return (SourceConfig(work / "resnet50.pt", "models.resnet:resnet50"),
            DataConfig(calib=str(work / "resnet_calib.npz"), held_out_fraction=0.2), "static", model.eval())


def accuracy_cell(task: str, held: dict) -> str:
    if task == "embed":
        return f"cos {held['mean_cosine']:.4f}, NN {held['retrieval_agreement_pct']:.1f}%"
    return f"top-1 agree {held['top1_agreement_pct']:.1f}%"


def main() -> None:
    parser = timing_parser(__doc__, 5)
    parser.add_argument("--model", choices=("resnet50", "minilm"), default="minilm")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix=f"bench-cpu-{args.model}-"))
    source, data, default, model = model_setup(args.model, work)
    runner = RunnerConfig(threads=args.threads)
    builds, wall = {}, {}
    for key, targets, quant in (("fixed", INT8, QuantConfig(int8_scheme=default)), ("measured", INT8, QuantConfig()),
                                ("fp", FLOAT, QuantConfig())):
        start = time.perf_counter()
        builds[key] = run_build(BuildPlan(source, work / key, targets, data, quant, runner=runner))
        wall[key] = time.perf_counter() - start
    manifests = {k: b.manifest.to_json() for k, b in builds.items()}
    task = manifests["fp"]["task"]
    held = np.load(builds["fp"].bundle / "data" / "heldout.npz")
    feeds = {s["name"]: np.ascontiguousarray(held[s["name"]][:1]) for s in manifests["fp"]["inputs"]}
    tensors = [torch.from_numpy(v) for v in feeds.values()]
    calls = {"torch-eager-fp32": lambda: model(*tensors)}
    rows_info, unavailable = {}, {}
    for key, label in (("fp", None), ("fixed", f"{default}, the fixed default"), ("measured", "measured")):
        for target, entry in manifests[key]["targets"].items():
            if entry["status"] != "built":
                unavailable[target] = entry.get("reason")
                continue
            name = target if label is None else f"{target} ({label})"
            scheme = (entry.get("build_config") or {}).get("int8_scheme")
            runner_ = load_runner(builds[key].bundle, target)
            calls[name] = (lambda r: lambda: r.infer(feeds))(runner_)
            rows_info[name] = {"target": target, "precision": entry["precision"], "scheme": scheme,
                               "accuracy": entry["accuracy"]["held_out"], "gate": entry["gate"]["message"],
                               "size_bytes": entry.get("size_bytes"), "scheme_choice": entry.get("scheme_choice"),
                               "recovery": (entry.get("recovery") or {}).get("chosen_change")}
    with torch.no_grad():
        timing = time_interleaved(calls, args.rounds, baseline="torch-eager-fp32")
    for name, info in rows_info.items():
        own = "openvino-fp32" if info["target"].startswith("openvino") else "ort-fp32"
        if own in timing and name != own:
            ratio = np.asarray(timing[own]["p50_ms_per_round"]) / np.asarray(timing[name]["p50_ms_per_round"])
            info["speedup_vs_own_fp32"] = float(np.median(ratio))
            info["speedup_vs_own_fp32_range"] = [float(ratio.min()), float(ratio.max())]
    results = {"model": args.model, "rounds": args.rounds, "threads": args.threads, "timing": timing,
               "engines": rows_info, "unavailable": unavailable, "build_wall_s": wall,
               "measured_over_fixed_build_time": wall["measured"] / wall["fixed"], "environment": environment()}
    rows = [["engine", "precision", "p50 ms", "spread %", "vs own FP32 (range)", "vs torch eager", "accuracy vs FP32"]]
    for name, t in timing.items():
        info = rows_info.get(name)
        own = (f"{info['speedup_vs_own_fp32']:.2f}x ({info['speedup_vs_own_fp32_range'][0]:.2f}-"
               f"{info['speedup_vs_own_fp32_range'][1]:.2f})") if info and "speedup_vs_own_fp32" in info else "-"
        precision = "fp32" if info is None else info["precision"] + (f" ({info['scheme']})" if info["scheme"] else "")
        if info and info["recovery"]:
            precision += f", {info['recovery']}"
        rows.append([name, precision, f"{t['p50_ms']:.2f}", f"{t['p50_spread_pct']:.1f}", own,
                     f"{t['speedup_vs_torch-eager-fp32']:.2f}x",
                     accuracy_cell(task, info["accuracy"]) if info else "(reference)"])
    choices = [["target", "scheme", "within budget (selection split)", "selection drop", "p50 ms", "spread %"]]
    for target in INT8:
        record = manifests["measured"]["targets"][target].get("scheme_choice") or {}
        for c in record.get("candidates", []):
            choices.append([target, c["scheme"] + (" (chosen)" if c["scheme"] == record["chosen"] else ""),
                            "yes" if c["within_budget"] else "no", f"{c['selection_drop']:.3g}",
                            f"{c['p50_ms']:.2f}", f"{c['spread_pct']:.0f}"])
        if record.get("recovered"):
            choices.append([target, f"{record['chosen']} (chosen)", "yes", "-", f"{record['recovered']['p50_ms']:.2f}",
                            f"{record['recovered']['spread_pct']:.0f}"])
    cpu = results["environment"]["machine"]
    md = (f"# Every CPU target, {args.model}, batch 1, {args.threads} threads\n\n"
          f"`python -m benchmarks.cpu_targets --model {args.model} --rounds {args.rounds} --threads {args.threads}`"
          f" on {cpu['cpu']} ({', '.join(cpu['isa'])}).\n\n" + markdown_table(rows)
          + "\n" + "".join(f"- {t}: {r}\n" for t, r in unavailable.items() if t in registry.TARGETS)
          + "\n## The scheme choice (the `measured` build's manifest)\n\n" + markdown_table(choices)
          + "".join(f"\n- {t}: {manifests['measured']['targets'][t]['scheme_choice']['reason']}" for t in INT8
                    if manifests["measured"]["targets"][t].get("scheme_choice"))
          + f"\n\nWhole build, the two INT8 targets: fixed scheme {wall['fixed']:.0f} s, chosen by measurement "
            f"{wall['measured']:.0f} s ({results['measured_over_fixed_build_time']:.2f}x).\n")
    write_results(Path(args.out) / f"cpu_targets_{args.model}", results, md)
    print(md)


if __name__ == "__main__":
    main()
