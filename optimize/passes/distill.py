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
(its fitted slope over the last checks, at its optimistic end, promises less than
``recovery_curve.FLAT_GAIN`` more over as many checks again) after the learning rate was cut tenfold twice, at ``steps`` (an explicit
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
from optimize.passes.recovery_curve import (Check, advice, duration_text, flattened, margin_met, rate,
                                           signal_note)

if TYPE_CHECKING:
    import torch

# A selection split smaller than this is pooled with a probe of the training pool for the signal
# (at 500 samples a whole sample is 0.2 points of agreement).
SMOOTH_SAMPLES = 500
PROBE_SAMPLES = 512
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
                stopped = f"reached --recover-time {duration_text(config.time_limit_s)}"
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
