"""The flags of ``optimize build`` in groups, each parsed into the typed config it becomes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import click

from optimize.errors import InputSpecError


def option_group(options: list) -> Callable[[Callable], Callable]:
    """A decorator applying ``options`` in their listed order."""
    def apply(command: Callable) -> Callable:
        for option in reversed(options):
            command = option(command)
        return command
    return apply


SOURCE_OPTIONS = [
    click.option("--arch", help="Architecture for a state_dict: module:factory or path/to/file.py:factory."),
    click.option("--arch-arg", multiple=True, help="key=value passed to the --arch factory (JSON values). Repeatable."),
    click.option("--trust-checkpoint", is_flag=True,
                 help="Allow a fully pickled module (unpickling runs code: only for files you trust)."),
]
DATA_OPTIONS = [
    click.option("--input-shape", "input_shapes", multiple=True,
                 help="1x3x224x224 or name:1x3x224x224[:dtype]; batch first. Repeat for several inputs."),
    click.option("--calib", help="Calibration data: .npy, .npz, a folder of images, or module:function."),
    click.option("--eval-data", help="Labelled evaluation data (.npz with 'labels', or image class folders)."),
    click.option("--held-out", "held_out", type=float, default=0.2, show_default=True,
                 help="Share of --calib held out for the accuracy gate (deterministic split)."),
    click.option("--max-held-out", type=int, default=2000, show_default=True,
                 help="Cap on held-out samples (more held out: a tighter interval on the accuracy drop)."),
    click.option("--max-calib-samples", type=int, default=1000, show_default=True, help="Cap on calibration samples."),
    click.option("--seed", type=int, default=0, show_default=True, help="Seed of the held-out split."),
    click.option("--image-size", help="Resize images to HEIGHTxWIDTH (default: the model folder's "
                                      "preprocessor_config.json, else the --input-shape)."),
    click.option("--mean", show_default="0.485,0.456,0.406",
                 help="Per-channel mean subtracted after scaling images to [0,1] (default: the model folder's "
                      "preprocessor_config.json, else ImageNet's; --mean 0 --std 1 keeps [0,1] pixels)."),
    click.option("--std", show_default="0.229,0.224,0.225",
                 help="Per-channel std divided by after the mean (default: as --mean)."),
    click.option("--grayscale", is_flag=True,
                 help="Read images as one grey channel, normalised with the first --mean and --std value "
                      "(0.485 and 0.229 unless given)."),
    click.option("--tokenizer", type=click.Path(path_type=Path),
                 help="Token models: the tokenizer.json (or its folder) to keep in the bundle, so the server takes text."),
    click.option("--max-sequence-length", type=click.IntRange(2, None),
                 help="Token models: the longest token sequence served, validated and (TensorRT) built for; longer "
                      "texts are cut and counted. Default: the model's own limit where its tokenizer files say."),
]
QUANT_OPTIONS = [
    click.option("--task", type=click.Choice(["classify", "embed", "regress"]),
                 help="How accuracy is measured (inferred when omitted: token inputs -> embed, "
                      "2-D multi-column output -> classify, else regress)."),
    click.option("--int8-scheme", type=click.Choice(["static", "dynamic", "weights"]),
                 help="INT8 form. Default: every scheme the backend offers is built, judged on the selection split "
                      "and timed on this CPU; the fastest within budget is kept (the manifest's scheme_choice)."),
    click.option("--calib-method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax",
                 show_default=True, help="Activation range calibration for static INT8."),
    click.option("--per-channel/--per-tensor", default=True, show_default=True,
                 help="Weight scales per output channel."),
    click.option("--no-recover", is_flag=True,
                 help="Do not keep sensitive layers in FP32 when INT8 breaches the budget."),
    click.option("--max-accuracy-drop", "max_drop_text",
                 help="Budget in percentage points, e.g. 1 or 1% (classify: accuracy or agreement; embed: "
                      "100*(1-cosine)); regress: max abs error. Default 1.0 for classify and embed."),
    click.option("--strict", is_flag=True,
                 help="Stop with an error where a result is probably wrong (the FP32 model at chance level on "
                      "the labelled data), instead of warning."),
]
ENGINE_OPTIONS = [
    click.option("--threads", type=click.IntRange(0, None), default=0, show_default=True, envvar="OPTIMIZE_THREADS",
                 help="Inference threads (0: all physical cores; also OPTIMIZE_THREADS)."),
    click.option("--spin/--no-spin", default=True, show_default=True, envvar="OPTIMIZE_SPIN",
                 help="ONNX Runtime's threads keep spinning after a call, so the next starts at once; --no-spin "
                      "(OPTIMIZE_SPIN=0) frees the cores between calls on a shared machine. The server never spins."),
    click.option("--name", help="Model name (default: the checkpoint's file name)."),
    click.option("--no-cache", is_flag=True, help="Do not reuse or write the stage cache."),
    click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), envvar="OPTIMIZE_CACHE_DIR",
                 help="Stage cache to share between bundles (also OPTIMIZE_CACHE_DIR; default: OUT.cache/ beside "
                      "the bundle). It grows by one folder per distinct stage; delete it to clear it."),
    click.option("--batch-sizes", default="1,8,32", show_default=True,
                 help="Batch sizes the engine must take: TensorRT's profile spans min..max, tuned for the middle one."),
]
source_options, data_options = option_group(SOURCE_OPTIONS), option_group(DATA_OPTIONS)
quant_options, engine_options = option_group(QUANT_OPTIONS), option_group(ENGINE_OPTIONS)


def floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise InputSpecError(f"{flag} {text!r} must be comma-separated numbers, e.g. 0.485,0.456,0.406")


def image_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        height, width = (int(v) for v in text.lower().split("x"))
        return height, width
    except ValueError:
        raise InputSpecError(f"--image-size {text!r} must be HEIGHTxWIDTH, e.g. 224x224")


def accuracy_drop(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text.strip().rstrip("%"))
    except ValueError:
        raise InputSpecError(f"--max-accuracy-drop {text!r} must be a number of points, e.g. 1 or 1%")
    if value < 0:
        raise InputSpecError(f"--max-accuracy-drop {text!r} must not be negative")
    return value


def source_config(checkpoint: Path, o: dict[str, Any]) -> Any:
    from optimize.inputs.checkpoint import parse_arch_args
    from optimize.build.plan import SourceConfig

    return SourceConfig(checkpoint, o["arch"], parse_arch_args(o["arch_arg"]), o["trust_checkpoint"])


def data_config(o: dict[str, Any]) -> Any:
    from optimize.inputs.calibration import ImageOptions
    from optimize.build.plan import DataConfig

    if not 0 < o["held_out"] < 1:
        raise InputSpecError(f"--held-out {o['held_out']} must be between 0 and 1")
    stated = tuple(k for k, flag in (("size", "image_size"), ("mean", "mean"), ("std", "std")) if o[flag] is not None)
    image = ImageOptions(size=image_size(o["image_size"]),
                         mean=floats(o["mean"], "--mean") if o["mean"] is not None else ImageOptions.mean,
                         std=floats(o["std"], "--std") if o["std"] is not None else ImageOptions.std,
                         grayscale=o["grayscale"], stated=stated)
    return DataConfig(o["input_shapes"], o["calib"], o["eval_data"], o["held_out"], o["max_held_out"],
                      o["max_calib_samples"], o["seed"], image, train_data=o["train_data"],
                      tokenizer=str(o["tokenizer"]) if o["tokenizer"] else None,
                      max_sequence_length=o["max_sequence_length"])


def quant_config(o: dict[str, Any]) -> Any:
    from optimize.build.plan import QuantConfig

    return QuantConfig(o["int8_scheme"], o["calib_method"], o["per_channel"], recover_accuracy=not o["no_recover"])
