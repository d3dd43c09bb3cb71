"""``optimize drift``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from optimize.errors import InputSpecError

DRIFT_EXIT = 3


def _feeds(bundle: Path, source: str) -> dict:
    """The model's inputs from DATA: .npz/.npy/images as for --calib, or a .txt of one text per line."""
    from optimize.bundle.folder import read_manifest
    from optimize.inputs.calibration import load_samples
    manifest = read_manifest(bundle)
    if source.endswith(".txt"):
        from optimize.bundle.folder import text_encoder

        if not Path(source).is_file():
            raise InputSpecError(f"data file {source} does not exist")

        encoder = text_encoder(bundle, manifest)
        if encoder is None:
            raise InputSpecError(f"{source}: text input needs a bundle built with --tokenizer")
        lines = [line for line in Path(source).read_text().splitlines() if line.strip()]
        return encoder.encode(lines)
    return load_samples(source).conform(list(manifest.inputs)).arrays


def _print(report: dict) -> None:
    whole = report["whole"]
    if "scales" in report:
        click.echo(f"{report['samples']} samples, tested as the server does (a false alarm per "
                   f"{report['requests_per_false_alarm']:g} unshifted samples on average, all scales together):")
        for s in report["scales"]:
            first = f", first after {s['first_alarm_at']} samples" if s["first_alarm_at"] is not None else ""
            click.echo(f"  scale {s['samples']:>5} (every {s['step']}): {s['alarms']} of {s['windows']} windows "
                       f"alarmed ({s['alarm_rate']:.1%}; designed {s['alpha']:.3%}){first}")
    else:
        click.echo(f"{report['source']}: {report['samples']} samples in one window")
    click.echo(f"{'all samples at once' if 'scales' in report else 'fleet test'}: p = {whole['p_value']:.4f} "
               f"(adjusted across features) -> {'DRIFT' if whole['alarm'] else 'no drift'}")
    if report.get("estimated_accuracy") is not None:
        drop = report["reference_accuracy"] - report["estimated_accuracy"]
        click.echo(f"estimated accuracy {report['estimated_accuracy']:.1%} (no labels; reference "
                   f"{report['reference_accuracy']:.1%}, {drop * 100:+.1f} points below)"
                   + (": the alert's default 5-point drop is passed" if drop > 0.05 else ""))
    elif report.get("no_estimate"):
        click.echo(f"estimated accuracy: none ({report['no_estimate']})")
    rows = sorted(whole["features"].items(), key=lambda kv: kv[1]["p_value"])
    width = max(len(n) for n, _ in rows)
    for name, values in rows:
        alarms = ""
        if "scales" in report:
            alarms = "  alarmed in " + ", ".join(f"{s['feature_alarms'][name]}" for s in report["scales"]) + \
                     " window(s) per scale"
        click.echo(f"  {name.ljust(width)}  chi2 {values['statistic']:9.2f}  p {values['p_value']:.2e}{alarms}")


@click.command("drift")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("data", required=False)
@click.option("--target", help="Whose profile (default: the winner, else the first built target).")
@click.option("--window", type=click.IntRange(5, 1_000_000), help="Samples per fast window (default: the profile's, 20).")
@click.option("--scales", "scales_text", help="Samples per window of each scale, multiples of --window "
              "(default: 1x, 10x and 100x it).")
@click.option("--false-alarm-every", type=click.FloatRange(100, None),
              help="Mean unshifted samples between false alarms, all scales together (default 20000).")
@click.option("--alpha", type=click.FloatRange(0.0001, 0.5),
              help="False-alarm rate of the test of all samples at once, or of the fleet (default 0.01).")
@click.option("--metrics", "metrics_urls", multiple=True,
              help="A replica's /metrics URL (repeat): test the counts the fleet gathered over --interval.")
@click.option("--interval", default="30s", show_default=True, help="With --metrics: how long to gather.")
@click.option("--prometheus", help="A Prometheus server: test the counts summed across replicas over --range.")
@click.option("--range", "range_text", default="5m", show_default=True, help="With --prometheus: the interval.")
@click.option("--model-name", help="The served model name to select in metrics (default: any).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def command(bundle: Path, data: str | None, target: str | None, window: int | None, scales_text: str | None,
            false_alarm_every: float | None, alpha: float | None,
            metrics_urls: tuple[str, ...], interval: str, prometheus: str | None, range_text: str,
            model_name: str | None, as_json: bool) -> None:
    """Test data, or what a fleet of servers saw, for drift against the bundle's reference profile.

    Exit 0: no drift; 3: drift (the test of all samples at once, or the fleet test, alarmed); 1-2: errors.
    Each scale's windows are reported too (20, 200 and 2,000 samples by default, as the server tests
    them), and for a classifier built with labels the accuracy estimated without labels.

    \b
      optimize drift bundle/ new_data.npz
      optimize drift bundle/ new_texts.txt                # a text model built with --tokenizer
      optimize drift bundle/ --metrics http://a:8000 --metrics http://b:8000 --interval 60s
      optimize drift bundle/ --prometheus http://prometheus:9090 --range 15m
    """
    from optimize.bundle.folder import choose_target, read_manifest
    from optimize.drift import offline
    from optimize.select import parse_duration

    sources = sum(bool(x) for x in (data, metrics_urls, prometheus))
    if sources != 1:
        raise InputSpecError("give exactly one of: DATA, --metrics URL(s), --prometheus URL")
    name = choose_target(read_manifest(bundle), target, bundle)
    try:
        scales = tuple(int(x) for x in scales_text.split(",")) if scales_text else None
    except ValueError:
        raise InputSpecError(f"--scales {scales_text!r}: give sample counts separated by commas, e.g. 20,200,2000") from None
    if data:
        try:
            report = offline.scan(bundle, name, _feeds(bundle, data), window, scales, false_alarm_every, alpha)
        except ValueError as exc:  # scales that are not multiples of the window
            raise InputSpecError(f"--scales: {exc}") from None
    elif metrics_urls:
        report = offline.fleet_from_metrics(bundle, name, list(metrics_urls), parse_duration(interval), model_name, alpha)
    else:
        report = offline.fleet_from_prometheus(bundle, name, prometheus, range_text, model_name, alpha)
    if as_json:
        click.echo(json.dumps(report, indent=1))
    else:
        _print(report)
    sys.exit(DRIFT_EXIT if report["drift"] else 0)
