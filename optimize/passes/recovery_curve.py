"""The recovery curve after pruning: each check of the student, when the curve has flattened, its
trend, and which lever would help when recovery stopped short of the budget (more time, more data,
a smaller ratio, layers left whole). ``optimize.passes.distill`` trains; this module reads the curve.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

# Below this many unlabelled samples, distillation of a pruned model stopped short of the
# original's accuracy on the digits CNN (benchmarks/results/prune_digits.md: 200 samples left it
# 1.3 points below, 400 within 0.6, 800 level with it); bigger models need more.
MIN_RECOVERY_SAMPLES = 500
# Flat: the trend's optimistic end (slope less two standard errors) promises under 3% less distance
# over as many checks again.
FLAT_GAIN = 0.03


@dataclasses.dataclass
class Check:
    """The student judged on the selection split at one step."""

    step: int
    seconds: float
    drop: float | None
    interval: tuple[float, float] | None
    passed: bool
    distance: float  # to the teacher's outputs (``teacher_distance``): continuous, for the trend
    metrics: dict[str, float]
    lr: float
    samples: int = 0  # in the selection split
    train_distance: float | None = None  # on the probe of the training pool
    signal: float | None = None  # what is judged: the distance, pooled with the probe's on a small split
    held_out: dict[str, Any] | None = None  # the gate's data, watched for the report, never for choices

    def better_than(self, other: "Check | None") -> bool:
        """Closer to the teacher on the signal. The distance, not the drop: on a few hundred samples
        agreement moves in steps of whole samples, and a noisy best would be kept by chance."""
        return other is None or self.judged < other.judged

    @property
    def judged(self) -> float:
        return self.distance if self.signal is None else self.signal

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["interval"] = list(self.interval) if self.interval else None
        return out


def margin_met(check: Check, budget: float | None) -> bool:
    """Within the budget with a margin: the whole 95% interval below it (the point for a max error)."""
    if budget is None or check.drop is None:
        return False
    if check.interval is None:
        return check.drop <= budget
    return check.interval[1] < budget


def signal_note(selection: int, probe: int) -> str:
    """What recovery was judged by, and how a small selection split limits the choice."""
    if not probe:
        return f"its distance to the original's outputs on the {selection} samples it is judged on"
    step = 100.0 / max(1, selection)
    return (f"its distance to the original's outputs on the {selection} samples it is judged on, pooled with "
            f"{probe} samples of the recovery data: on {selection} samples agreement moves in steps of {step:.2g} "
            f"points and cannot tell checkpoints apart by less (more --calib data makes a bigger selection split)")


def _slope(values: list[float]) -> tuple[float, float]:
    """Least-squares slope of log(values) per check, and its standard error."""
    y = np.log(np.maximum(np.asarray(values, np.float64), 1e-12))
    x = np.arange(len(y), dtype=np.float64)
    x -= x.mean()
    b = float((x * (y - y.mean())).sum() / (x * x).sum())
    residual = y - y.mean() - b * x
    se = float(np.sqrt((residual ** 2).sum() / max(1, len(y) - 2) / (x * x).sum()))
    return b, se


def flattened(phase: list[Check], window: int, pooled: bool) -> str | None:
    """Why the curve has clearly flattened over the last ``window`` checks of this learning rate
    (None while it may still be improving): the signal's fitted slope, at its optimistic end, promises
    less than ``FLAT_GAIN`` over as many checks again; or, on a pooled signal, the selection split
    alone is clearly getting further from the teacher (the recovery data is being memorised)."""
    if len(phase) < window:
        return None
    last = phase[-window:]
    b, se = _slope([c.judged for c in last])
    if pooled:
        bs, ses = _slope([c.distance for c in last])
        if bs - 2 * ses > 0:
            return "the selection split moved away from the original while the recovery data moved closer"
    gain = 1 - np.exp((b - 2 * se) * window)
    if gain < FLAT_GAIN:
        return (f"the distance to the original fell {max(0.0, 1 - np.exp(b * window)):.1%} over the last {window} "
                f"checks, at the lowest learning rate")
    return None


def rate(checks: list[Check]) -> dict[str, Any] | None:
    """The signal's trend at the end: relative change per minute, from the last checks."""
    if len(checks) < 3 or checks[-1].seconds <= checks[0].seconds:
        return None
    b, se = _slope([c.judged for c in checks])
    per_check_s = (checks[-1].seconds - checks[0].seconds) / (len(checks) - 1)
    per_minute = float(np.exp(b * 60 / per_check_s) - 1)
    return {"change_per_minute": per_minute, "improving": bool(b + 2 * se < 0), "seconds_per_check": per_check_s,
            "slope_per_check": b}


