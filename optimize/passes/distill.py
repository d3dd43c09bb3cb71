"""Accuracy recovery after pruning: fine-tune the pruned model to match the original's outputs.

Knowledge distillation needs no labels: the original model's outputs on the calibration data are
the targets (softened logits for classifiers, the embedding itself for encoders, the values for
regressors). Labelled samples (``--train-data``) add a cross-entropy term. The number of steps
is bounded and shown with a progress bar.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import numpy as np

from optimize.calibration import Samples

# Below this many unlabelled samples, distillation of a pruned model stopped short of the
# original's accuracy on the digits CNN (benchmarks/results/prune_digits.md: 200 samples left it
# 1.3 points below, 400 within 0.6, 800 level with it); bigger models need more.
MIN_RECOVERY_SAMPLES = 500


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """How long and how hard to fine-tune; ``steps=0`` leaves the pruned model unrecovered."""

    steps: int = 600
    batch_size: int = 32
    lr: float | None = None  # default: 1e-3 for CNNs, 1e-4 for transformers
    temperature: float = 2.0
    label_weight: float = 0.5
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_lr(model_kind: str) -> float:
    return 1e-4 if model_kind == "transformer" else 1e-3


def task_loss(task: str) -> Callable[[Any, Any | None], Any] | None:
    """Loss of outputs against labels (for Taylor importance); ``None`` where no labels make sense."""
    import torch
    from torch import nn

    if task != "classify":
        return None

    def loss(outputs: Any, labels: Any | None) -> Any:
        first = outputs if isinstance(outputs, torch.Tensor) else outputs[0]
        target = first.argmax(-1).detach() if labels is None else labels
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
                soft = nn.functional.kl_div(nn.functional.log_softmax(s / temperature, -1),
                                            nn.functional.log_softmax(t / temperature, -1),
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


def distill(student: Any, data: Samples, teacher: dict[str, np.ndarray], input_names: list[str],
            task: str, config: DistillConfig, model_kind: str,
            progress: bool = True) -> dict[str, Any]:
    """Fine-tune ``student`` in place towards ``teacher`` (outputs on ``data``); returns a summary."""
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
    warmup = max(1, config.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / config.steps)))
    count = len(data)
    batch = min(config.batch_size, count)
    losses: list[float] = []
    start = time.perf_counter()
    student.train()
    order = torch.randperm(count, generator=generator)
    cursor = 0
    bar = tqdm(range(config.steps), desc="recovering (distillation)", unit="step", disable=not progress, mininterval=0.5,
               leave=False)
    try:
        for _ in bar:
            if cursor + batch > count:
                order, cursor = torch.randperm(count, generator=generator), 0
            index = order[cursor:cursor + batch]
            cursor += batch
            outputs = student(*_trim_padding([x[index] for x in inputs], input_names))
            outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
            loss = loss_fn(outputs, [t[index] for t in targets], None if labels is None else labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            if len(losses) % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    finally:
        bar.close()
        student.eval()
    head = float(np.mean(losses[:20])) if losses else None
    tail = float(np.mean(losses[-20:])) if losses else None
    return {"steps": config.steps, "samples": count, "epochs": round(config.steps * batch / count, 2),
            "lr": lr, "batch_size": batch, "labelled_samples": int((labels >= 0).sum()) if labels is not None else 0,
            "loss_first": head, "loss_last": tail, "seconds": round(time.perf_counter() - start, 2)}


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
