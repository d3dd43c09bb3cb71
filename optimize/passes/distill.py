"""Accuracy recovery after pruning: fine-tune the pruned model to match the original's outputs.

Knowledge distillation needs no labels: the original model's outputs on the training data (every
sample neither held out for the gate nor kept for selection) are the targets (softened logits for
classifiers, the embedding itself for encoders, the values for regressors). Labelled samples
(``--train-data``) add a cross-entropy term.

It runs until it is good, not for a fixed count: about once an epoch the student is judged on
the selection split (never the gate's held-out data), and training stops when the drop's 95%
interval lies below the budget (met with a margin), when it plateaus (its outputs no closer to the
teacher's for ``patience`` checks, once more after the learning rate is cut tenfold), at ``steps`` (an explicit cap) or at
``time_limit_s``. The best checkpoint on the selection split is kept. The curve (step -> drop,
agreement, labelled accuracy) and the reason it stopped are reported, and when it stops short,
which lever would help.
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
    patience: int = 3  # checks without improvement before the learning rate is cut, then before stopping
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
    distance: float  # mean squared error to the teacher's outputs over their variance: continuous, for plateaus
    metrics: dict[str, float]
    lr: float

    def better_than(self, other: "Check | None") -> bool:
        """Closer to the teacher by at least 1%. The distance, not the drop: on a few hundred samples
        agreement moves in steps of whole samples, and a noisy best would be kept by chance."""
        return other is None or self.distance < other.distance * 0.99

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
            budget: float | None, progress: bool = True) -> dict[str, Any]:
    """Fine-tune ``student`` in place towards ``teacher`` (outputs on ``data``) until ``judge``
    (the student on the selection split) says it is good or stops improving; returns a summary
    with the curve and the reason it stopped."""
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
    losses: list[float] = []
    start = time.perf_counter()
    order = torch.randperm(count, generator=generator)
    cursor, step, cuts, stale = 0, 0, 0, 0
    curve: list[Check] = []
    best_state, best = None, None

    def check() -> Check:
        nonlocal best_state, best, stale
        student.eval()
        with torch.no_grad():
            result = judge(student)
        student.train()
        result = dataclasses.replace(result, step=step, seconds=round(time.perf_counter() - start, 2),
                                     lr=optimizer.param_groups[0]["lr"])
        curve.append(result)
        if result.better_than(best):
            best, stale = result, 0
            best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
        else:
            stale += 1
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
            if stale >= config.patience:
                if cuts == 0:
                    cuts, stale = 1, 0
                else:
                    stopped = f"plateaued: no better on the selection split for {config.patience} checks"
    finally:
        bar.close()
        if best_state is not None:
            student.load_state_dict(best_state)
        student.eval()
    head = float(np.mean(losses[:20])) if losses else None
    tail = float(np.mean(losses[-20:])) if losses else None
    summary = {"steps": step, "best_step": best.step, "samples": count, "epochs": round(step * batch / count, 2),
               "lr": lr, "batch_size": batch, "check_every": check_every,
               "labelled_samples": int((labels >= 0).sum()) if labels is not None else 0,
               "loss_first": head, "loss_last": tail, "seconds": round(time.perf_counter() - start, 2),
               "stopped": stopped, "best": best.to_json(), "curve": [c.to_json() for c in curve],
               "steps_cap": config.steps, "time_limit_s": config.time_limit_s}
    summary["advice"] = advice(summary, budget, best)
    return summary


def advice(summary: dict[str, Any], budget: float | None, best: Check) -> str | None:
    """Which lever would help, from the curve, when recovery stopped short of the budget."""
    if best.passed:
        return None
    curve = summary["curve"]
    improving = len(curve) >= 2 and curve[-1]["step"] == summary["best_step"]
    stopped = summary["stopped"]
    if improving and stopped.startswith("reached --recover-time"):
        return "it was still improving when the time ran out: a longer --recover-time would help"
    if improving and stopped.startswith("reached --recover-steps"):
        return "it was still improving at the step cap: more --recover-steps (or none, to run until good) would help"
    if summary["samples"] < MIN_RECOVERY_SAMPLES or summary["epochs"] >= 10:
        more = (" (labelled --train-data adds a cross-entropy term)" if not summary["labelled_samples"] else "")
        return (f"it levelled off after {summary['epochs']:g} epochs over {summary['samples']} samples: more "
                f"recovery data would help, unlabelled is enough (--calib){more}; or a smaller --prune ratio")
    return (f"it levelled off at a drop of {best.drop:.3g} with {summary['samples']} samples: a smaller --prune "
            f"ratio, or --prune-ignore on the layers pruning hurt most, would help")


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
