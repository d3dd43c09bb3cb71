"""ResNet-50, batch 1: our INT8 engines against torch eager FP32 and NNCF's own default flow.

Builds ``ort-fp32``, ``ort-int8``, ``openvino-fp32`` and ``openvino-int8`` with ``optimize``
(the same plan the CLI makes), builds the vendor's reference flow beside it (``ov.convert_model``
of the torch model, ``nncf.quantize`` with defaults, compiled with the same thread settings), and
times every engine interleaved, round after round, so that drift on a noisy machine hits all
alike. Reports median latency per engine, its spread over rounds, the paired speedup over torch
eager, our OpenVINO INT8 against NNCF's flow, and output agreement with torch FP32.

    python -m benchmarks.resnet50_int8 [--rounds 7] [--threads 2] [--depth 50]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import environment, markdown_table, time_interleaved, write_results
from optimize import validate
from optimize.bundle import load_runner
from optimize.build.pipeline import run_build
from optimize.build.plan import BuildPlan, DataConfig, SourceConfig
from optimize.targets.base import RunnerConfig

TARGETS = ("ort-fp32", "ort-int8", "openvino-fp32", "openvino-int8")


def nncf_default_flow(model, calibration: np.ndarray, threads: int):
    """What the OpenVINO docs show: convert the torch model, nncf.quantize with defaults."""
    import nncf
    import openvino as ov
    import torch

    ov_model = ov.convert_model(model, example_input=torch.from_numpy(calibration[:1]))
    quantized = nncf.quantize(ov_model, nncf.Dataset([calibration[i:i + 1] for i in range(len(calibration))]),
                              subset_size=len(calibration))
    return ov.Core().compile_model(quantized, "CPU", {"PERFORMANCE_HINT": "LATENCY",
                                                      "INFERENCE_NUM_THREADS": threads})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--depth", type=int, choices=(18, 50), default=50)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    import torch

    from models.resnet import make_checkpoint, resnet18, resnet50

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-resnet-"))
    make_checkpoint(work, args.depth, calib_samples=80)
    arch = f"models.resnet:resnet{args.depth}"
    plan = BuildPlan(source=SourceConfig(work / f"resnet{args.depth}.pt", arch), out=work / "bundle",
                     targets=TARGETS, data=DataConfig(calib=str(work / "resnet_calib.npz"), held_out_fraction=0.2),
                     runner=RunnerConfig(threads=args.threads))
    result = run_build(plan)
    bundle = result.bundle
    model = {18: resnet18, 50: resnet50}[args.depth]()
    model.load_state_dict(torch.load(work / f"resnet{args.depth}.pt", weights_only=True))
    model.eval()
    calib = np.load(work / "resnet_calib.npz")["x"]
    held = np.load(bundle / "data" / "heldout.npz")["x"]
    reference = np.load(bundle / "data" / "reference.npz")["output"]
    vendor = nncf_default_flow(model, calib[:64], args.threads)

    x1 = held[:1]
    runners = {name: load_runner(bundle, name) for name in TARGETS}
    request = vendor.create_infer_request()
    calls = {"torch-eager-fp32": lambda: model(torch.from_numpy(x1))}
    for name, runner in runners.items():
        calls[name] = (lambda r: lambda: r.infer({"x": x1}))(runner)
    calls["nncf-default-flow"] = lambda: request.infer([x1])
    with torch.no_grad():
        timing = time_interleaved(calls, args.rounds, baseline="torch-eager-fp32")

    agreement = {}
    for name, runner in runners.items():
        out = runner.infer_all({"x": held[i:i + 8]} for i in range(0, len(held), 8))["output"]
        agreement[name] = validate.metrics("classify", reference, out)
    vendor_out = np.concatenate([request.infer([held[i:i + 1]])[0] for i in range(len(held))])
    agreement["nncf-default-flow"] = validate.metrics("classify", reference, vendor_out)
    for name, metric in agreement.items():
        cos = validate.metrics("embed", reference, vendor_out if name == "nncf-default-flow" else
                               runners[name].infer_all({"x": held[i:i + 8]} for i in range(0, len(held), 8))["output"])
        metric["logit_cosine"] = cos["mean_cosine"]

    ours_vs_vendor = np.asarray(timing["openvino-int8"]["p50_ms_per_round"]) / np.asarray(
        timing["nncf-default-flow"]["p50_ms_per_round"])
    ort_vs_vendor = np.asarray(timing["ort-int8"]["p50_ms_per_round"]) / np.asarray(
        timing["nncf-default-flow"]["p50_ms_per_round"])
    results = {"benchmark": f"resnet{args.depth} batch 1, {args.threads} threads", "rounds": args.rounds,
               "timing": timing, "agreement_with_torch_fp32": agreement,
               "openvino_int8_over_nncf_flow": {"median": float(np.median(ours_vs_vendor)),
                                                "range": [float(ours_vs_vendor.min()), float(ours_vs_vendor.max())]},
               "ort_int8_over_nncf_flow": {"median": float(np.median(ort_vs_vendor)),
                                           "range": [float(ort_vs_vendor.min()), float(ort_vs_vendor.max())]},
               "build": {n: {k: e.get(k) for k in ("status", "size_bytes", "build_time_s", "build_config")}
                         for n, e in result.manifest.to_json()["targets"].items()},
               "environment": environment()}
    rows = [["engine", "p50 ms (median of rounds)", "spread %", "p99 ms", "speedup vs torch eager (range)",
             "top-1 agree %", "logit cosine"]]
    for name, t in timing.items():
        a = agreement.get(name, {})
        low, high = t["speedup_vs_torch-eager-fp32_range"]
        rows.append([name, f"{t['p50_ms']:.1f}", f"{t['p50_spread_pct']:.1f}", f"{t['p99_ms']:.1f}",
                     f"{t['speedup_vs_torch-eager-fp32']:.2f}x ({low:.2f}-{high:.2f})",
                     f"{a['top1_agreement_pct']:.1f}" if a else "(reference)",
                     f"{a['logit_cosine']:.4f}" if a else "-"])
    md = (f"# ResNet-{args.depth}, batch 1, {args.threads} threads\n\n"
          f"`python -m benchmarks.resnet50_int8 --depth {args.depth} --rounds {args.rounds} --threads {args.threads}`\n\n"
          + markdown_table(rows)
          + f"\nOur openvino-int8 / NNCF default flow latency: median {results['openvino_int8_over_nncf_flow']['median']:.3f} "
          f"(range {ours_vs_vendor.min():.3f}-{ours_vs_vendor.max():.3f}); our ort-int8 / NNCF flow: "
          f"{results['ort_int8_over_nncf_flow']['median']:.3f}.\n\n"
          f"Machine: {results['environment']['machine']['cpu']}, {results['environment']['machine']['cores']} cores.\n")
    write_results(Path(args.out) / f"resnet{args.depth}_int8", results, md)
    print(md)


if __name__ == "__main__":
    main()
