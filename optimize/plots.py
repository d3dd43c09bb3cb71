"""Figures for the reports: matplotlib without a display, log axes labelled in plain numbers."""

from __future__ import annotations

from typing import Any


def pyplot() -> Any | None:
    """``matplotlib.pyplot`` on the file-only backend, or None where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plain_log_ticks(axis: Any, x: bool = False, y: bool = False) -> None:
    """Label log axes ``0.5, 1, 2, 5`` rather than ``5 x 10^-1``: ticks at 1, 2 and 5 per decade."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    label = FuncFormatter(lambda value, _: f"{value:g}")
    for wanted, part in ((x, axis.xaxis), (y, axis.yaxis)):
        if wanted:
            part.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            part.set_major_formatter(label)
            part.set_minor_formatter(NullFormatter())
