"""The search's report (``OUT.search/report.md`` with the frontier plot) and the winner's bundle."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, TYPE_CHECKING

from optimize import atomic
from optimize.bench.report import _fmt as _cell
from optimize.bench.report import markdown_table
from optimize.search import frontier

if TYPE_CHECKING:
    from optimize.search.plan import SearchPlan
    from optimize.select import Slo


def trial_row(record: dict[str, Any], slo: Slo | None) -> list[str]:
    accuracy = record.get("accuracy") or {}
    if record["status"] != "ok":
        return [record["key"], record["label"], _cell(accuracy.get("drop")), "-", "-", "-", "-", "-",
                f"failed: {record.get('reason')}"]
    return [record["key"], record["label"], _cell(accuracy.get("drop")),
            f"{frontier.latency(record, slo):.3f}", f"{record['spread_pct']:.1f}",
            _cell(record.get("throughput_items_per_s"), 1), f"{record['size_bytes'] / 1e6:.2f}",
            f"{record['speedup_vs_torch']:.2f}x" if record.get("speedup_vs_torch") else "-",
            f"ok ({record['node']['host']})"]


def _table(rows: list[list[str]], header: list[str]) -> str:
    return markdown_table([header, *[[cell.replace("|", "/") for cell in row] for row in rows]])


def markdown(plan: SearchPlan, records: list[dict[str, Any]], kept: list[dict[str, Any]], winner: dict[str, Any],
             summary: dict[str, Any], image: str | None) -> str:
    slo = plan.slo
    measure = f"p{slo.percentile:g}" if slo else "p50"
    header = ["trial", "configuration", "accuracy drop", f"{measure} ms at {plan.load.label}", "spread %",
              "items/s", "size MB", "vs torch eager", "status"]
    budget = ("disabled: speed only (drops measured and shown)" if summary["budget_disabled"]
              else f"{summary['max_accuracy_drop']:g}" if summary["max_accuracy_drop"] is not None else "none")
    parts = [
        f"# Search: {Path(plan.plan.source.checkpoint).name}",
        "",
        f"{summary['trials']} trial(s) ({summary['measured']} measured, {summary['failed']} failed) in "
        f"{summary['wall_s']:g} s of wall time for {summary['trial_time_s']:g} s of trial time; at most "
        f"{summary['parallel_builds']} build(s) ran at once, each benchmark alone on its node against torch eager "
        f"measured in the same run.",
        "",
        f"- load: {plan.load.label}; latency SLO: {slo or 'none'}; accuracy budget: {budget}",
        "- a trial is faster than another only by more than the spread of both (range of round p50s)",
        f"- **winner**: {winner['reason']}" if winner["key"] else f"- **no winner**: {winner['reason']}",
        "",
    ]
    if image:
        parts += [f"![frontier]({image})", ""]
    parts += ["## Frontier (accuracy drop, latency, size: no other trial is better on one and no worse on all)", "",
              _table([trial_row(r, slo) for r in kept], header), "",
              "## Every trial", "", _table([trial_row(r, slo) for r in records], header), ""]
    return "\n".join(parts)


def write_report(plan: SearchPlan, records: list[dict[str, Any]], kept: list[dict[str, Any]], winner: dict[str, Any],
                 summary: dict[str, Any]) -> Path:
    folder = plan.search_dir
    max_drop = summary["max_accuracy_drop"]
    image = frontier.plot(records, kept, winner["key"], plan.slo, max_drop, folder / "frontier.png")
    path = folder / "report.md"
    atomic.write_text(path, markdown(plan, records, kept, winner, summary, image))
    return path


def write_winner(plan: SearchPlan, record: dict[str, Any], winner: dict[str, Any], report: Path) -> Path:
    """The winning trial's bundle at ``--out``, replaced atomically: its manifest names the search,
    the trial and the decision, and it carries a copy of the search report."""
    from optimize.bundle.folder import BundleWriter, read_manifest, write_manifest

    source = plan.search_dir / record["bundle"]
    with BundleWriter(Path(plan.plan.out)) as writer:
        shutil.copytree(source, writer.root, dirs_exist_ok=True)
        manifest = read_manifest(writer.root)
        target = record["config"]["target"]
        manifest.winner = {"target": target, "reason": winner["reason"], "load": plan.load.label,
                           "slo": str(plan.slo) if plan.slo else None, "chosen_by": "search",
                           "latency_ms": record["latency_ms"], "spread_pct": record["spread_pct"]}
        manifest.extra["search"] = {"folder": str(plan.search_dir), "identity": plan.identity(),
                                    "trial": record["key"], "configuration": record["config"],
                                    "report": "search/report.md"}
        copy = writer.root / "search"
        copy.mkdir(exist_ok=True)
        shutil.copyfile(report, copy / "report.md")
        if (report.parent / "frontier.png").exists():
            shutil.copyfile(report.parent / "frontier.png", copy / "frontier.png")
        write_manifest(writer.root, manifest)
        return writer.commit()
