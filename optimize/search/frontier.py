"""The frontier of a search: which trials no other beats on accuracy drop, latency and size, and
the winner under the latency SLO and the accuracy budget.

Latency is compared with its noise: trial A is faster than B only when B's latency exceeds A's by
more than the spread either was measured with (the range of its rounds' p50s, relative, applied
to the percentile compared). Within that noise, the lower accuracy drop, then the smaller engine,
decides.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from optimize.select import Slo


def latency(record: dict[str, Any], slo: Slo | None) -> float:
    """The latency a trial is judged by: the SLO's percentile, else p50 (ms)."""
    key = f"p{slo.percentile:g}" if slo else "p50"
    return float(record["latency_ms"][key])


def noise(record: dict[str, Any], slo: Slo | None) -> float:
    """The absolute spread of ``latency``: its value times the relative spread of the rounds."""
    return latency(record, slo) * float(record.get("spread_pct") or 0.0) / 100


def faster(a: dict[str, Any], b: dict[str, Any], slo: Slo | None) -> bool:
    """A is faster than B by more than the measured spread of both."""
    return latency(b, slo) - latency(a, slo) > max(noise(a, slo), noise(b, slo))


def drop(record: dict[str, Any]) -> float:
    accuracy = record.get("accuracy") or {}
    value = accuracy.get("drop")
    return float(value) if value is not None else math.inf


def dominates(a: dict[str, Any], b: dict[str, Any], slo: Slo | None) -> bool:
    """A is no worse than B on every axis (latency within noise) and better on one."""
    if faster(b, a, slo) or drop(a) > drop(b) or a["size_bytes"] > b["size_bytes"]:
        return False
    return faster(a, b, slo) or drop(a) < drop(b) or a["size_bytes"] < b["size_bytes"]


def measured(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("status") == "ok"]


def front(records: list[dict[str, Any]], slo: Slo | None) -> list[dict[str, Any]]:
    """The measured trials no other dominates, fastest first."""
    done = measured(records)
    kept = [r for r in done if not any(dominates(o, r, slo) for o in done if o is not r)]
    return sorted(kept, key=lambda r: latency(r, slo))


def choose(records: list[dict[str, Any]], slo: Slo | None, max_drop: float | None) -> dict[str, Any]:
    """The winner: among measured trials within the budget and the SLO, the fastest, and among those
    it is not faster than by more than the noise, the lowest drop, then the smallest. Returns
    ``{"key", "reason", "tied"}`` (``key`` None when nothing qualifies)."""
    done = measured(records)
    within = [r for r in done if max_drop is None or drop(r) <= max_drop + 1e-9]
    fits = [r for r in within if slo is None or latency(r, slo) <= slo.limit_ms]
    budget = "accuracy budget (off)" if max_drop is None else f"accuracy drop <= {max_drop:g}"
    if not fits:
        why = (f"none of {len(done)} measured trial(s) is within the {budget}" if not within
               else f"none of the {len(within)} trial(s) within the {budget} meets {slo}")
        return {"key": None, "reason": why, "tied": []}
    fastest = min(fits, key=lambda r: latency(r, slo))
    tied = [r for r in fits if not faster(fastest, r, slo)]
    best = min(tied, key=lambda r: (drop(r), r["size_bytes"], latency(r, slo)))
    measure = f"p{slo.percentile:g}" if slo else "p50"
    reason = (f"{best['label']}: {measure} {latency(best, slo):.3g} ms, drop {drop(best):.3g}, "
              f"{best['size_bytes'] / 1e6:.2f} MB; the fastest of {len(fits)} trial(s) within the {budget}"
              + (f" and {slo}" if slo else ""))
    if len(tied) > 1:
        reason += (f"; {len(tied) - 1} other(s) within its latency spread, of which it has the lowest drop "
                   f"(then size)")
    return {"key": best["key"], "reason": reason, "tied": [r["key"] for r in tied if r is not best]}


def plot(records: list[dict[str, Any]], kept: list[dict[str, Any]], winner: str | None, slo: Slo | None,
         max_drop: float | None, path: Path) -> str | None:
    """Every measured trial (latency with its spread against drop), the front drawn through them;
    None without matplotlib."""
    from optimize.plots import pyplot

    plt = pyplot()
    if plt is None:
        return None
    done = measured(records)
    if not done:
        return None
    measure = f"p{slo.percentile:g}" if slo else "p50"
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for target in sorted({r["config"]["target"] for r in done}):
        group = [r for r in done if r["config"]["target"] == target]
        axis.errorbar([latency(r, slo) for r in group], [drop(r) for r in group],
                      xerr=[[noise(r, slo) / 2 for r in group]] * 2, fmt="o", alpha=0.75, label=target, capsize=2)
    line = sorted(kept, key=lambda r: latency(r, slo))
    axis.step([latency(r, slo) for r in line], [drop(r) for r in line], where="post", color="black",
              linewidth=1, label="frontier")
    chosen = [r for r in done if r["key"] == winner]
    if chosen:
        axis.scatter([latency(chosen[0], slo)], [drop(chosen[0])], marker="*", s=260, color="gold",
                     edgecolor="black", zorder=5, label="winner")
    if max_drop is not None and math.isfinite(max_drop):
        axis.axhline(max_drop, color="red", linestyle="--", linewidth=0.8, label="accuracy budget")
    if slo is not None:
        axis.axvline(slo.limit_ms, color="purple", linestyle=":", linewidth=0.8, label=str(slo))
    axis.set(xlabel=f"{measure} latency (ms), bar: spread of rounds", ylabel="accuracy drop",
             title="Search: every measured trial and the frontier")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path.name
