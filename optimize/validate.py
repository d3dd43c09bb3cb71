"""The accuracy gate: an engine's outputs against the original FP32 PyTorch model's.

Per task:
- ``classify``: top-1 agreement with the reference (percent); with labels, labelled accuracy.
  The drop is in percentage points of labelled accuracy where labels exist, else of agreement.
- ``embed``: cosine similarity to the reference embeddings (mean, min) and nearest-neighbour
  retrieval agreement among the samples. The drop is (1 - mean cosine) in points, so the default
  budget of 1.0 is a floor of 0.99. Cosine alone can hide a reordered space (0.992 with a tenth of
  the nearest neighbours changed), so with at least ``RETRIEVAL_MIN_SAMPLES`` samples the gate
  also needs retrieval agreement of at least ``100 - RETRIEVAL_PER_POINT * budget`` (95% at 1.0).
- ``regress``: max and mean absolute error. The budget is a bound on the max absolute error,
  in output units; by default 5% of the FP32 outputs' standard deviation on the held-out data.

A classifier's output may be dense (``N x classes x ...``, per-pixel classes): the class axis is
the second, agreement is per element, and intervals resample whole samples (their elements are
not independent).

Evaluation (``evaluate``, ``judge_selection``) runs any model, given as ``run(samples) -> outputs``,
on the build's ``GateData``: the held-out, selection, labelled and long-text ``Split``s, each with
the original FP32 model's outputs on it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

if TYPE_CHECKING:
    from optimize.inputs.calibration import Samples

DEFAULT_MAX_DROP = {"classify": 1.0, "embed": 1.0, "regress": None}
REGRESS_BUDGET_SHARE = 0.05  # of the FP32 outputs' standard deviation
RETRIEVAL_PER_POINT = 5.0  # embed: retrieval agreement may fall 5 points per point of cosine budget
RETRIEVAL_MIN_SAMPLES = 30  # fewer: nearest neighbours among so few samples say little


def default_max_drop(task: str, reference: np.ndarray) -> tuple[float, str | None]:
    """The budget when none is given, and for a regressor, what it is in words."""
    if task != "regress":
        return DEFAULT_MAX_DROP[task], None
    spread = float(np.asarray(reference, np.float64).std())
    budget = float(f"{max(spread * REGRESS_BUDGET_SHARE, 1e-6):.3g}")
    return budget, (f"the accuracy budget is a max abs error of {budget:g} ({REGRESS_BUDGET_SHARE:.0%} of the FP32 "
                    f"outputs' standard deviation {spread:.3g} on the held-out data); set --max-accuracy-drop "
                    f"in output units to change it")


def class_scores(x: np.ndarray) -> np.ndarray:
    """Scores as ``(elements, classes)``: dense outputs (class axis second) become one row per element."""
    x = np.asarray(x)
    if x.ndim <= 2:
        return x
    return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])


def _dense_interval(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None,
                    labelled: bool) -> tuple[float, float]:
    """Per-sample drop of a dense classifier, bootstrapped over samples."""
    ref_top, cand_top = reference.argmax(1), candidate.argmax(1)
    axes = tuple(range(1, ref_top.ndim))
    if labelled and labels is not None:
        per_sample = ((ref_top == labels).mean(axes) - (cand_top == labels).mean(axes)) * 100
    else:
        per_sample = (ref_top != cand_top).mean(axes) * 100
    return bootstrap_interval(per_sample)


@dataclasses.dataclass(frozen=True)
class GateResult:
    passed: bool
    drop: float | None
    budget: float | None
    metric: str
    message: str
    interval: tuple[float, float] | None = None  # 95% interval of the drop, same units
    samples: int | None = None  # what the drop was measured on
    more_samples: int | None = None  # about how many more would settle a verdict the interval straddles

    @property
    def straddles(self) -> bool:
        return (self.interval is not None and self.budget is not None
                and self.interval[0] <= self.budget < self.interval[1])

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["interval"] = list(self.interval) if self.interval else None
        out["straddles_budget"] = self.straddles
        return out


BOOTSTRAP_ROUNDS = 2000
Z95 = 1.959964


def wilson_interval(count: int, n: int) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion ``count / n``, in percent."""
    if n == 0:
        return 0.0, 100.0
    p = count / n
    centre = (p + Z95 ** 2 / (2 * n)) / (1 + Z95 ** 2 / n)
    half = Z95 * np.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n * n)) / (1 + Z95 ** 2 / n)
    return float(max(0.0, centre - half) * 100), float(min(1.0, centre + half) * 100)


