"""Accuracy recovery after pruning: fine-tune the pruned model to match the original's outputs.

Knowledge distillation needs no labels: the original model's outputs on the training data (every
sample neither held out for the gate nor kept for selection) are the targets (softened logits for
classifiers, the embedding itself for encoders, the values for regressors). Labelled samples
(``--train-data``) add a cross-entropy term.

It runs until it is good, not for a fixed count: about once an epoch the student is judged on
the selection split (never the gate's held-out data). The signal it is judged by is continuous: the
distance of its outputs to the teacher's (mean squared error over the outputs' variance), not the
agreement, which on a few hundred samples moves in steps of whole samples; when the selection split
is small, the distance on a fixed probe of the training pool (no labels needed) is pooled in. The
checkpoint closest to the teacher on that signal is kept. Training stops when the drop's 95%
interval lies below the budget (met with a margin), when the signal's trend has clearly flattened
(its fitted slope over the last checks, at its optimistic end, promises less than ``FLAT_GAIN`` more
over as many checks again) after the learning rate was cut tenfold twice, at ``steps`` (an explicit
cap) or at ``time_limit_s``: otherwise it uses the time it was given. The curve (step, time,
selection and held-out drop, distances) and the reason it stopped are reported, and when it stops
short, which lever would help: the time it would likely need, or more data, a lower ratio or
``--prune-ignore`` of the layers that lost most.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from optimize.quiet import on_terminal
from optimize.inputs.calibration import Samples
from optimize.passes.onnx_export import output_tensors

if TYPE_CHECKING:
    import torch

# Below this many unlabelled samples, distillation of a pruned model stopped short of the
# original's accuracy on the digits CNN (benchmarks/results/prune_digits.md: 200 samples left it
# 1.3 points below, 400 within 0.6, 800 level with it); bigger models need more.
MIN_RECOVERY_SAMPLES = 500
# A selection split smaller than this is pooled with a probe of the training pool for the signal
# (at 500 samples a whole sample is 0.2 points of agreement).
SMOOTH_SAMPLES = 500
PROBE_SAMPLES = 512
# Flat: the trend's optimistic end (slope less two standard errors) promises under 3% less distance
# over as many checks again.
FLAT_GAIN = 0.03
MAX_CUTS = 2  # learning-rate cuts (tenfold each) before a flat curve stops recovery


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """How long and how hard to fine-tune; ``steps=0`` leaves the pruned model unrecovered."""

    steps: int | None = None  # an explicit cap; None: until good, a plateau or the time limit
    time_limit_s: float = 600.0
    batch_size: int = 32
    lr: float | None = None  # default: 1e-3 for CNNs, 1e-4 for transformers
    temperature: float = 2.0
    label_weight: float = 0.5
    seed: int = 0
    patience: int = 6  # the fewest checks a trend is judged over (per learning rate)
    check_every: int | None = None  # steps between checks (None: about one epoch, 25 to 250)

    @property
    def enabled(self) -> bool:
        return self.steps is None or self.steps > 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_lr(model_kind: str) -> float:
    return 1e-4 if model_kind == "transformer" else 1e-3


def task_loss(task: str) -> Callable[[Any, Any | None], Any] | None:
    """Loss of outputs against labels (for Taylor importance); ``None`` where no labels make sense."""
    from torch import nn

    if task != "classify":
        return None

    def loss(outputs: Any, labels: Any | None) -> Any:
        first = output_tensors(outputs)[0]
        target = first.argmax(1).detach() if labels is None else labels
        return nn.functional.cross_entropy(first, target)
    return loss


def _distill_loss(task: str, config: DistillConfig) -> Callable:
    import torch
    from torch import nn

    temperature = config.temperature

    def loss(student: list[Any], teacher: list[Any], labels: Any | None) -> Any:
        total = torch.zeros(())
        for index, (s, t) in enumerate(zip(student, teacher)):
            if index == 0 and task == "classify":
                soft = nn.functional.kl_div(nn.functional.log_softmax(s / temperature, 1),
                                            nn.functional.log_softmax(t / temperature, 1),
                                            log_target=True, reduction="batchmean")
                total = total + soft * temperature ** 2
                if labels is not None and bool((labels >= 0).any()):
                    total = total + config.label_weight * nn.functional.cross_entropy(s, labels, ignore_index=-1)
            elif index == 0 and task == "embed":
                flat_s, flat_t = s.flatten(1), t.flatten(1)
                total = total + (1 - nn.functional.cosine_similarity(flat_s, flat_t)).mean()
                total = total + nn.functional.mse_loss(flat_s, flat_t)
            else:
                total = total + nn.functional.mse_loss(s, t)
        return total
    return loss


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


def distill(student: torch.nn.Module, data: Samples, teacher: dict[str, np.ndarray], input_names: list[str],
            task: str, config: DistillConfig, model_kind: str, judge: Callable[[Any], Check | None],
            budget: float | None, progress: bool = True, watch: Callable[[Any], dict[str, Any]] | None = None,
            hardest: list[str] | None = None) -> dict[str, Any]:
    """Fine-tune ``student`` in place towards ``teacher`` (outputs on ``data``) until ``judge``
    (the student on the selection split) says it is good or its distance to the teacher has clearly
    flattened, or the time runs out; returns a summary with the curve and the reason it stopped.
    ``watch`` (the gate's held-out data) is recorded per check, never used to choose; ``hardest``
    names the layers pruning took most from, for the advice."""
    import torch
    from tqdm.auto import tqdm

    lr = config.lr or default_lr(model_kind)
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    inputs = [torch.from_numpy(np.ascontiguousarray(data.arrays[n])) for n in input_names]
    targets = [torch.from_numpy(np.ascontiguousarray(v)).float() for v in teacher.values()]
    labels = None
    if data.labels is not None and task == "classify":
        labels = torch.from_numpy(np.asarray(data.labels, np.int64))
    loss_fn = _distill_loss(task, config)
    parameters = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    count = len(data)
    batch = min(config.batch_size, count)
    check_every = config.check_every or int(np.clip(round(count / batch), 25, 250))
    warmup = max(1, min(100, check_every // 2))
    window = max(3, config.patience)
    probe = _probe(inputs, targets[0], input_names, count, config, task)
    losses: list[float] = []
    start = time.perf_counter()
    order = torch.randperm(count, generator=generator)
    cursor, step, cuts, phase_start = 0, 0, 0, 0
    curve: list[Check] = []
    best_state, best = None, None
    pooled = False

    def check() -> Check:
        nonlocal best_state, best, pooled
        student.eval()
        with torch.no_grad():
            result = judge(student)
            train_distance = probe(student)
            held = watch(student) if watch is not None else None
        student.train()
        pooled = result.samples < SMOOTH_SAMPLES
        signal = result.distance
        if pooled:
            signal = ((result.distance * result.samples + train_distance * probe.samples)
                      / max(1, result.samples + probe.samples))
        result = dataclasses.replace(result, step=step, seconds=round(time.perf_counter() - start, 2),
                                     lr=optimizer.param_groups[0]["lr"], train_distance=train_distance,
                                     signal=signal, held_out=held)
        curve.append(result)
        if result.better_than(best):
            best = result
            best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
        return result

    bar = tqdm(total=config.steps, desc="recovering (distillation)", unit="step", disable=not (progress and on_terminal()),
               mininterval=0.5, leave=False)
    stopped = None
    student.train()
    try:
        latest = check()
        while stopped is None:
            if margin_met(latest, budget):
                stopped = "met the budget with a margin on the selection split"
                break
            if config.steps is not None and step >= config.steps:
                stopped = f"reached --recover-steps {config.steps}"
                break
            if time.perf_counter() - start >= config.time_limit_s:
                stopped = f"reached --recover-time {_duration(config.time_limit_s)}"
                break
            for _ in range(check_every if config.steps is None else min(check_every, config.steps - step)):
                if cursor + batch > count:
                    order, cursor = torch.randperm(count, generator=generator), 0
                index = order[cursor:cursor + batch]
                cursor += batch
                for group in optimizer.param_groups:
                    group["lr"] = lr * (0.1 ** cuts) * min(1.0, (step + 1) / warmup)
                outputs = output_tensors(student(*_trim_padding([x[index] for x in inputs], input_names)))
                loss = loss_fn(outputs, [t[index] for t in targets], None if labels is None else labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                step += 1
                bar.update(1)
            latest = check()
            bar.set_postfix(drop=f"{latest.drop:.3g}" if latest.drop is not None else "-", loss=f"{np.mean(losses[-20:]):.4f}")
            flat = flattened(curve[phase_start:], window, pooled)
            if flat is not None:
                if cuts < MAX_CUTS:
                    cuts, phase_start = cuts + 1, len(curve)
                else:
                    stopped = f"flattened: {flat}"
    finally:
        bar.close()
        if best_state is not None:
            student.load_state_dict(best_state)
        student.eval()
    head = float(np.mean(losses[:20])) if losses else None
    tail = float(np.mean(losses[-20:])) if losses else None
    summary = {"steps": step, "best_step": best.step, "samples": count, "epochs": round(step * batch / count, 2),
               "lr": lr, "batch_size": batch, "check_every": check_every, "lr_cuts": cuts,
               "labelled_samples": int((labels >= 0).sum()) if labels is not None else 0,
               "loss_first": head, "loss_last": tail, "seconds": round(time.perf_counter() - start, 2),
               "stopped": stopped, "best": best.to_json(), "curve": [c.to_json() for c in curve],
               "steps_cap": config.steps, "time_limit_s": config.time_limit_s,
               "signal": signal_note(curve[0].samples, probe.samples if pooled else 0)}
    trained = curve[max(1, phase_start):]  # the checks at this learning rate, after training began
    summary["trend"] = rate(trained if len(trained) >= 3 else curve[1:][-window:])
    summary["advice"] = advice(summary, budget, best, hardest or [])
    return summary


def teacher_distance(task: str, got: np.ndarray, reference: np.ndarray, temperature: float = 2.0) -> float:
    """How far a student's outputs are from the teacher's, in the terms recovery minimises: for a
    classifier the KL divergence of the softened class scores (times T^2, as the loss), blind to a
    shift of all of a sample's logits as the loss is; otherwise the mean squared error over the
    teacher's variance. Continuous, unlike agreement."""
    got, reference = np.asarray(got, np.float64), np.asarray(reference, np.float64)
    if task == "classify" and reference.ndim >= 2 and reference.shape[1] > 1:
        teacher, student = _log_softmax(reference / temperature), _log_softmax(got / temperature)
        kl = (np.exp(teacher) * (teacher - student)).sum(1)
        return float(kl.mean() * temperature ** 2)
    return float(((got - reference) ** 2).mean() / max(float(reference.var()), 1e-12))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    top = x.max(1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(1, keepdims=True))


class _Probe:
    """The student's distance to the teacher on a fixed sample of the training pool."""

    def __init__(self, inputs: list[Any], target: Any, names: list[str], index: Any, task: str, temperature: float):
        self.inputs, self.names = [x[index] for x in inputs], names
        self.target = target[index].numpy()
        self.samples, self.task, self.temperature = len(index), task, temperature

    def __call__(self, student: Any) -> float:
        got = [output_tensors(student(*_trim_padding([x[first:first + 128] for x in self.inputs], self.names)))[0]
               for first in range(0, self.samples, 128)]
        return teacher_distance(self.task, np.concatenate([g.numpy() for g in got]), self.target, self.temperature)


def _probe(inputs: list[Any], target: Any, names: list[str], count: int, config: DistillConfig, task: str) -> _Probe:
    rng = np.random.default_rng(config.seed + 7)
    index = np.sort(rng.choice(count, min(count, PROBE_SAMPLES), replace=False))
    return _Probe(inputs, target, names, index, task, config.temperature)


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
                f"{_duration(_round_up(total))} in all: --recover-time {_duration(_round_up(total))}")
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


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``10m`` or ``1h``."""
    text = str(text).strip().lower()
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if text and text[-1] in units:
            value = float(text[:-1]) * units[text[-1]]
        else:
            value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a duration (e.g. 90s, 10m, 1h)") from None
    if value <= 0:
        raise ValueError(f"{text!r} must be positive")
    return value


def _duration(seconds: float) -> str:
    return f"{seconds / 60:g}m" if seconds >= 60 and seconds % 60 == 0 else f"{seconds:g}s"


def _trim_padding(batch: list[Any], names: list[str]) -> list[Any]:
    """Drop the columns that are padding in every row of the batch (token models only).

    With an ``attention_mask`` input, trailing all-padding positions change nothing in the outputs
    but cost most of the compute on short sentences.
    """
    mask_index = next((i for i, n in enumerate(names) if "mask" in n and batch[i].ndim == 2
                       and not batch[i].is_floating_point()), None)
    if mask_index is None:
        return batch
    mask = batch[mask_index]
    used = int(mask.any(0).nonzero().max()) + 1 if bool(mask.any()) else mask.shape[1]
    return [x[:, :used] if x.ndim == 2 and x.shape == mask.shape else x for x in batch]


def too_little_data(samples: int) -> str | None:
    if samples >= MIN_RECOVERY_SAMPLES:
        return None
    return (f"recovery saw only {samples} samples; distillation usually needs at least "
            f"{MIN_RECOVERY_SAMPLES} to recover a pruned model fully: pass more data with --calib "
            f"(unlabelled is enough) or --train-data")
