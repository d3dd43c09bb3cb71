"""``optimize build``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from optimize.cli.bench import _numbers, print_bench, selection_options
from optimize.cli.build_options import (accuracy_drop, data_config, data_options, engine_options, quant_config,
                                        quant_options, source_config, source_options)
from optimize.cli.prune_options import prune_configs, prune_options


@click.command("build")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Bundle folder to write (replaced atomically; the stage cache goes to OUT.cache/ unless --cache-dir).")
@click.option("--target", "targets", multiple=True, default=("all",), show_default=True,
              help="ort-fp32, ort-int8, openvino-fp32, openvino-int8, trt-fp16, trt-int8, torch-compile, all, "
                   "or auto (all, then benchmark and pick the winner). Repeat or comma-separate.")
@source_options
@data_options
@quant_options
@engine_options
@selection_options
@prune_options
@click.option("--bench-duration", default="3s", show_default=True,
              help="With --target auto or --latency-slo: how long each engine is measured per round (3 rounds).")
@click.option("--mlflow", "mlflow_uri", help="Record this build in MLflow: a tracking server URI, or file:/sqlite: "
                                            "(default: MLFLOW_TRACKING_URI when set).")
def command(checkpoint: Path, out: Path, targets: tuple[str, ...], **options) -> None:
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
    from optimize.auto import Selection, build_and_select, names_auto
    from optimize.build.plan import BuildPlan
    from optimize.bundle.table import targets_table
    from optimize.select import parse_duration, parse_load, parse_slo
    from optimize.targets.base import RunnerConfig

    prune, distill = prune_configs(options)
    slo = parse_slo(options["latency_slo"]) if options["latency_slo"] else None
    load = parse_load(options["load_text"])
    duration = parse_duration(options["bench_duration"], "--bench-duration")
    selection = (Selection(load=load, slo=slo, duration_s=duration)
                 if slo is not None or names_auto(targets) else None)
    plan = BuildPlan(
        source=source_config(checkpoint, options), out=out, targets=targets, data=data_config(options),
        quant=quant_config(options), task=options["task"], max_accuracy_drop=accuracy_drop(options["max_drop_text"]),
        name=options["name"], runner=RunnerConfig(threads=options["threads"], idle_spin=options["spin"]),
        use_cache=not options["no_cache"], cache_dir=options["cache_dir"],
        prune=prune, distill=distill, batch_sizes=_numbers(options["batch_sizes"], "--batch-sizes"),
        strict=options["strict"])
    result = build_and_select(plan, selection)
    from optimize.search.tracking import log_build, tracking_uri

    if tracking_uri(options["mlflow_uri"]):
        log_build(tracking_uri(options["mlflow_uri"]), result)
    click.echo(targets_table(result.manifest))
    click.echo(f"bundle: {result.bundle}")
    from optimize.cli.report import refresh

    page = refresh(result.bundle) if result.manifest.built_targets() else None
    if page is not None:
        click.echo(f"page: {page} (and MODEL_CARD.md)")
    explicit = {t.strip() for item in targets for t in item.split(",")} - {"all", "auto"}
    unavailable = [n for n, t in result.manifest.targets.items() if t.status == "unavailable" and n in explicit]
    built = result.manifest.built_targets()
    if result.report is not None:
        print_bench(result.report, result.decision, result.report_folder, options["allow_slo_miss"])
    # With a winner to choose, a target that failed its gate is simply not a candidate.
    if unavailable or not built or (result.failed and selection is None):
        sys.exit(1)
