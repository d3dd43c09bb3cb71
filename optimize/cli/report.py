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


@click.command("report")
@click.argument("bundle", type=click.Path(path_type=Path))
def command(bundle: Path) -> None:
    """Write BUNDLE/report.html (one self-contained page: targets, accuracy against FP32 with its
    intervals, latency with plots, the winner and why, serving configuration, per-layer error,
    recovery, drift reference) and BUNDLE/MODEL_CARD.md (a Hugging Face model card whose model-index
    holds what was measured). optimize build and optimize bench refresh both.

    \b
      optimize report bundle/
      chromium --headless --screenshot=report.png bundle/report.html
    """
    from optimize.bundle.folder import read_manifest
    from optimize.inspect.page import write_pages

    read_manifest(bundle)
    for path in write_pages(bundle):
        click.echo(str(path))
