"""MobileNetV2 (random weights; speed only), batch 1: INT8 against FP32 per backend, same run.

INT8 depthwise convolutions are often slower than FP32 on CPUs without VNNI: they do little
arithmetic per byte, and the extra Q/DQ work is not paid back. Builds ``ort-fp32``, ``ort-int8``,
``openvino-fp32`` and ``openvino-int8`` with ``optimize``, plus an ``ort-int8`` variant that keeps
the depthwise (grouped) convolutions in FP32, and times them and torch eager interleaved.

    python -m benchmarks.mobilenet_int8 [--rounds 7] [--threads 2]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import environment, markdown_table, time_interleaved, timing_parser, write_results
from optimize.bundle import load_runner
from optimize.build.pipeline import run_build
from optimize.environment import machine_info
from optimize.build.plan import BuildPlan, DataConfig, SourceConfig
from optimize.targets.base import BuildConfig, BuildInputs, RunnerConfig

TARGETS = ("ort-fp32", "ort-int8", "openvino-fp32", "openvino-int8")


def depthwise_kept(bundle: Path, work: Path, calibration: np.ndarray, threads: int):
    """``ort-int8`` with every grouped convolution left FP32 (the same quantizer, ``keep_fp32``)."""
    import onnx

    from optimize.inputs.calibration import Samples
    from optimize.targets import onnxruntime as ort_target

    graph = onnx.load(str(bundle / "model.onnx")).graph
    grouped = tuple(n.name for n in graph.node if n.op_type == "Conv"
                    and any(a.name == "group" and a.i > 1 for a in n.attribute))
    folder = work / "ort-int8-depthwise-fp32"
    ort_target.BACKEND.build(BuildInputs(bundle / "model.onnx"), BuildConfig("int8", "static", keep_fp32=grouped),
                             Samples({"x": calibration}), folder)
    return ort_target.BACKEND.runner(folder, RunnerConfig(threads=threads)), len(grouped)


def _vnni() -> str:
    """Whether the CPU has VNNI (INT8 dot products), from /proc/cpuinfo."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return "VNNI unknown"
    vnni = [f for f in flags if "vnni" in f]
    return f"VNNI: {', '.join(vnni)}" if vnni else f"no VNNI ({'AVX2' if 'avx2' in flags else 'no AVX2'})"


def main() -> None:
    args = timing_parser(__doc__, 7).parse_args()

    import torch

    from models.mobilenet import mobilenet_v2
    from models.resnet import random_images

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-mobilenet-"))
    torch.manual_seed(0)
    model = mobilenet_v2().eval()
    torch.save(model.state_dict(), work / "mobilenet.pt")
    calibration = random_images(64)
    np.savez(work / "calib.npz", x=calibration)
    plan = BuildPlan(source=SourceConfig(work / "mobilenet.pt", "models.mobilenet:mobilenet_v2"), out=work / "bundle",
                     targets=TARGETS, data=DataConfig(calib=str(work / "calib.npz"), held_out_fraction=0.25),
                     runner=RunnerConfig(threads=args.threads), max_accuracy_drop=100.0)
    bundle = run_build(plan).bundle
    x1 = calibration[:1]
    calls = {"torch-eager-fp32": lambda: model(torch.from_numpy(x1))}
    runners = {t: load_runner(bundle, t) for t in TARGETS}
    runners["ort-int8, depthwise FP32"], grouped = depthwise_kept(bundle, work, calibration, args.threads)
    for name, runner in runners.items():
        calls[name] = (lambda r: lambda: r.infer({"x": x1}))(runner)
    with torch.no_grad():
        timing = time_interleaved(calls, args.rounds, baseline="torch-eager-fp32")
    fp32_of = {"ort-int8": "ort-fp32", "openvino-int8": "openvino-fp32", "ort-int8, depthwise FP32": "ort-fp32"}
    rows = [["engine", "p50 ms", "spread %", "vs torch eager (range)", "INT8 / same backend FP32 speed (range)"]]
    summary = {}
    for name, t in timing.items():
        versus = "-"
        if name in fp32_of:
            ratio = (np.asarray(timing[fp32_of[name]]["p50_ms_per_round"]) / np.asarray(t["p50_ms_per_round"]))
            versus = f"{np.median(ratio):.2f}x ({ratio.min():.2f}-{ratio.max():.2f})"
            t = {**t, "speed_vs_fp32": float(np.median(ratio)), "speed_vs_fp32_range": [float(ratio.min()),
                                                                                         float(ratio.max())]}
        summary[name] = t
        rows.append([name, f"{t['p50_ms']:.2f}", f"{t['p50_spread_pct']:.0f}",
                     f"{t['speedup_vs_torch-eager-fp32']:.2f}x ({t['speedup_vs_torch-eager-fp32_range'][0]:.2f}-"
                     f"{t['speedup_vs_torch-eager-fp32_range'][1]:.2f})", versus])
    machine = machine_info()
    md = (f"# MobileNetV2, batch 1, {args.threads} threads: INT8 against FP32\n\n"
          f"`python -m benchmarks.mobilenet_int8 --rounds {args.rounds} --threads {args.threads}`\n\n"
          + markdown_table(rows)
          + f"\nRandom weights (speed only). `ort-int8, depthwise FP32` keeps the {grouped} grouped convolutions "
            f"unquantized. Ratios are paired per round.\n\nMachine: {machine.get('cpu')}, {machine.get('cores')} cores, "
            f"{_vnni()}.\n")
    write_results(Path(args.out) / "mobilenet_int8", {"engines": summary, "grouped_convolutions": grouped,
                                                      "environment": environment()}, md)
    for runner in runners.values():
        runner.close()
    print(md)


if __name__ == "__main__":
    main()
