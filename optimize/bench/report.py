"""The benchmark report: JSON for machines, Markdown with plots for people, saved in the bundle.

``bundle/bench/`` is written to a temporary sibling and swapped into place, so a reader never
sees half a report; a stopped run still leaves a complete (marked interrupted) report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from optimize import atomic
from optimize.plots import plain_log_ticks, pyplot

BENCH_DIR = "bench"


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


LATE_PCT = 5.0  # open-loop points with more late sends than this are the sender's, not the engine's


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines) + "\n"


def summary_rows(report: dict[str, Any], load: str = "batch=1") -> list[list[str]]:
    rows = [["engine", "p50 ms", "p99 ms", "spread %", "throughput /s", "vs torch eager", "stable"]]
    for name, engine in report["engines"].items():
        point = next((p for p in engine["points"] if p["load"] == load), None)
        if point is None:
            continue
        ratio = report.get("ratios_vs_torch", {}).get(name, {}).get(load)
        rows.append([name, _fmt(point["p50_ms"]), _fmt(point["p99_ms"]), _fmt(point["spread_pct"], 1),
                     _fmt(point["throughput_items_per_s"], 1), f"{ratio:.2f}x" if ratio else "-",
                     "yes" if point["stable"] else "no"])
    return rows


def engine_rows(report: dict[str, Any], name: str) -> list[list[str]]:
    rows = [["load", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "max ms", "throughput /s", "spread %",
             "late sends", "vs torch"]]
    ratios = report.get("ratios_vs_torch", {}).get(name, {})
    for p in report["engines"][name]["points"]:
        late = f"{p['late_sends']} ({p['late_send_pct']:.1f}%)" if p["kind"] == "rate" else "-"
        ratio = ratios.get(p["load"])
        rows.append([p["load"], _fmt(p["p50_ms"]), _fmt(p["p90_ms"]), _fmt(p["p95_ms"]), _fmt(p["p99_ms"]),
                     _fmt(p["max_ms"]), _fmt(p["throughput_items_per_s"], 1), _fmt(p["spread_pct"], 1), late,
                     f"{ratio:.2f}x" if ratio else "-"])
    return rows


def plots(report: dict[str, Any], folder: Path) -> list[str]:
    """Latency against batch size and p99 latency against throughput; [] without matplotlib."""
    plt = pyplot()
    if plt is None:
        return []
    written = []
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, engine in report["engines"].items():
        points = [p for p in engine["points"] if p["kind"] == "batch"]
        if points:
            axis.plot([p["value"] for p in points], [p["p50_ms"] for p in points], marker="o", label=name)
    axis.set(xscale="log", yscale="log", xlabel="batch size", ylabel="p50 latency per request (ms)",
             title="Latency against batch size")
    plain_log_ticks(axis, x=True, y=True)
    written.append(_save(plt, figure, axis, folder / "latency_vs_batch.png"))
    figure, axis = plt.subplots(figsize=(9.5, 4.2))
    late_shown = False
    for index, (name, engine) in enumerate(report["engines"].items()):
        color = f"C{index % 10}"
        for kind, style, marker in (("concurrency", "-", "o"), ("rate", "--", "s")):
            points = sorted((p for p in engine["points"] if p["kind"] == kind), key=lambda p: p["value"])
            kept = [p for p in points if not sender_fell_behind(p)]
            if kept:
                axis.plot([p["throughput_items_per_s"] for p in kept], [p["p99_ms"] for p in kept], style,
                          marker=marker, color=color, label=f"{name}, {'closed' if kind == 'concurrency' else 'open'} loop")
            behind = [p for p in points if sender_fell_behind(p)]
            if behind:
                axis.scatter([p["throughput_items_per_s"] for p in behind], [p["p99_ms"] for p in behind],
                             marker="x", color=color, label=None if late_shown else
                             f"sender fell behind (over {LATE_PCT:g}% late sends): not the engine's latency")
                late_shown = True
    axis.set(yscale="log", xlabel="achieved throughput (requests/s)", ylabel="p99 latency (ms)",
             title="p99 against throughput, by offered load")
    plain_log_ticks(axis, y=True)
    written.append(_save(plt, figure, axis, folder / "latency_vs_throughput.png", outside=True))
    return written


def sender_fell_behind(point: dict[str, Any]) -> bool:
    """An open-loop point whose requests were not sent on time: it measures the load generator."""
    return point.get("kind") == "rate" and point.get("late_send_pct", 0.0) > LATE_PCT


def _save(plt: Any, figure: Any, axis: Any, path: Path, outside: bool = False) -> str:
    """Save the figure; ``outside`` puts the legend right of the axes, off the points."""
    axis.grid(True, which="both", alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=7, **({"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)} if outside else {}))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path.name


def layer_section(bundle: Path) -> str | None:
    """The bundle's per-layer error report (``optimize explain``), as a section of this one."""
    path = Path(bundle) / "explain" / "report.md"
    if not path.is_file():
        return None
    lines = path.read_text().splitlines()
    body = ["#" + line if line.startswith("#") else line.replace("](layer_error.png)", "](../explain/layer_error.png)")
            for line in lines]
    return "\n".join(body) + "\n"