def bootstrap_interval(per_sample: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """The 95% percentile-bootstrap interval of the mean of ``per_sample`` (resampling samples)."""
    per_sample = np.asarray(per_sample, np.float64)
    if len(per_sample) < 2:
        value = float(per_sample.mean()) if len(per_sample) else 0.0
        return value, value
    rng = np.random.default_rng(seed)
    means = per_sample[rng.integers(0, len(per_sample), (BOOTSTRAP_ROUNDS, len(per_sample)))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def drop_interval(task: str, reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None,
                  labelled: bool) -> tuple[float, float] | None:
    """The 95% interval of the gate's drop, per task and metric (see ``gate``). Labelled accuracy: the
    drop is the share of samples FP32 gets right and the engine wrong, less the reverse; each share
    gets Wilson's interval and the difference takes their far ends (conservative, and not empty when
    no sample changed). Top-1 agreement: Wilson's interval of the disagreement count. Embeddings:
    bootstrap of 100*(1-cosine) over samples. A maximum error has none."""
    reference = np.asarray(reference, np.float64)
    candidate = np.asarray(candidate, np.float64)
    if task == "classify" and reference.ndim > 2:
        return _dense_interval(reference, candidate, labels, labelled)
    if task == "classify":
        ref_top, cand_top = reference.argmax(-1), candidate.argmax(-1)
        if labelled and labels is not None:
            fp32_right, engine_right = ref_top == labels, cand_top == labels
            lost = wilson_interval(int((fp32_right & ~engine_right).sum()), len(labels))
            gained = wilson_interval(int((engine_right & ~fp32_right).sum()), len(labels))
            return lost[0] - gained[1], lost[1] - gained[0]
        return wilson_interval(int((ref_top != cand_top).sum()), len(ref_top))
    if task == "embed":
        return bootstrap_interval((1.0 - _cosine(reference, candidate)) * 100)
    return None


def samples_to_settle(drop: float, budget: float, interval: tuple[float, float], n: int) -> int | None:
    """About how many more samples would put the budget outside the interval (its width falls as
    1/sqrt(n)); None when it does not straddle."""
    low, high = interval
    if not low <= budget < high:
        return None
    # The side of the interval that reaches the budget (intervals of a count near zero are lopsided).
    half = high - drop if budget > drop else drop - low
    gap = abs(drop - budget)
    if gap < 1e-9:
        return None  # at the budget itself: no number of samples settles it
    return max(1, int(np.ceil(n * (half / gap) ** 2)) - n)


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
        reference, candidate = class_scores(reference), class_scores(candidate)
        labels = None if labels is None else np.asarray(labels).reshape(-1)
        ref_top, cand_top = reference.argmax(-1), candidate.argmax(-1)
        out = {"top1_agreement_pct": float((ref_top == cand_top).mean() * 100),
               "max_abs_error": float(np.abs(reference - candidate).max())}
        if labels is not None:
            out["accuracy_pct"] = float((cand_top == labels).mean() * 100)
        return out
    if task == "embed":
        cos = _cosine(reference, candidate)
        return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
                "retrieval_agreement_pct": retrieval_agreement(reference, candidate), "retrieval_samples": len(cos)}
    error = np.abs(reference - candidate)
    return {"max_abs_error": float(error.max()), "mean_abs_error": float(error.mean())}


def with_interval(verdict: GateResult, interval: tuple[float, float] | None, samples: int) -> GateResult:
    """The verdict (unchanged: the point estimate against the budget) with the drop's 95% interval,
    and, when the interval straddles the budget, that said and how many more samples would settle it."""
    if interval is None or verdict.drop is None:
        return dataclasses.replace(verdict, samples=samples)
    more = samples_to_settle(verdict.drop, verdict.budget, interval, samples) if verdict.budget is not None else None
    message = f"{verdict.message} (95% interval {interval[0]:.3g} to {interval[1]:.3g}, {samples} samples)"
    if verdict.budget is not None and interval[0] <= verdict.budget < interval[1]:
        message += ("; the interval straddles the budget: " +
                    (f"about {more} more held-out samples would settle it" if more else "the drop sits at the budget"))
    return dataclasses.replace(verdict, message=message, interval=interval, samples=samples, more_samples=more)


def judge(task: str, reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None,
          max_drop: float | None) -> tuple[dict[str, float], GateResult]:
    """Metrics and verdict (top-1 agreement, cosine or max error: never labelled accuracy, which needs
    the FP32 model's own labelled score as the baseline) with the drop's interval, of ``candidate``
    against ``reference``: how a selection split judges a candidate engine or a recovery step."""
    result = metrics(task, reference, candidate, labels)
    verdict = gate(task, result, None, max_drop)
    return result, with_interval(verdict, drop_interval(task, reference, candidate, labels, False), len(reference))


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
    message = f"{metric} drop {drop:.3g}{unit} {verdict} the budget of {max_drop:g}{unit}"
    floor = 100.0 - RETRIEVAL_PER_POINT * max_drop
    if task == "embed" and result.get("retrieval_samples", 0) >= RETRIEVAL_MIN_SAMPLES \
            and result["retrieval_agreement_pct"] < floor - 1e-9:
        message += (f"{', but' if passed else ' and'} nearest-neighbour retrieval agreement "
                    f"{result['retrieval_agreement_pct']:.1f}% is under {floor:g}% ({RETRIEVAL_PER_POINT:g} points per point of budget)")
        passed = False
    return GateResult(passed, drop, max_drop, metric, message)


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


@dataclasses.dataclass(frozen=True)
class Split:
    """Samples and the original FP32 model's outputs on them, named as the manifest says it."""

    samples: "Samples"
    reference: dict[str, np.ndarray]
    name: str

    def __len__(self) -> int:
        return len(self.samples)


@dataclasses.dataclass(frozen=True)
class GateData:
    """What every accuracy number of a build is measured on, always against the original FP32 model.

    ``held_out`` is the gate's data; ``selection`` is what candidates and recovery steps are chosen
    on (where the data were too few for a split of its own, the held-out data, said in its name);
    ``labelled`` is ``--eval-data``; ``long`` holds token rows at the serving length when that is
    beyond the data's own (``long_tokens``)."""

    task: str
    output: str  # the output the gate reads
    held_out: Split
    selection: Split
    labelled: Split | None = None
    long: Split | None = None
    long_tokens: int | None = None


Run = Callable[["Samples"], dict[str, np.ndarray]]


def evaluate(run: Run, data: GateData, max_drop: float | None) -> dict[str, Any]:
    """Accuracy of a model (``run(samples) -> outputs``) on the held-out and labelled data, and the gate."""
    task, first, held = data.task, data.output, data.held_out
    outputs = run(held.samples)
    accuracy = {"held_out": metrics(task, held.reference[first], outputs[first], held.samples.labels)}
    baseline = None
    gated = (held.reference[first], outputs[first], held.samples.labels)
    if data.labelled is not None:
        labelled = data.labelled
        outputs = run(labelled.samples)
        accuracy["eval"] = metrics(task, labelled.reference[first], outputs[first], labelled.samples.labels)
        baseline = metrics(task, labelled.reference[first], labelled.reference[first], labelled.samples.labels)
        accuracy["eval_fp32_torch"] = baseline
        gated = (labelled.reference[first], outputs[first], labelled.samples.labels)
    verdict = gate(task, accuracy.get("eval", accuracy["held_out"]), baseline, max_drop)
    labelled_metric = verdict.metric == "labelled accuracy"
    verdict = with_interval(verdict, drop_interval(task, *gated, labelled_metric), len(gated[0]))
    if data.long is not None:
        outputs = run(data.long.samples)
        accuracy["held_out_max_length"] = {**metrics(task, data.long.reference[first], outputs[first]),
                                           "tokens": data.long_tokens}
        at_length = gate(task, accuracy["held_out_max_length"], None, max_drop)
        if verdict.passed and not at_length.passed:
            verdict = dataclasses.replace(at_length, message=f"at {data.long_tokens} tokens: {at_length.message}")
    return {"accuracy": accuracy, "gate": verdict.to_json()}


def judge_selection(run: Run, data: GateData, max_drop: float | None) -> dict[str, Any]:
    """A model (``run(samples) -> outputs``) judged on the selection split against the original FP32
    model: its metrics and verdict, for choosing among candidates without touching the gate's data."""
    split, first = data.selection, data.output
    outputs = run(split.samples)
    result, verdict = judge(data.task, split.reference[first], outputs[first], split.samples.labels, max_drop)
    return {"data": split.name, "samples": len(split), "metrics": result, "gate": verdict.to_json()}


def runs(runner: Any) -> Run:
    """An engine's ``Runner`` as ``run(samples) -> outputs`` (batches of 32)."""
    return lambda samples: runner.infer_all(samples.batches(32))
