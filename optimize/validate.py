"""The accuracy gate: an engine's outputs against the original FP32 PyTorch model's.

Per task:
- ``classify``: top-1 agreement with the reference (percent); with labels, labelled accuracy.
  The drop is in percentage points of labelled accuracy where labels exist, else of agreement.
- ``embed``: cosine similarity to the reference embeddings (mean, min) and nearest-neighbour
  retrieval agreement among the samples. The drop is (1 - mean cosine) in points, so the default
  budget of 1.0 is a floor of 0.99.
- ``regress``: max and mean absolute error. The budget is a bound on the max absolute error,
  in output units.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

DEFAULT_MAX_DROP = {"classify": 1.0, "embed": 1.0, "regress": None}


@dataclasses.dataclass(frozen=True)
class GateResult:
    passed: bool
    drop: float | None
    budget: float | None
    metric: str
    message: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def retrieval_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Share of queries whose nearest other sample is the same under both embeddings (percent)."""
    def neighbours(x: np.ndarray) -> np.ndarray:
        x = x.reshape(len(x), -1).astype(np.float64)
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        sims = x @ x.T
        np.fill_diagonal(sims, -np.inf)
        return sims.argmax(1)
    if len(reference) < 2:
        return 100.0
    return float((neighbours(reference) == neighbours(candidate)).mean() * 100)


def metrics(task: str, reference: np.ndarray, candidate: np.ndarray,
            labels: np.ndarray | None = None) -> dict[str, float]:
    """Compare one output (the first) of an engine with the reference."""
    reference = np.asarray(reference, np.float64)
    candidate = np.asarray(candidate, np.float64)
    if task == "classify":
        ref_top, cand_top = reference.argmax(-1), candidate.argmax(-1)
        out = {"top1_agreement_pct": float((ref_top == cand_top).mean() * 100),
               "max_abs_error": float(np.abs(reference - candidate).max())}
        if labels is not None:
            out["accuracy_pct"] = float((cand_top == labels).mean() * 100)
        return out
    if task == "embed":
        cos = _cosine(reference, candidate)
        return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
                "retrieval_agreement_pct": retrieval_agreement(reference, candidate)}
    error = np.abs(reference - candidate)
    return {"max_abs_error": float(error.max()), "mean_abs_error": float(error.mean())}


def gate(task: str, result: dict[str, float], baseline: dict[str, float] | None,
         max_drop: float | None) -> GateResult:
    """Decide whether ``result`` is within ``max_drop`` (see module docstring for units)."""
    if task == "classify":
        if baseline and "accuracy_pct" in result and "accuracy_pct" in baseline:
            metric, drop = "labelled accuracy", baseline["accuracy_pct"] - result["accuracy_pct"]
        else:
            metric, drop = "top-1 agreement", 100.0 - result["top1_agreement_pct"]
    elif task == "embed":
        metric, drop = "mean cosine", (1.0 - result["mean_cosine"]) * 100
    else:
        metric, drop = "max abs error", result["max_abs_error"]
    if max_drop is None:
        return GateResult(True, drop, None, metric, f"{metric}: drop {drop:.3g} (no budget set)")
    passed = drop <= max_drop + 1e-9
    unit = "" if task == "regress" else " points"
    verdict = "within" if passed else "exceeds"
    return GateResult(passed, drop, max_drop, metric,
                      f"{metric} drop {drop:.3g}{unit} {verdict} the budget of {max_drop:g}{unit}")


@dataclasses.dataclass(frozen=True)
class ChanceLevel:
    """The FP32 model's own labelled accuracy against what guessing scores on the same labels."""

    accuracy_pct: float
    chance_pct: float  # the larger of 1/classes and the majority class's share
    bound_pct: float  # the upper end of the central 95% binomial interval of guessing at chance
    samples: int
    data: str

    @property
    def at_chance(self) -> bool:
        return self.accuracy_pct <= self.bound_pct + 1e-9

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "at_chance": self.at_chance}


def binomial_upper(n: int, p: float, quantile: float = 0.975) -> int:
    """The smallest k with P(X <= k) >= quantile for X ~ Binomial(n, p)."""
    import math

    if p <= 0:
        return 0
    if p >= 1:
        return n
    log_p, log_q, total = math.log(p), math.log1p(-p), 0.0
    for k in range(n + 1):
        total += math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * log_p
                          + (n - k) * log_q)
        if total >= quantile:
            return k
    return n


def chance_level(logits: np.ndarray, labels: np.ndarray, data: str) -> ChanceLevel:
    """Compare the model's labelled accuracy with chance on ``labels`` (class indices)."""
    classes = int(logits.shape[-1])
    labels = np.asarray(labels).astype(np.int64)
    counts = np.bincount(labels, minlength=classes)
    chance = max(1.0 / classes, counts.max() / len(labels))
    accuracy = float((np.asarray(logits).argmax(-1) == labels).mean() * 100)
    bound = binomial_upper(len(labels), chance) / len(labels)
    return ChanceLevel(accuracy, chance * 100, bound * 100, len(labels), data)
