"""``optimize build``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from optimize.cli.bench import _numbers, bench_and_report, selection_options
from optimize.cli.prune_options import prune_configs, prune_options
from optimize.errors import InputSpecError


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise InputSpecError(f"{flag} {text!r} must be comma-separated numbers, e.g. 0.485,0.456,0.406")


def _size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        height, width = (int(v) for v in text.lower().split("x"))
        return height, width
    except ValueError:
        raise InputSpecError(f"--image-size {text!r} must be HEIGHTxWIDTH, e.g. 224x224")


def _drop(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text.strip().rstrip("%"))
    except ValueError:
        raise InputSpecError(f"--max-accuracy-drop {text!r} must be a number of points, e.g. 1 or 1%")
    if value < 0:
        raise InputSpecError(f"--max-accuracy-drop {text!r} must not be negative")
    return value


@click.command("build")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Bundle folder to write (replaced atomically; the stage cache goes to OUT.cache/).")
@click.option("--target", "targets", multiple=True, default=("all",), show_default=True,
              help="ort-fp32, ort-int8, openvino-fp32, openvino-int8, trt-fp16, trt-int8, or all. "
                   "Repeat or comma-separate.")
@click.option("--arch", help="Architecture for a state_dict: module:factory or path/to/file.py:factory.")
@click.option("--arch-arg", multiple=True, help="key=value passed to the --arch factory (JSON values). Repeatable.")
@click.option("--trust-checkpoint", is_flag=True,
              help="Allow a fully pickled module (unpickling runs code: only for files you trust).")
@click.option("--input-shape", "input_shapes", multiple=True,
              help="1x3x224x224 or name:1x3x224x224[:dtype]; batch first. Repeat for several inputs.")
@click.option("--calib", help="Calibration data: .npy, .npz, a folder of images, or module:function.")
@click.option("--eval-data", help="Labelled evaluation data (.npz with 'labels', or image class folders).")
@click.option("--held-out", "held_out", type=float, default=0.2, show_default=True,
              help="Share of --calib held out for the accuracy gate (deterministic split).")
@click.option("--max-held-out", type=int, default=500, show_default=True, help="Cap on held-out samples.")
@click.option("--max-calib-samples", type=int, default=1000, show_default=True, help="Cap on calibration samples.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the held-out split.")
@click.option("--image-size", help="Resize images to HEIGHTxWIDTH (default: the --input-shape).")
@click.option("--mean", default="0.485,0.456,0.406", show_default=True, help="Per-channel mean after scaling to [0,1].")
@click.option("--std", default="0.229,0.224,0.225", show_default=True, help="Per-channel std after scaling to [0,1].")
@click.option("--grayscale", is_flag=True, help="Read images as one grey channel.")
@click.option("--tokenizer", type=click.Path(path_type=Path),
              help="Token models: the tokenizer.json (or its folder) to keep in the bundle, so the server takes text.")
@click.option("--task", type=click.Choice(["classify", "embed", "regress"]),
              help="How accuracy is measured (inferred when omitted: token inputs -> embed, "
                   "2-D multi-column output -> classify, else regress).")
@click.option("--int8-scheme", type=click.Choice(["static", "dynamic", "weights"]),
              help="INT8 form (default: static for CNNs, weights for transformers).")
@click.option("--calib-method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax",
              show_default=True, help="Activation range calibration for static INT8.")
@click.option("--per-channel/--per-tensor", default=True, show_default=True, help="Weight scales per output channel.")
@click.option("--no-recover", is_flag=True, help="Do not keep sensitive layers in FP32 when INT8 breaches the budget.")
@click.option("--max-accuracy-drop", "max_drop_text",
              help="Budget in percentage points, e.g. 1 or 1% (classify: accuracy or agreement; embed: "
                   "100*(1-cosine)); regress: max abs error. Default 1.0 for classify and embed.")
@click.option("--threads", type=int, default=0, show_default=True, help="Inference threads (0: all physical cores).")
@click.option("--name", help="Model name (default: the checkpoint's file name).")
@click.option("--no-cache", is_flag=True, help="Do not reuse or write the stage cache.")
@click.option("--batch-sizes", default="1,8,32", show_default=True,
              help="Batch sizes the engine must take: TensorRT's profile spans min..max, tuned for the middle one.")
@selection_options
@prune_options
def command(checkpoint: Path, out: Path, targets: tuple[str, ...], arch: str | None, arch_arg: tuple[str, ...],
            trust_checkpoint: bool, input_shapes: tuple[str, ...], calib: str | None, eval_data: str | None,
            held_out: float, max_held_out: int, max_calib_samples: int, seed: int, image_size: str | None,
            mean: str, std: str, grayscale: bool, tokenizer: Path | None, task: str | None, int8_scheme: str | None,
            calib_method: str, per_channel: bool, no_recover: bool, max_drop_text: str | None,
            threads: int, name: str | None, no_cache: bool, batch_sizes: str, load_text: str, latency_slo: str | None,
            allow_slo_miss: bool, **prune_flags) -> None:
    """Build engines from a PyTorch checkpoint into a bundle, gated on accuracy against FP32.

    With --target auto (or a --latency-slo) every available target is built, validated,
    benchmarked at --load, and the fastest within the accuracy budget that meets the SLO is
    recorded as the bundle's winner.

    \b
      optimize build digits.pt --arch models.digits:DigitsNet --calib digits_calib.npz \\
          --eval-data digits_test.npz --target all --out bundle/
      optimize build digits.pt --arch models.digits:DigitsNet --calib digits_calib.npz \\
          --prune 0.5 --target openvino-int8 --out pruned/
    """
    from optimize.calibration import ImageOptions
    from optimize.checkpoint import parse_arch_args
    from optimize.pipeline import run_build
    from optimize.plan import BuildPlan, DataConfig, QuantConfig, SourceConfig
    from optimize.report import targets_table
    from optimize.targets.base import RunnerConfig

    if not 0 < held_out < 1:
        raise InputSpecError(f"--held-out {held_out} must be between 0 and 1")
    from optimize.select import parse_load, parse_slo

    prune, distill = prune_configs(prune_flags)
    max_accuracy_drop = _drop(max_drop_text)
    load = parse_load(load_text)
    slo = parse_slo(latency_slo) if latency_slo else None
    select_winner = slo is not None or any(t.strip() == "auto" for item in targets for t in item.split(","))
    image = ImageOptions(size=_size(image_size), mean=_floats(mean, "--mean"), std=_floats(std, "--std"),
                         grayscale=grayscale)
    plan = BuildPlan(
        source=SourceConfig(checkpoint, arch, parse_arch_args(arch_arg), trust_checkpoint),
        out=out, targets=targets,
        data=DataConfig(input_shapes, calib, eval_data, held_out, max_held_out, max_calib_samples, seed, image,
                        train_data=prune_flags["train_data"], tokenizer=str(tokenizer) if tokenizer else None),
        quant=QuantConfig(int8_scheme, calib_method, per_channel, recover_accuracy=not no_recover),
        task=task, max_accuracy_drop=max_accuracy_drop, name=name,
        runner=RunnerConfig(threads=threads), use_cache=not no_cache, prune=prune, distill=distill,
        batch_sizes=_numbers(batch_sizes, "--batch-sizes"))
    result = run_build(plan, say=lambda text: click.echo(text, err=True))
    click.echo(targets_table(result.manifest))
    click.echo(f"bundle: {result.bundle}")
    explicit = [t for t in targets if t not in ("all", "auto")]
    unavailable = [n for n, e in result.manifest["targets"].items()
                   if e["status"] == "unavailable" and n in ",".join(explicit).split(",")]
    built = [n for n, e in result.manifest["targets"].items() if e["status"] == "built"]
    # With a winner to choose, a target that failed its gate is simply not a candidate.
    if unavailable or not built or (result.failed and not select_winner):
        sys.exit(1)
    if select_winner:
        from optimize.bench.load import LoadPlan
        from optimize.bench.run import BenchConfig

        plan = LoadPlan(batch_sizes=(1,), concurrency=(), rates=(), rate_fractions=(), duration_s=3.0)
        bench_and_report(result.bundle, BenchConfig(plan=plan, cross_check=False), slo, load, allow_slo_miss)
