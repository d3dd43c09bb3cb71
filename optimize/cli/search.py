"""``optimize search``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from optimize.cli.build_options import data_config, data_options, source_config, source_options
from optimize.cli.prune_options import OPTIONS as PRUNE_OPTIONS
from optimize.cli.prune_options import option_group, prune_configs
from optimize.errors import InputSpecError

# The build's pruning and recovery flags, except --prune: here it is a dimension of the space.
recovery_options = option_group(PRUNE_OPTIONS[1:])


def budget(text: str | None) -> tuple[float | None, bool]:
    """(--max-accuracy-drop as points, whether it is switched off)."""
    from optimize.cli.build_options import accuracy_drop

    if text is not None and text.strip().lower() in ("off", "none"):
        return float("inf"), True
    return accuracy_drop(text), False


@click.command("search")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Where the winner's bundle goes; the search's own state (trials, Optuna's study, report) "
                   "goes to OUT.search/ and the shared stage cache to OUT.search/cache/.")
@click.option("--prune", "prune_values", help="Prune ratios to try, e.g. 0,0.25,0.5 (default: CNNs 0,0.3,0.5 of "
                                              "the channels; transformers 0,0.25 of the heads).")
@click.option("--target", "target_values", help="Targets to try, e.g. ort-int8,openvino-int8,ort-fp32 "
                                                "(default: every target this machine builds).")
@click.option("--int8-scheme", "scheme_values", help="INT8 schemes to try: static,dynamic,weights (default: CNNs "
                                                     "static; transformers all three), each where the target has it.")
@click.option("--calib-method", "method_values", help="Static INT8 calibrations to try: minmax,entropy,percentile "
                                                      "(default: CNNs all three; transformers minmax).")
@click.option("--per-channel", "per_channel_values", help="Weight scales to try: true (per channel), false (per "
                                                          "tensor) or true,false (default: true).")
@click.option("--threads", "thread_values", help="Inference thread counts to try, e.g. 1,2 (default: 0, all "
                                                 "physical cores).")
@click.option("--trials", type=click.IntRange(1, None),
              help="How many trials (default: the whole space when it has at most 32 configurations, else 32 "
                   "proposed by Optuna). At least the space's size: a grid.")
@click.option("--time-budget", help="Stop starting trials after this long, e.g. 30m or 120m.")
@click.option("--parallel", type=click.IntRange(1, None),
              help="Trials at once (default: one per CPU). Builds overlap; benchmarks never do.")
@click.option("--ray-address", help="Run the trials on this Ray cluster (default: a local Ray started here). "
                                    "OUT must be on storage every node sees.")
@click.option("--mlflow", "mlflow_uri", help="Record the search in MLflow: a tracking server URI, or file:/sqlite: "
                                            "(default: MLFLOW_TRACKING_URI when set).")
@click.option("--fresh", is_flag=True, help="Forget an earlier search in OUT.search/ and start over.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), envvar="OPTIMIZE_CACHE_DIR",
              help="Stage cache the trials share, with other searches and builds too (also OPTIMIZE_CACHE_DIR; "
                   "default: OUT.search/cache/).")
@click.option("--search-seed", type=int, default=0, show_default=True, help="Seed of Optuna's sampler.")
@source_options
@data_options
@click.option("--task", type=click.Choice(["classify", "embed", "regress"]),
              help="How accuracy is measured (inferred when omitted).")
@click.option("--max-accuracy-drop", "max_drop_text",
              help="Accuracy budget in points (e.g. 1 or 1%); 'off' judges on speed only (a model with random "
                   "weights), said in the report. Default: the task's (1.0 for classify and embed).")
@click.option("--strict", is_flag=True, help="A probably-wrong result (FP32 at chance level) is an error.")
@click.option("--name", help="Model name (default: the checkpoint's file name).")
@click.option("--batch-sizes", default="1,8,32", show_default=True, help="Batch sizes the engines must take.")
@click.option("--load", "load_text", default="batch=1", show_default=True,
              help="The load every trial is benchmarked and judged at: batch=N, concurrency=N or rate=R.")
@click.option("--latency-slo", help="The winner must meet it, e.g. p99=20ms (its percentile is the latency judged).")
@click.option("--duration", default="3s", show_default=True, help="Benchmark time per trial and engine.")
@click.option("--rounds", type=click.IntRange(1, 20), default=3, show_default=True,
              help="Benchmark rounds per trial, engine and torch eager interleaved; the spread is their range.")
@click.option("--tune", "tune_time", help="End by tuning the winner's serving configuration for this long "
              "(e.g. 3m; optimize tune at the --latency-slo, default p99=50ms), recorded in OUT/serving.json.")
@recovery_options
def command(checkpoint: Path, out: Path, **o) -> None:
    """Search pruning, target, INT8 scheme, calibration and threads for the accuracy/latency frontier.

    Every trial builds one explicit configuration through a shared stage cache, is gated against the
    original FP32 model and benchmarked alone on its node against torch eager. Ray Tune runs the
    trials (builds in parallel), Optuna proposes them (a grid when the space is small). Writes
    OUT.search/report.md (frontier plot and table), OUT.search/trials.json and the winner's bundle
    to OUT; an interrupted search run again reuses every finished trial.

    \b
      optimize search digits.pt --arch models.digits:DigitsNet --calib digits_calib.npz --out best/
      optimize search resnet18.pt --arch models.resnet:resnet18 --calib calib.npz --max-accuracy-drop off \\
          --prune 0,0.3 --target ort-int8,openvino-int8 --int8-scheme static,weights --out fast/
      optimize search model.pt --latency-slo p99=20ms --trials 40 --time-budget 30m --mlflow http://127.0.0.1:5000 --out best/
    """
    from optimize.bench.load import LoadPlan
    from optimize.bench.run import BenchConfig
    from optimize.cli.bench import _numbers
    from optimize.build.plan import BuildPlan, QuantConfig
    from optimize.search.plan import SearchPlan
    from optimize.search.runner import model_family, ray_environment, require_extras, run_search
    from optimize.search.space import parse_space
    from optimize.search.tracking import tracking_uri
    from optimize.select import parse_duration, parse_load, parse_slo

    ray_environment(o["ray_address"])
    require_extras()
    max_drop, disabled = budget(o["max_drop_text"])
    prune, distill = prune_configs({**o, "prune_ratio": None})
    load = parse_load(o["load_text"])
    duration = parse_duration(o["duration"])
    try:
        time_budget = parse_duration(o["time_budget"]) if o["time_budget"] else None
    except InputSpecError:
        raise InputSpecError(f"--time-budget {o['time_budget']!r} must be a positive time such as 30m, 120m or 900s") from None
    plan = BuildPlan(source=source_config(checkpoint, o), out=out, targets=("ort-fp32",), data=data_config(o),
                     quant=QuantConfig(), task=o["task"], max_accuracy_drop=max_drop, name=o["name"],
                     prune=prune, distill=distill, batch_sizes=_numbers(o["batch_sizes"], "--batch-sizes"),
                     strict=o["strict"], cache_dir=o["cache_dir"])
    if o["prune_granularity"] != "auto" or o["prune_ignore"] or o["prune_round_to"]:
        from optimize.passes.prune import PruneConfig

        import dataclasses

        # How to prune, for every trial that does; the ratio is each trial's own.
        plan = dataclasses.replace(plan, prune=PruneConfig(
            ratio=0.5, granularity=o["prune_granularity"], scope=o["prune_scope"], importance=o["prune_importance"],
            round_to=o["prune_round_to"], ignore=tuple(o["prune_ignore"])))
    kind = model_family(plan)
    space = parse_space(kind, o["prune_values"], o["target_values"], o["scheme_values"], o["method_values"],
                        o["per_channel_values"], o["thread_values"])
    bench = BenchConfig(plan=LoadPlan.for_duration(duration * o["rounds"], batch_sizes=(), concurrency=(), rates=(),
                                                   rate_fractions=(), rounds=o["rounds"]),
                        cross_check=False)
    if disabled:
        click.echo("accuracy budget off: trials are judged on speed only; drops are still measured and reported", err=True)
    search = SearchPlan(plan=plan, space=space, load=load, bench=bench,
                        slo=parse_slo(o["latency_slo"]) if o["latency_slo"] else None, trials=o["trials"],
                        time_budget_s=time_budget, parallel=o["parallel"], ray_address=o["ray_address"],
                        mlflow_uri=tracking_uri(o["mlflow_uri"]), seed=o["search_seed"], budget_disabled=disabled)
    result = run_search(search, fresh=o["fresh"])
    click.echo((result.search_dir / "report.md").read_text())
    if result.bundle is None:
        sys.exit(1)
    if not result.records:
        raise InputSpecError("the search finished no trial")
    if o["tune_time"]:
        from optimize.tune.search import TuneConfig, tune

        slo = search.slo or parse_slo("p99=50ms")
        record = tune(Path(result.bundle), TuneConfig(slo_ms=slo.limit_ms, percentile=slo.percentile,
                                                      time_budget_s=parse_duration(o["tune_time"])),
                      progress=lambda line: click.echo(f"tune: {line}", err=True))
        click.echo(f"serving configuration of {record['target']}: {record['label']} ({Path(result.bundle) / 'serving.json'})")
    from optimize.cli.report import refresh_and_say

    refresh_and_say(Path(result.bundle))
