"""Picking the winner: the fastest target within the accuracy budget that meets the latency SLO.

The SLO is a percentile and a bound (``p99=20ms``); the load it must hold at is a batch size, a
concurrency or an open-loop request rate (``--load rate=100``). Every candidate's verdict and the
reason for the choice are written to the manifest, so "why this engine" has an answer later.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, TYPE_CHECKING

from optimize.errors import InputSpecError
from optimize.targets import registry

if TYPE_CHECKING:
    from optimize.bundle.manifest import Manifest

SLO_PATTERN = re.compile(r"^p(\d{1,2}(?:\.\d+)?)\s*[=<:]\s*([0-9.]+)\s*(ms|s|us)?$")
LOAD_PATTERN = re.compile(r"^(batch|concurrency|rate)\s*=\s*([0-9.]+)$")
DURATION_PATTERN = re.compile(r"^([0-9.]+)\s*(ms|s|m)?$")
UNITS_MS = {"ms": 1.0, "s": 1000.0, "us": 0.001, None: 1.0}


@dataclasses.dataclass(frozen=True)
class Slo:
    percentile: float
    limit_ms: float

    @property
    def key(self) -> str:
        return f"p{self.percentile:g}_ms"

    def __str__(self) -> str:
        return f"p{self.percentile:g} <= {self.limit_ms:g} ms"


@dataclasses.dataclass(frozen=True)
class LoadSpec:
    kind: str
    value: float

    @property
    def label(self) -> str:
        return f"{self.kind}={self.value:g}"


def parse_slo(text: str) -> Slo:
    match = SLO_PATTERN.match(text.strip().lower())
    if not match:
        raise InputSpecError(f"--latency-slo {text!r} must look like p99=20ms (a percentile and a bound)")
    percentile = float(match.group(1))
    if percentile not in (50, 90, 95, 99):
        raise InputSpecError(f"--latency-slo {text!r}: the percentile must be one of p50, p90, p95, p99")
    return Slo(percentile, float(match.group(2)) * UNITS_MS[match.group(3)])


def parse_load(text: str) -> LoadSpec:
    match = LOAD_PATTERN.match(text.strip().lower())
    if not match or float(match.group(2)) <= 0:
        raise InputSpecError(f"--load {text!r} must be batch=N, concurrency=N or rate=R (requests per second)")
    return LoadSpec(match.group(1), float(match.group(2)))


def parse_duration(text: str, flag: str = "--duration") -> float:
    """``20s``, ``500ms``, ``2m`` or plain seconds -> seconds (``flag`` names it in the error)."""
    match = DURATION_PATTERN.match(text.strip().lower())
    if not match or float(match.group(1)) <= 0:
        raise InputSpecError(f"{flag} {text!r} must be a positive time such as 20s, 500ms or 2m")
    return float(match.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[match.group(2)]


def select(manifest: Manifest, report: dict[str, Any], slo: Slo | None, load: LoadSpec) -> dict[str, Any]:
    """The decision, with every candidate's numbers; ``target`` is None when nothing qualifies.
    ``manifest`` is the bundle's ``optimize.bundle.manifest.Manifest``."""
    metric = slo.key if slo else "p99_ms"
    candidates = []
    for name, entry in manifest.targets.items():
        verdict: dict[str, Any] = {"target": name, "status": entry.status}
        if not entry.built:
            verdict["reason"] = f"not built ({entry.reason or entry.status})"
            candidates.append(verdict)
            continue
        gate = entry.gate or {}
        verdict["accuracy_drop"] = gate.get("drop")
        verdict["within_accuracy_budget"] = bool(gate.get("passed"))
        engine = report["engines"].get(name)
        point = next((p for p in (engine or {}).get("points", []) if p["load"] == load.label), None)
        if point is None:
            verdict["reason"] = f"not measured at {load.label}"
            candidates.append(verdict)
            continue
        verdict.update(latency_ms=point[metric], throughput_items_per_s=point["throughput_items_per_s"])
        if load.kind == "rate":
            verdict["late_send_pct"] = point.get("late_send_pct")
        verdict["meets_slo"] = slo is None or point[metric] <= slo.limit_ms
        if registry.TARGETS.get(name) is not None and registry.TARGETS[name].baseline:
            verdict["baseline"] = True
            verdict["reason"] = (f"a baseline, measured for comparison and never picked (its runtime is PyTorch, "
                                 f"which the serving image leaves out): {metric[:-3]} {point[metric]:.2f} ms")
        elif not verdict["within_accuracy_budget"]:
            verdict["reason"] = f"outside the accuracy budget ({gate.get('message', 'gate failed')})"
        elif not verdict["meets_slo"]:
            verdict["reason"] = f"{metric[:-3]} {point[metric]:.2f} ms at {load.label} misses {slo}"
        else:
            verdict["reason"] = f"{metric[:-3]} {point[metric]:.2f} ms at {load.label}" + (
                f" meets {slo}" if slo else "")
        candidates.append(verdict)
    eligible = [c for c in candidates if c.get("within_accuracy_budget") and c.get("meets_slo")
                and not c.get("baseline")]
    eligible.sort(key=lambda c: (c["latency_ms"], -c["throughput_items_per_s"]))
    decision: dict[str, Any] = {"load": load.label, "slo": str(slo) if slo else None, "metric": metric,
                                "candidates": candidates, "met": bool(eligible)}
    if eligible:
        best = eligible[0]
        runner_up = f"; next: {eligible[1]['target']} at {eligible[1]['latency_ms']:.2f} ms" if len(eligible) > 1 else ""
        decision.update(target=best["target"], reason=(
            f"{best['target']}: fastest by {metric[:-3]} latency of {len(eligible)} target(s) within the accuracy budget"
            f"{' that meet ' + str(slo) if slo else ''}: {metric[:-3]} {best['latency_ms']:.2f} ms at "
            f"{load.label}{runner_up}"))
    else:
        measured = [c for c in candidates if c.get("within_accuracy_budget") and "latency_ms" in c
                    and not c.get("baseline")]
        measured.sort(key=lambda c: c["latency_ms"])
        closest = f"; closest: {measured[0]['target']} at {measured[0]['latency_ms']:.2f} ms" if measured else ""
        decision.update(target=None, fastest_within_budget=measured[0]["target"] if measured else None,
                        reason=f"no target within the accuracy budget meets {slo} at {load.label}{closest}")
    return decision
