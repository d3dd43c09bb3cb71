"""Choosing among engine variants of one target: the one mechanism behind every backend's INT8 search.

A backend proposes ``Candidate`` builds (a ``BuildConfig`` and what it changes), in its order of
preference: the fastest first, the one closest to FP32 last. ``CandidateSearch`` builds each
through the stage cache, judges it on the selection split (never the gate's held-out data) and
keeps the record of all of them. ``first_within`` stops at the first that meets the budget there;
``best`` judges a group and keeps the smallest drop. The engine finally chosen is gated on the
held-out data like any other; ``summary`` is what the manifest records: every candidate with its
result, the choice and the reason for it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from optimize.errors import OptimizeError
from optimize.targets.base import BuildConfig, RecoveryContext

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One variant to try: its cache label, config, and the change it makes, in words."""

    label: str
    config: BuildConfig
    change: str
    builder: Callable[..., Any] | None = None  # None: the backend's own build
    extra: dict[str, Any] | None = None  # what else keys its cache entry


@dataclasses.dataclass
class Judged:
    """A built candidate and its verdict on the selection split."""

    candidate: Candidate
    folder: Path
    result: dict[str, Any]
    selection: dict[str, Any]

    @property
    def passed(self) -> bool:
        return bool(self.selection["gate"]["passed"])

    @property
    def drop(self) -> float:
        drop = self.selection["gate"]["drop"]
        return float("inf") if drop is None else float(drop)

    def to_json(self) -> dict[str, Any]:
        gate = self.selection["gate"]
        return {"label": self.candidate.label, "change": self.candidate.change,
                "build_time_s": self.result.get("build_time_s"), "selection_drop": gate["drop"],
                "selection_interval": gate["interval"], "within_budget": gate["passed"],
                "metrics": self.selection["metrics"]}


class CandidateSearch:
    """Builds and judges candidates for ``context`` until its time budget runs out."""

    def __init__(self, context: RecoveryContext, budget_s: float):
        self.context = context
        self.deadline = time.monotonic() + budget_s
        self.judged: list[Judged] = []
        self.skipped: list[str] = []
        self.failed: list[dict[str, str]] = []  # candidates the backend could not build, with the reason

    @property
    def out_of_time(self) -> bool:
        return time.monotonic() >= self.deadline

    def judge(self, candidate: Candidate) -> Judged | None:
        """Build and judge one candidate (None once the time budget is spent, or when it cannot be built)."""
        if self.out_of_time:
            self.skipped.append(candidate.label)
            return None
        as_built = candidate.config == self.context.config and candidate.builder is None and not candidate.extra
        label = None if as_built else candidate.label  # the engine already built: its cache entry
        try:
            folder, result = self.context.build(candidate.config, label, candidate.builder, candidate.extra)
        except OptimizeError as exc:  # one variant the backend refuses must not end the search
            self.failed.append({"label": candidate.label, "change": candidate.change, "reason": str(exc)})
            log.info(f"  candidate {candidate.change}: not built: {exc}")
            return None
        judged = Judged(candidate, folder, result, self.context.select(folder))
        self.judged.append(judged)
        log.info(f"  candidate {candidate.change}: {judged.selection['gate']['message'].split(' (95%')[0]} "
                         f"on the {self.context.selection_name}")
        return judged

    def best(self, candidates: Iterable[Candidate]) -> Judged | None:
        """Judge every candidate; the one with the smallest drop (the earliest among equals)."""
        judged = [j for j in map(self.judge, candidates) if j is not None]
        return min(judged, key=lambda j: j.drop) if judged else None

    def first_within(self, candidates: Iterable[Candidate],
                     accept: Callable[[Judged], bool] | None = None) -> Judged | None:
        """The first candidate within budget on the selection split (and, with ``accept``, one that it
        accepts too); the last judged when none is."""
        last = None
        for candidate in candidates:
            judged = self.judge(candidate)
            if judged is None:
                if self.out_of_time:
                    break
                continue
            last = judged
            if judged.passed and (accept is None or accept(judged)):
                return judged
        return last

    def summary(self, chosen: Judged | None, reason: str, method: str) -> dict[str, Any]:
        """The manifest's ``recovery`` record: the method, every candidate, the choice and why."""
        return {"method": method, "data": self.context.selection_name,
                "candidates": [j.to_json() for j in self.judged], "skipped_for_time": self.skipped,
                "not_built": self.failed,
                "chosen": chosen.candidate.label if chosen else None,
                "chosen_change": chosen.candidate.change if chosen else None, "reason": reason}

    def finish(self, chosen: Judged, reason: str, method: str, **extra: Any) -> dict[str, Any]:
        """Manifest fields of the chosen engine: its build, the gate on held-out data, the search."""
        evaluation, settings = self.context.evaluate(chosen.folder)
        log.info(f"chose {chosen.candidate.change}: {evaluation['gate']['message']}")
        return {**chosen.result, **evaluation, "cache_folder": str(chosen.folder), "runner_settings": settings,
                "build_config": chosen.candidate.config.to_json(),
                "recovery": {**self.summary(chosen, reason, method), **extra}}


def calibration_candidates(config: BuildConfig, methods: Iterable[str],
                           granularities: Iterable[bool] = (True, False)) -> list[Candidate]:
    """Every other calibration method and weight granularity a backend offers, as candidates."""
    out = []
    for method in methods:
        for per_channel in granularities:
            if (method, per_channel) == (config.calib_method, config.per_channel):
                continue
            out.append(Candidate(f"calib-{method}-{'channel' if per_channel else 'tensor'}",
                                 dataclasses.replace(config, calib_method=method, per_channel=per_channel),
                                 f"{method} calibration, per-{'channel' if per_channel else 'tensor'} weights"))
    return out


def layer_steps(groups: list[tuple[str, float, tuple[str, ...]]], base: BuildConfig, label: str,
                what: str = "quantized layers") -> tuple[Candidate | None, list[Candidate]]:
    """Candidates keeping the worst ranked layers (``EngineLayers.ranked_groups``) in FP32: (every
    broken one, local SQNR under ``BROKEN_DB``, at once, or None when none is; then growing steps
    1, 2, 4, ... all, past the broken ones)."""
    from optimize.targets.layer_error import BROKEN_DB

    broken = sum(1 for _, db, _ in groups if db < BROKEN_DB)

    def keep(k: int, note: str) -> Candidate:
        names = tuple(name for _, _, group in groups[:k] for name in group)
        note = " (all: the FP32 graph)" if k == len(groups) else note
        return Candidate(f"{label}-{k}", dataclasses.replace(base, keep_fp32=names),
                         f"{k} of {len(groups)} {what} in FP32 ({len(names)} nodes){note}")

    first = keep(broken, f" (every one adding over 1% noise alone: local SQNR under {BROKEN_DB:.0f} dB)") if broken else None
    return first, [keep(k, "") for k in growing(len(groups)) if k > broken]


def growing(count: int) -> list[int]:
    """1, 2, 4, ... up to and always including ``count``: how many ranked layers to keep in FP32."""
    steps, k = [], 1
    while k < count:
        steps.append(k)
        k *= 2
    return [*steps, count] if count else []
