"""TensorRT on a GPU: build, validate and time ``trt-fp16`` and ``trt-int8`` against PyTorch on the same GPU.

One prepared run for a machine with an NVIDIA GPU (well under ten minutes on one H100-class card):

1. Builds the digits CNN (trained here on the real digits) and ResNet-50 through ``optimize build``
   with ``trt-fp16``, ``trt-int8``, ``torch-compile`` and ``ort-fp32`` (ONNX Runtime on CUDA when
   onnxruntime-gpu is installed): each target is validated against the FP32 model by the build's
   accuracy gate.
2. Times every built target at batch 1, 8 and 32 (host arrays in and out, as served), beside torch
   eager FP16 on the same GPU, in interleaved rounds; prints a table and writes
   ``benchmarks/results/gpu.{md,json}``.

Where TensorRT is missing, its targets are reported unavailable with the reason and the
``torch-compile`` and eager parts still run.

    python -m benchmarks.gpu.run [--rounds 3] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import environment, markdown_table, write_results
from optimize.bundle import load_runner, read_manifest
from optimize.build.pipeline import run_build
from optimize.build.plan import BuildPlan, DataConfig, SourceConfig
from optimize.targets import registry

TARGETS = ("trt-fp16", "trt-int8", "torch-compile", "ort-fp32")
BATCHES = (1, 8, 32)


def build(work: Path, kind: str) -> Path:
    if kind == "digits":
        from models.digits import make_checkpoint

        make_checkpoint(work, epochs=10)
        source = SourceConfig(work / "digits.pt", "models.digits:DigitsNet")
        data = DataConfig(calib=str(work / "digits_calib.npz"), eval_data=str(work / "digits_test.npz"))
    else:
        from models.resnet import make_checkpoint

        make_checkpoint(work, 50, calib_samples=128)
        source = SourceConfig(work / "resnet50.pt", "models.resnet:resnet50")
        data = DataConfig(calib=str(work / "resnet_calib.npz"), held_out_fraction=0.25)
    plan = BuildPlan(source=source, out=work / "bundle", targets=TARGETS, data=data, batch_sizes=BATCHES)
    return run_build(plan).bundle


def eager_fp16(bundle: Path):
    """torch eager FP16 on the GPU, from the bundle's program; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    module = torch.export.load(str(bundle / "program.pt2")).module().to("cuda").half()

    def call(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = module(torch.from_numpy(x).to("cuda").half())
        return out.float().cpu().numpy()  # host out, like every runner
    return call


def time_call(call, x: np.ndarray, seconds: float = 1.5) -> float:
    for _ in range(5):
        call(x)
    times, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 20:
        start = time.perf_counter()
        call(x)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def measure(bundle: Path, rounds: int) -> dict:
    manifest = read_manifest(bundle).to_json()
    name = manifest["inputs"][0]["name"]
    held = np.load(bundle / "data" / "heldout.npz")[name]
    calls, entries = {}, {}
    for target, entry in manifest["targets"].items():
        entries[target] = {"status": entry["status"], "reason": entry.get("reason"),
                           "gate": entry.get("gate", {}).get("message"), "precision": entry.get("precision"),
                           "settings": entry.get("runner_settings")}
        if entry["status"] == "built":
            runner = load_runner(bundle, target)
            calls[target] = lambda x, r=runner: next(iter(r.infer({name: x}).values()))
    eager = eager_fp16(bundle)
    if eager is not None:
        calls["torch-eager-fp16"] = eager
    table: dict[str, dict[int, list[float]]] = {t: {b: [] for b in BATCHES} for t in calls}
    for _ in range(rounds):
        for batch in BATCHES:
            x = np.ascontiguousarray(np.resize(held, (batch, *held.shape[1:])))
            for target, call in calls.items():
                table[target][batch].append(time_call(call, x))
    latency = {t: {b: float(np.median(v)) for b, v in per.items()} for t, per in table.items()}
    return {"targets": entries, "latency_ms": latency, "rounds_ms": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--models", default="digits,resnet50")
    args = parser.parse_args()
    for target in TARGETS:
        print(f"{target}: {registry.unavailable_reason(target) or 'available'}")
    results, lines = {"environment": environment()}, ["# TensorRT and PyTorch on one GPU", ""]
    for kind in args.models.split(","):
        with tempfile.TemporaryDirectory(prefix=f"bench-gpu-{kind}-") as tmp:
            bundle = build(Path(tmp), kind)
            result = measure(bundle, args.rounds)
        results[kind] = result
        base = result["latency_ms"].get("torch-eager-fp16")
        rows = []
        for target, per in result["latency_ms"].items():
            rows.append([target, *(f"{per[b]:.3f}" for b in BATCHES),
                         *(f"{base[b] / per[b]:.2f}x" if base else "-" for b in BATCHES)])
        lines += [f"## {kind}: p50 ms at batch {', '.join(map(str, BATCHES))} (median of {args.rounds} rounds); "
                  "speed-up against torch eager FP16", "",
                  markdown_table([["engine", *(f"b{b} ms" for b in BATCHES), *(f"b{b} vs eager" for b in BATCHES)],
                                  *rows]), ""]
        for target, entry in result["targets"].items():
            lines.append(f"- {target}: {entry['status']}" + (f" ({entry['reason']})" if entry["reason"] else "")
                         + (f"; {entry['gate']}" if entry["gate"] else ""))
        lines.append("")
    text = "\n".join(lines)
    print(text)
    write_results(Path(args.out) / "gpu", results, text)


if __name__ == "__main__":
    main()
