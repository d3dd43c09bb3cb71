"""all-MiniLM-L6-v2, batch 1, sequence 64: INT8 schemes against FP32, accuracy and latency.

Builds the FP32 targets and ``ort-int8``/``openvino-int8`` in every scheme the backend offers
(ONNX Runtime: weights, dynamic, static; OpenVINO: weights, static), then times all engines
interleaved against torch eager and reports mean cosine to the FP32 PyTorch embeddings,
nearest-neighbour retrieval agreement among the held-out sentences, and paired latency ratios.

    python -m benchmarks.minilm_int8 [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import environment, markdown_table, time_interleaved, timing_parser, write_results
from optimize.bundle import load_runner
from optimize.build.pipeline import run_build
from optimize.build.plan import BuildPlan, DataConfig, QuantConfig, SourceConfig
from optimize.targets.base import RunnerConfig

SCHEMES = {"ort-int8": ("weights", "dynamic", "static"), "openvino-int8": ("weights", "static")}


def main() -> None:
    args = timing_parser(__doc__, 5).parse_args()

    import torch

    from models.minilm import MiniLM, make_checkpoint

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-minilm-"))
    corpus = make_checkpoint(work)
    source = SourceConfig(work / "minilm.pt", "models.minilm:MiniLM")
    data = DataConfig(calib=str(work / "minilm_text.npz"))
    runner_config = RunnerConfig(threads=args.threads)
    bundles = {"fp32": run_build(BuildPlan(source, work / "fp32", ("ort-fp32", "openvino-fp32"), data,
                                           runner=runner_config))}
    engines = {"ort-fp32": ("fp32", "ort-fp32"), "openvino-fp32": ("fp32", "openvino-fp32")}
    for target, schemes in SCHEMES.items():
        for scheme in schemes:
            name = f"{target}-{scheme}"
            bundles[name] = run_build(BuildPlan(source, work / name, (target,), data,
                                                QuantConfig(int8_scheme=scheme, recover_accuracy=False),
                                                max_accuracy_drop=100.0, runner=runner_config))
            engines[name] = (name, target)

    model = MiniLM()
    model.load_state_dict(torch.load(work / "minilm.pt", weights_only=True))
    model.eval()
    held = np.load(work / "fp32" / "data" / "heldout.npz")
    feeds = {"input_ids": held["input_ids"][:1], "attention_mask": held["attention_mask"][:1]}
    tensors = [torch.from_numpy(v) for v in feeds.values()]
    calls = {"torch-eager-fp32": lambda: model(*tensors)}
    accuracy = {}
    for name, (bundle_key, target) in engines.items():
        bundle = bundles[bundle_key].bundle
        runner = load_runner(bundle, target)
        calls[name] = (lambda r: lambda: r.infer(feeds))(runner)
        entry = bundles[bundle_key].manifest.to_json()["targets"][target]
        accuracy[name] = {**entry["accuracy"]["held_out"], "size_bytes": entry.get("size_bytes")}
    with torch.no_grad():
        timing = time_interleaved(calls, args.rounds, baseline="torch-eager-fp32")
    for name in engines:
        ratio = np.asarray(timing["ort-fp32"]["p50_ms_per_round"]) / np.asarray(timing[name]["p50_ms_per_round"])
        timing[name]["speedup_vs_ort_fp32"] = float(np.median(ratio))
        base = "openvino-fp32" if name.startswith("openvino") else "ort-fp32"
        ratio = np.asarray(timing[base]["p50_ms_per_round"]) / np.asarray(timing[name]["p50_ms_per_round"])
        timing[name]["speedup_vs_own_fp32"] = float(np.median(ratio))
        timing[name]["speedup_vs_own_fp32_range"] = [float(ratio.min()), float(ratio.max())]

    results = {"benchmark": f"all-MiniLM-L6-v2 batch 1 seq 64, {args.threads} threads", "corpus": corpus,
               "held_out_sentences": int(len(held["input_ids"])), "rounds": args.rounds,
               "timing": timing, "accuracy": accuracy, "environment": environment()}
    rows = [["engine", "p50 ms", "spread %", "vs own FP32 (range)", "vs torch eager", "mean cosine",
             "NN agree %", "size MiB"]]
    for name, t in timing.items():
        a = accuracy.get(name)
        own = (f"{t['speedup_vs_own_fp32']:.2f}x ({t['speedup_vs_own_fp32_range'][0]:.2f}-"
               f"{t['speedup_vs_own_fp32_range'][1]:.2f})") if a else "-"
        rows.append([name, f"{t['p50_ms']:.2f}", f"{t['p50_spread_pct']:.1f}", own,
                     f"{t['speedup_vs_torch-eager-fp32']:.2f}x",
                     f"{a['mean_cosine']:.4f}" if a else "(reference)",
                     f"{a['retrieval_agreement_pct']:.1f}" if a else "-",
                     f"{a['size_bytes'] / 2**20:.1f}" if a else "-"])
    md = (f"# all-MiniLM-L6-v2, batch 1, sequence 64, {args.threads} threads\n\n"
          f"`python -m benchmarks.minilm_int8 --rounds {args.rounds} --threads {args.threads}`; "
          f"{results['held_out_sentences']} held-out sentences (stdlib docstrings, corpus sha256 "
          f"{corpus['corpus_sha256'][:12]}).\n\n" + markdown_table(rows)
          + f"\nMachine: {results['environment']['machine']['cpu']}.\n")
    write_results(Path(args.out) / "minilm_int8", results, md)
    print(md)


if __name__ == "__main__":
    main()