def time_needed(summary: dict[str, Any], budget: float | None, best: Check) -> float | None:
    """Seconds more that recovery would likely need to bring the selection drop under ``budget``
    with a margin, extrapolated from the end of the curve (drop roughly proportional to the distance
    on the selection split; distance falling at its last rate). None where it cannot be said."""
    trend = summary.get("trend")
    if budget is None or not trend or not trend["improving"] or best.drop is None:
        return None
    pairs = [(c["distance"], c["drop"]) for c in summary["curve"] if c["drop"] is not None and c["distance"] > 0]
    d = np.asarray([p[0] for p in pairs])
    drops = np.asarray([p[1] for p in pairs])
    if len(pairs) < 3 or (d * drops).sum() <= 0:
        return None
    k = float((d * drops).sum() / (d * d).sum())  # drop per unit of distance
    wanted = 0.8 * budget / k
    if wanted <= 0:
        return None
    if wanted >= best.distance:
        return 0.0
    checks = np.log(wanted / best.distance) / trend["slope_per_check"]
    return float(checks * trend["seconds_per_check"])


def advice(summary: dict[str, Any], budget: float | None, best: Check, hardest: list[str] | None = None) -> str | None:
    """Which lever would help, from the curve, when recovery stopped short of the budget."""
    if best.passed:
        return None
    stopped = summary["stopped"]
    trend = summary.get("trend") or {}
    if trend.get("improving") and stopped.startswith(("reached --recover-time", "reached --recover-steps")):
        change = (f"its distance to the original was still falling {1 - np.exp(trend['slope_per_check']):.1%} a check, "
                  f"one every {trend['seconds_per_check']:.2g} s")
        more = time_needed(summary, budget, best)
        lever = "--recover-time" if stopped.startswith("reached --recover-time") else "--recover-steps (or none)"
        if more is None:
            return f"it was still improving when it stopped ({change}): a longer {lever} would help"
        total = summary["seconds"] + more
        if total > 12 * 3600:
            return (f"it was still improving when it stopped ({change}), but at that rate the budget is more than "
                    f"12 hours away: a smaller --prune ratio would help more than time")
        return (f"it was still improving when it stopped ({change}); at that rate it would likely need about "
                f"{duration_text(_round_up(total))} in all: --recover-time {duration_text(_round_up(total))}")
    levers = []
    if summary["samples"] < MIN_RECOVERY_SAMPLES or summary["epochs"] >= 10:
        labelled = (" (labelled --train-data adds a cross-entropy term)" if not summary["labelled_samples"] else "")
        levers.append(f"more recovery data, unlabelled is enough (--calib){labelled}")
    levers.append("a smaller --prune ratio")
    levers.append(f"--prune-ignore {' --prune-ignore '.join(hardest[:3])} (the layers that lost most)" if hardest
                  else "--prune-ignore on the layers that lost most")
    drop = "" if best.drop is None else f" at a drop of {best.drop:.3g}"
    return (f"it levelled off{drop} after {summary['epochs']:g} epochs over {summary['samples']} samples; "
            f"what would help: {'; '.join(levers[:-1])}; or {levers[-1]}")


def _round_up(seconds: float) -> float:
    """Up to a whole minute (a few seconds for short runs), to quote as a --recover-time."""
    return float(np.ceil(seconds / 60) * 60) if seconds > 60 else float(np.ceil(seconds / 10) * 10)


def duration_text(seconds: float) -> str:
    return f"{seconds / 60:g}m" if seconds >= 60 and seconds % 60 == 0 else f"{seconds:g}s"


def too_little_data(samples: int) -> str | None:
    if samples >= MIN_RECOVERY_SAMPLES:
        return None
    return (f"recovery saw only {samples} samples; distillation usually needs at least "
            f"{MIN_RECOVERY_SAMPLES} to recover a pruned model fully: pass more data with --calib "
            f"(unlabelled is enough) or --train-data")
