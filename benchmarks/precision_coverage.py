"""What every CPU engine really computes in, read back from the engine: every INT8 scheme, BF16 and
FP32 of one model on the CPU at hand.

One build per INT8 scheme (``--int8-scheme`` given, no recovery: each scheme as it comes out of its
quantizer) and one of the float targets, all through ``run_build`` (what the CLI runs) into one
stage cache. For each engine: the share of MACs computed in INT8, BF16 and FP32, the share of the
weight bytes stored in each, the kernels where the backend names them (OpenVINO's
``primitiveType``; ONNX Runtime's and torch-compile's are not reported), the gate and the status.
A scheme that quantizes nothing is refused with its reason, which the table shows.

    python -m benchmarks.precision_coverage --model digits|resnet50|minilm
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.common import environment, markdown_table, write_results
from optimize.build.pipeline import run_build
from optimize.build.plan import BuildPlan, DataConfig, QuantConfig, SourceConfig
from optimize.targets.coverage import label

FLOAT = ("ort-fp32", "openvino-fp32", "openvino-bf16", "torch-compile")
SCHEMES = {"static": ("ort-int8", "openvino-int8"), "dynamic": ("ort-int8",), "weights": ("ort-int8", "openvino-int8")}


def model_setup(name: str, work: Path) -> tuple[SourceConfig, DataConfig]:
    if name == "digits":
        from models.digits import make_checkpoint

        make_checkpoint(work)
        return SourceConfig(work / "digits.pt", "models.digits:DigitsNet"), DataConfig(calib=str(work / "digits_calib.npz"))
    if name == "minilm":
        from models.minilm import make_checkpoint

        make_checkpoint(work)
        return SourceConfig(work / "minilm.pt", "models.minilm:MiniLM"), DataConfig(calib=str(work / "minilm_text.npz"))
    from models.resnet import make_checkpoint

    make_checkpoint(work, 50, calib_samples=80)
    return (SourceConfig(work / "resnet50.pt", "models.resnet:resnet50"),
            DataConfig(calib=str(work / "resnet_calib.npz"), held_out_fraction=0.2))


def pct(values: dict[str, float] | None, key: str) -> str:
    return f"{values.get(key, 0.0):.1f}" if values else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("digits", "resnet50", "minilm"), default="digits")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix=f"coverage-{args.model}-"))
    source, data = model_setup(args.model, work)
    builds = {"float": run_build(BuildPlan(source, work / "float", FLOAT, data, QuantConfig()))}
    for scheme, targets in SCHEMES.items():
        builds[scheme] = run_build(BuildPlan(source, work / scheme, targets, data,
                                             QuantConfig(int8_scheme=scheme, recover_accuracy=False)))
    rows = [["target", "precision", "MACs INT8 %", "BF16 %", "FP32 %", "weight bytes INT8 %", "BF16 %", "FP32 %",
             "kernels (share of MACs)", "status"]]
    engines = {}
    for key, build in builds.items():
        for target, record in build.manifest.targets.items():
            scheme = (record.build_config or {}).get("int8_scheme")
            read = record.coverage or {}
            name = target if key == "float" else f"{target} {scheme}"
            engines[name] = {"status": record.status, "reason": record.reason, "precision": record.precision,
                             "scheme": scheme, "coverage": read, "gate": (record.gate or {}).get("message")}
            kernels = read.get("kernels", "-")
            if isinstance(kernels, dict):
                kernels = ", ".join(f"{k} {v:.1f}%" for k, v in list(kernels.items())[:3])
            macs, weights = read.get("macs_pct"), read.get("weight_bytes_pct")
            rows.append([target, label(record.precision, scheme, read), pct(macs, "int8"), pct(macs, "bf16"),
                         pct(macs, "fp32"), pct(weights, "int8"), pct(weights, "bf16"), pct(weights, "fp32"), kernels,
                         record.status + (f": {record.reason}" if record.reason else "")])
    env = environment()
    cpu = env["machine"]
    md = (f"# Precision read back from every CPU engine, {args.model}\n\n"
          f"`python -m benchmarks.precision_coverage --model {args.model}` on {cpu['cpu']} "
          f"({', '.join(cpu['isa'])}). MACs at one sample as each engine executes them; every INT8 scheme as "
          f"its quantizer leaves it (no recovery).\n\n" + markdown_table(rows))
    write_results(Path(args.out) / f"precision_coverage_{args.model}", {"model": args.model, "engines": engines,
                                                                         "environment": env}, md)
    print(md)


if __name__ == "__main__":
    main()
