"""Shared by the benchmark scripts: timing several engines interleaved, ratios, reports."""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any, Callable

import numpy as np

from optimize.bench.measure import MeasureConfig, interleaved
from optimize.bench.report import markdown_table  # noqa: F401  (re-exported for the scripts)
from optimize.cli.console import install as show_progress
from optimize.environment import library_versions, machine_info

# The scripts show the library's progress on stderr as the CLI does (the library itself only logs).
show_progress()


def time_interleaved(calls: dict[str, Callable[[], Any]], rounds: int, baseline: str,
                     window_s: float = 1.0) -> dict[str, dict[str, Any]]:
    """Median latency per engine over ``rounds`` interleaved rounds, the spread, and ratios."""
    config = MeasureConfig(window_s=window_s, max_windows=4, stable_windows=3, time_limit_s=8.0)
    results = interleaved(calls, rounds=rounds, config=config)
    medians = {name: [m.median_ms for m in runs] for name, runs in results.items()}
    base = np.asarray(medians[baseline])
    table = {}
    for name, values in medians.items():
        values = np.asarray(values)
        ratios = base / values  # per round: paired, so machine drift cancels
        table[name] = {"p50_ms_per_round": values.round(3).tolist(),
                       "p50_ms": float(np.median(values)),
                       "p50_spread_pct": float((values.max() - values.min()) / np.median(values) * 100),
                       "p90_ms": float(np.median([m.percentile_ms(90) for m in results[name]])),
                       "p99_ms": float(np.median([m.percentile_ms(99) for m in results[name]])),
                       f"speedup_vs_{baseline}": float(np.median(ratios)),
                       f"speedup_vs_{baseline}_range": [float(ratios.min()), float(ratios.max())]}
    return table


def timing_parser(doc: str | None, rounds: int = 7) -> argparse.ArgumentParser:
    """The arguments every timing benchmark takes: ``--rounds``, ``--threads``, ``--out``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results")
    return parser


def environment() -> dict[str, Any]:
    return {"machine": machine_info(), "versions": library_versions(), "python": platform.python_version()}


def write_results(path: Path, results: dict[str, Any], markdown: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown)