def markdown(report: dict[str, Any], images: list[str], layers: str | None = None) -> str:
    machine = report["machine"]
    parts = [f"# Benchmark: {report['model_name']}\n",
             f"{report['created']} on {machine['cpu']} ({machine['cores']} cores"
             + (f"; {', '.join(machine['isa']) or 'no SIMD sets known'}" if "isa" in machine else "")
             + "); threads "
             f"{report['runner_config'].get('threads') or 'backend default'}; baseline: "
             f"{report.get('baseline') or 'none'}."
             + (" **Interrupted: partial results.**" if report.get("interrupted") else "") + "\n",
             "## Batch 1, one caller\n", markdown_table(summary_rows(report))]
    winner = report.get("winner")
    if winner:
        parts += ["## Winner\n", f"{winner['reason']}\n"]
        if report.get("winner_note"):
            parts.append(f"{report['winner_note']}\n")
    for image in images:
        parts.append(f"![{image}]({image})\n")
    for name in report["engines"]:
        parts += [f"## {name}\n", markdown_table(engine_rows(report, name))]
    server = report.get("server")
    if server:
        parts.append(f"## Server over its own engine ({server['target']})\n")
        client = server.get("client_overhead_ms")
        rows = [["load", "added p50 ms", "added p99 ms"]]
        rows += [[load, _fmt(v["p50_ms"], 3), _fmt(v["p99_ms"], 3)] for load, v in server["added_latency"].items()]
        parts.append(markdown_table(rows))
        if client is not None:
            parts.append(f"The client's own encode and decode cost {client:.3f} ms per request (included above).\n")
    behind = [f"{name} at {p['load']}" for name, engine in report["engines"].items() for p in engine["points"]
              if sender_fell_behind(p)]
    if behind:
        parts.append(f"Open-loop points whose sender fell behind (over {LATE_PCT:g}% of requests sent late), drawn "
                     f"apart in the plot and never read as the engine's latency: {', '.join(behind)}.\n")
    cross = report.get("cross_check") or {}
    if cross:
        parts.append("## Cross-check: the vendor's own benchmark tool (batch 1, sync, latency hint)\n")
        chosen = (winner or {}).get("load") or "batch=1"
        parts.append(f"The winner is chosen on this report's own measurement ({chosen}, through the Runner the "
                     "server uses: Python's call into the engine included). The vendor's tool times the engine "
                     "from C++ with its own inputs and settings, without that call, so its median is the lower "
                     "bound; the ratio shows what the Python call costs at this size.\n")
        for name, result in cross.items():
            if isinstance(result, dict) and "benchmark_app_p50_ms" in result:
                parts.append(f"- {name}: benchmark_app median {result['benchmark_app_p50_ms']:.3f} ms, ours "
                             f"{_fmt(result['ours_p50_ms'], 3)} ms (ours / theirs "
                             f"{_fmt(result['ours_over_benchmark_app'], 3)})\n")
            elif isinstance(result, dict):
                parts.append(f"- {name}: {result.get('error') or result.get('skipped')}\n")
    parts.append("\nLatencies of open-loop runs count from each request's scheduled time; late sends are "
                 "requests that could not be issued on time.\n")
    if layers:
        parts.append(layers)
    else:
        parts.append("Per-layer error against the FP32 model: run `optimize explain` on this bundle, then this "
                     "report shows it.\n")
    return "\n".join(parts)


def write_report(bundle: Path, report: dict[str, Any]) -> Path:
    """Save ``report.json``, ``report.md`` and the plots in ``bundle/bench/`` atomically."""
    with atomic.StagedFolder(Path(bundle) / BENCH_DIR) as staging:
        images = plots(report, staging)
        (staging / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (staging / "report.md").write_text(markdown(report, images, layer_section(bundle)))
    return Path(bundle) / BENCH_DIR
