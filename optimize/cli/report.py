"""``optimize report``."""

from __future__ import annotations

import logging
from pathlib import Path

import click


def refresh(bundle: Path) -> Path | None:
    """Rewrite the bundle's ``report.html`` and ``MODEL_CARD.md``; a failure is said, never fatal
    (the bundle itself is complete without them)."""
    from optimize.inspect.page import write_pages

    try:
        return write_pages(bundle)[0]
    except Exception as exc:  # a page is a view of the bundle: the build or benchmark stands without it
        logging.getLogger("optimize").warning("report.html not written: %s: %s", type(exc).__name__, exc,
                                              exc_info=exc)
        return None


def rewrite_bench(bundle: Path) -> None:
    """The benchmark's Markdown and plots again from what it measured (``bench/report.json``), with
    the per-layer error section where ``optimize explain`` has run since. A report that cannot be
    read is said in one line and left as it was (it is written whole or not at all)."""
    import json

    from optimize.bench.report import BENCH_DIR, write_report

    measured = Path(bundle) / BENCH_DIR / "report.json"
    if not measured.is_file():
        return
    try:
        write_report(bundle, json.loads(measured.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logging.getLogger("optimize").warning(
            "%s cannot be read (%s: %s): the benchmark's report and plots are left as they were; "
            "optimize bench %s measures again", measured, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "",
            bundle)


def refresh_and_say(bundle: Path) -> None:
    """``refresh``, then the line that says where the page is."""
    if refresh(bundle) is not None:
        click.echo(f"page: {Path(bundle) / 'report.html'} (and MODEL_CARD.md)")


@click.command("report")
@click.argument("bundle", type=click.Path(path_type=Path))
def command(bundle: Path) -> None:
    """Write BUNDLE/report.html (one self-contained page: targets, accuracy against FP32 with its
    intervals, latency with plots, the winner and why, serving configuration, per-layer error,
    recovery, drift reference) and BUNDLE/MODEL_CARD.md (a Hugging Face model card whose model-index
    holds what was measured); the benchmark's report and plots are redrawn from what it measured.
    build, bench, explain, tune and search refresh both.

    \b
      optimize report bundle/
      chromium --headless --screenshot=report.png bundle/report.html
    """
    from optimize.bundle.folder import read_manifest
    from optimize.inspect.page import write_pages

    read_manifest(bundle)
    rewrite_bench(bundle)
    for path in write_pages(bundle):
        click.echo(str(path))
