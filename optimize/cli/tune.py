"""``optimize tune``."""

from __future__ import annotations

from pathlib import Path

import click

from optimize.errors import InputSpecError


def _counts(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise InputSpecError(f"{text!r}: give whole numbers separated by commas, e.g. 1,2,4,8") from None
    if not values or min(values) < 1:
        raise InputSpecError(f"{text!r}: every count must be at least 1")
    return values


@click.command("tune")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--target", help="Target to tune (default: the bundle's winner, else its first built target).")
@click.option("--latency-slo", default="p99=50ms", show_default=True,
              help="The latency every chosen load must meet, e.g. p99=20ms.")
@click.option("--protocol", type=click.Choice(["http", "grpc"]), default="http", show_default=True,
              help="The front end the load comes through.")
@click.option("--concurrency", default="1,2,4,8,16,32", show_default=True,
              help="Closed-loop loads each configuration climbs through (until the SLO breaks or throughput stops).")
@click.option("--window", default="1.5s", show_default=True, help="Measurement per load.")
@click.option("--time-budget", default="3m", show_default=True, help="Time for the search (the final check comes after).")
@click.option("--max-batch", "batches", default="1,4,8,16,32", show_default=True, help="Largest batches to try.")
@click.option("--max-delay-ms", "delays", default="0.5,1,2,5", show_default=True,
              help="Batching waits to try (after 0).")
@click.option("--confirm-rounds", type=click.IntRange(0, 10), default=2, show_default=True,
              help="Rounds measuring the chosen configuration and the default again, interleaved (0: none).")
def command(bundle: Path, target: str | None, latency_slo: str, protocol: str, concurrency: str, window: str,
            time_budget: str, batches: str, delays: str, confirm_rounds: int) -> None:
    """Find the serving configuration with the most throughput within a latency SLO on this machine:
    engine instances and threads per instance, the largest batch, the batching wait. Each candidate
    runs as the real server, measured over HTTP or gRPC; the choice is written to BUNDLE/serving.json,
    which optimize serve and the Triton and Kubernetes exports then use (it is no new model version).

    \b
      optimize tune bundle/ --latency-slo p99=20ms
      optimize tune bundle/ --protocol grpc --time-budget 10m
      optimize serve bundle/          # starts with the tuned configuration
    """
    from optimize.bundle.folder import read_manifest
    from optimize.select import parse_duration, parse_slo
    from optimize.tune.report import markdown, plot
    from optimize.tune.search import TuneConfig, tune

    read_manifest(bundle)  # a missing or damaged bundle is one line before anything starts
    slo = parse_slo(latency_slo)
    try:
        waits = tuple(float(v) for v in delays.split(","))
    except ValueError:
        raise InputSpecError(f"--max-delay-ms {delays!r}: give milliseconds separated by commas") from None
    if min(waits) < 0:
        raise InputSpecError(f"--max-delay-ms {delays!r}: a wait cannot be negative")
    config = TuneConfig(target=target, slo_ms=slo.limit_ms, percentile=slo.percentile, protocol=protocol,
                        concurrency=_counts(concurrency), window_s=parse_duration(window),
                        time_budget_s=parse_duration(time_budget), batches=_counts(batches), delays_ms=waits,
                        confirm_rounds=confirm_rounds)
    record = tune(bundle, config, progress=lambda line: click.echo(line, err=True))
    from optimize import atomic

    atomic.write_text(bundle / "tune.md", markdown(record))
    picture = plot(record, bundle / "tune.png")
    click.echo(f"{record['target']}: {record['label']}")
    confirm = record.get("confirm") or {}
    if "tuned" in confirm and confirm["default"]["median_per_s"]:
        best = "the default kept; the search's best" if record["kept_default"] else "the tuned one"
        click.echo(f"  {best}: {confirm['tuned']['median_per_s']:.0f} requests/s within p{slo.percentile:g} <= "
                   f"{slo.limit_ms:g} ms against {confirm['default']['median_per_s']:.0f} for the default "
                   f"({confirm['tuned']['median_per_s'] / confirm['default']['median_per_s']:.2f}x, measured again "
                   f"interleaved)")
    click.echo(f"  {bundle / 'serving.json'}, {bundle / 'tune.md'}" + (f", {bundle / picture}" if picture else ""))
    from optimize.cli.report import refresh_and_say

    refresh_and_say(bundle)
