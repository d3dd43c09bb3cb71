"""``optimize bench``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from optimize.cli.build_options import option_group
from optimize.errors import InputSpecError


def _numbers(text: str | None, flag: str, kind: type = int) -> tuple:
    if text is None:
        return ()
    try:
        values = tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InputSpecError(f"{flag} {text!r} must be comma-separated numbers, e.g. 1,8,32")
    if not values or any(v <= 0 for v in values):
        raise InputSpecError(f"{flag} {text!r} must list positive numbers")
    return values


SELECTION_OPTIONS = [
    click.option("--load", "load_text", default="batch=1", show_default=True,
                 help="The load the winner is chosen at: batch=N, concurrency=N or rate=R."),
    click.option("--latency-slo", help="Latency objective at --load, e.g. p99=20ms. Without it the fastest wins."),
    click.option("--allow-slo-miss", is_flag=True, help="Exit 0 even when no target meets the SLO."),
]


selection_options = option_group(SELECTION_OPTIONS)  # shared by bench and build


def print_bench(report: dict, decision: dict | None, folder: Path, allow_slo_miss: bool) -> None:
    """Print the batch-1 table and the winner; exit 130 when stopped, 1 when the SLO is missed."""
    from optimize.bench.report import summary_rows

    rows = summary_rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            click.echo("  ".join("-" * w for w in widths))
    click.echo(f"report: {folder / 'report.md'}")
    if report["interrupted"]:
        sys.exit(130)
    click.echo(f"winner: {decision['reason']}")
    if report.get("winner_note"):
        click.echo(report["winner_note"])
    if decision["target"] is None and not allow_slo_miss:
        sys.exit(1)


@click.command("bench")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--target", "targets", multiple=True, help="Targets to measure (default: every built one). Repeat or comma-separate.")
@click.option("--batch-sizes", default="1,8,32", show_default=True, help="Batch sweep: one caller, back to back.")
@click.option("--concurrency", default="1,4", show_default=True, help="Closed loop: callers sending back to back.")
@click.option("--rate", help="Open loop request rates per second (default: 0.5, 0.9 and 1.5 x each engine's measured capacity).")
@click.option("--duration", default="4s", show_default=True,
              help="Length of each open-loop run and of each closed loop's rounds together; a batch-sweep point "
                   "is measured in windows of up to 1/8 of it until stable, for at most twice it.")
@click.option("--arrivals", type=click.Choice(["poisson", "constant"]), default="poisson", show_default=True,
              help="Open-loop arrival process.")
@click.option("--max-in-flight", type=int, default=64, show_default=True, help="Open loop: most requests outstanding at once.")
@click.option("--rounds", type=click.IntRange(1, 20), default=3, show_default=True,
              help="Batch sweep and closed loops run in rounds, engines interleaved; p50 is the median round.")
@selection_options
@click.option("--url", help="Also drive a running server (optimize serve, Triton, KServe) with the same loads, "
                            "e.g. http://127.0.0.1:8000 or grpc://127.0.0.1:8001 (Open Inference Protocol over gRPC); "
                            "its added latency over the engine is reported.")
@click.option("--model-name", help="The server's model name (default: the bundle's).")
@click.option("--no-torch", is_flag=True, help="Skip the torch-eager FP32 baseline.")
@click.option("--no-cross-check", is_flag=True, help="Skip OpenVINO's benchmark_app cross-check.")
@click.option("--mlflow", "mlflow_uri", help="Record this run in MLflow: a tracking server URI, or file:/sqlite: "
                                            "(default: MLFLOW_TRACKING_URI when set).")
@click.option("--select", "select_winner", is_flag=True,
              help="Record this run's choice as the bundle's winner even when it measured a subset, another load "
                   "or SLO, or a server. Without it the winner changes only when every built target was measured "
                   "under the load and SLO the winner was chosen by.")
def command(bundle: Path, targets: tuple[str, ...], batch_sizes: str, concurrency: str, rate: str | None,
            duration: str, arrivals: str, max_in_flight: int, rounds: int, load_text: str, latency_slo: str | None,
            allow_slo_miss: bool, url: str | None, model_name: str | None, no_torch: bool,
            no_cross_check: bool, mlflow_uri: str | None, select_winner: bool) -> None:
    """Measure every built target under realistic loads; report and pick the winner.

    Latency percentiles (p50-p99, max) and throughput per batch size, concurrency and open-loop
    request rate, against torch eager FP32 measured in the same run. Saves bench/report.md (with
    plots) and bench/report.json in the bundle. The winner in its manifest changes only with
    --select, or when every built target was measured under the load and SLO it was chosen by.

    \b
      optimize bench bundle/
      optimize bench bundle/ --batch-sizes 1,8,32 --concurrency 1,4,16 --rate 50,100,200 --duration 20s
      optimize bench bundle/ --load rate=100 --latency-slo p99=20ms
    """
    from optimize.bench.load import LoadPlan
    from optimize.bench.run import BenchConfig
    from optimize.select import parse_duration, parse_load, parse_slo

    if max_in_flight < 1:
        raise InputSpecError(f"--max-in-flight {max_in_flight} must be at least 1")
    plan = LoadPlan.for_duration(parse_duration(duration), batch_sizes=_numbers(batch_sizes, "--batch-sizes"),
                                 concurrency=_numbers(concurrency, "--concurrency"),
                                 rates=_numbers(rate, "--rate", float), arrivals=arrivals,
                                 max_in_flight=max_in_flight, rounds=rounds)
    wanted = tuple(t for item in targets for t in item.split(",") if t)
    config = BenchConfig(plan=plan, targets=wanted, torch_baseline=not no_torch, cross_check=not no_cross_check,
                         url=url, model_name=model_name)
    from optimize.bench.run import bench_bundle

    slo = parse_slo(latency_slo) if latency_slo else None
    load = parse_load(load_text)
    report, decision, folder = bench_bundle(bundle, config, slo, load,
                                            select=select_winner)
    from optimize.search.tracking import log_bench, tracking_uri

    if tracking_uri(mlflow_uri):
        log_bench(tracking_uri(mlflow_uri), bundle, report, folder)
    from optimize.cli.report import refresh_and_say

    refresh_and_say(bundle)
    print_bench(report, decision, folder, allow_slo_miss)
