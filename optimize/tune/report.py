"""What ``optimize tune`` shows: every configuration's points (throughput against the SLO's
percentile at each concurrency), the frontier through them, the chosen one against the default."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def frontier(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Points no other point beats on both throughput and tail latency, by rising latency."""
    points = [{**p, "label": t["label"]} for t in record["trials"] for p in t["points"] if not p["errors"]]
    kept = [p for p in points if not any(
        q["throughput_per_s"] >= p["throughput_per_s"] and q["tail_ms"] <= p["tail_ms"]
        and (q["throughput_per_s"] > p["throughput_per_s"] or q["tail_ms"] < p["tail_ms"]) for q in points)]
    return sorted(kept, key=lambda p: p["tail_ms"])


def markdown(record: dict[str, Any]) -> str:
    slo = record["slo"]
    tail = f"p{slo['percentile']:g}"
    cpu = record["measured_on"]
    lines = [f"# Serving configuration of {record['target']}", "",
             f"Measured on {cpu.get('cpu')} ({cpu.get('cores')} cores), over {record['protocol']}, closed loops at "
             f"concurrency {', '.join(map(str, record['concurrency']))} ({record['window_s']:g} s each); the SLO is "
             f"{tail} <= {slo['ms']:g} ms. Search {record['search_s']:g} s, {len(record['trials'])} configurations; "
             f"{record['wall_s']:g} s in all.", "",
             f"**Chosen:** {record['label']}.", ""]
    confirm = record.get("confirm") or {}
    if confirm:
        names = {"default": "the default", "tuned": f"the search's best ({record.get('candidate', record['label'])})"}
        lines += ["| measured again, interleaved | rounds (requests/s within the SLO) | median |", "|---|---|---|"]
        for label, data in confirm.items():
            rounds = ", ".join(f"{v:.0f}" if v else "none within the SLO" for v in data["rounds"])
            lines.append(f"| {names.get(label, label)} | {rounds} | {data['median_per_s']:.0f} |")
        if "default" in confirm and "tuned" in confirm and confirm["default"]["median_per_s"] > 0:
            ratio = confirm["tuned"]["median_per_s"] / confirm["default"]["median_per_s"]
            lines += ["", f"The search's best / the default: {ratio:.2f}x."
                      + (" It did not beat the default measured again: the default is kept." if record.get(
                          "kept_default") else "")]
        lines.append("")
    lines += ["| configuration | start s | best within the SLO (requests/s) | at concurrency | " + tail + " ms | points |",
              "|---|---|---|---|---|---|"]
    for trial in record["trials"]:
        points = "; ".join(f"c{p['concurrency']}: {p['throughput_per_s']:.0f}/s {p['tail_ms']:.2f} ms"
                           for p in trial["points"])
        best = f"{trial['throughput_per_s']:.0f}" if trial["throughput_per_s"] else (trial["error"] or "none met it")
        at = trial["at_concurrency"] or "-"
        tail_ms = f"{trial['tail_ms']:.2f}" if trial["tail_ms"] is not None else "-"
        lines.append(f"| {trial['label']} | {trial['start_s']:.1f} | {best} | {at} | {tail_ms} | {points} |")
    lines += ["", "Frontier (no other point has more throughput at a lower " + tail + "):", ""]
    lines += [f"- {p['throughput_per_s']:.0f}/s at {tail} {p['tail_ms']:.2f} ms: {p['label']}, concurrency "
              f"{p['concurrency']}" for p in frontier(record)]
    return "\n".join(lines) + "\n"


def plot(record: dict[str, Any], path: Path) -> str | None:
    """Throughput against the tail latency, one series per configuration; None without matplotlib."""
    from optimize.plots import plain_log_ticks, pyplot

    plt = pyplot()
    if plt is None:
        return None
    tail = f"p{record['slo']['percentile']:g}"
    figure, axis = plt.subplots(figsize=(10, 4.5))
    for trial in record["trials"]:
        if trial["points"]:
            axis.plot([p["tail_ms"] for p in trial["points"]], [p["throughput_per_s"] for p in trial["points"]],
                      marker="o", markersize=3, linewidth=0.8, alpha=0.7, label=trial["label"])
    line = frontier(record)
    axis.step([p["tail_ms"] for p in line], [p["throughput_per_s"] for p in line], where="post", color="black",
              linewidth=1.2, label="frontier")
    axis.axvline(record["slo"]["ms"], color="red", linestyle="--", linewidth=0.8, label=f"SLO {tail}")
    axis.set(xlabel=f"{tail} latency (ms)", ylabel="requests/s", title=f"Serving configurations of {record['target']}")
    axis.set_xscale("log")
    plain_log_ticks(axis, x=True)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path.name
