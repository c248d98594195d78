"""Recovery after structured pruning: a short distillation of the pruned model (student) towards the
unpruned one (teacher) on the stage's calibration texts. No labels are used: the student learns the
teacher's output distribution (classification and language modelling, KL divergence at a
temperature) or its hidden states (feature extraction, mean squared error over real tokens).

Dropout stays off (eval mode): with a few hundred steps on a small sample, the noise it adds costs
more than the regularisation it gives."""

from __future__ import annotations

import itertools
import logging
import time

from pydantic import Field

from ...data import torch_inputs
from ..base import StageConfigBase

log = logging.getLogger(__name__)


class RecoverConfig(StageConfigBase):
    steps: int = Field(..., gt=0, le=100_000, description="optimizer steps; each takes one calibration batch, cycling")
    lr: float = Field(2e-5, gt=0, lt=1, description="AdamW learning rate (constant after a 10% linear warm-up)")
    temperature: float = Field(2.0, gt=0, description="softmax temperature of the distillation loss")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")


def _loss(task: str, student_out, teacher_out, mask, temperature: float):
    import torch.nn.functional as F

    if task == "feature-extraction":
        diff = (student_out.last_hidden_state - teacher_out.last_hidden_state).pow(2).mean(-1)
        return (diff * mask).sum() / mask.sum()
    student, teacher = student_out.logits / temperature, teacher_out.logits / temperature
    if task == "text-generation":
        student, teacher = student[mask.bool()], teacher[mask.bool()]  # real tokens only
    kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")
    return kl * temperature ** 2


def distill(student, teacher, feeds: list[dict], task: str, config: RecoverConfig, progress) -> dict:
    """Train `student` in place; return the loss at the start and end and the time taken."""
    import torch

    if not feeds:
        return {}
    trainable = [p for p in student.parameters() if p.dtype.is_floating_point]
    for parameter in trainable:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    warmup = max(1, config.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    extra = {"use_cache": False} if task == "text-generation" else {}
    student.eval()
    teacher.eval()
    losses, started = [], time.perf_counter()
    # The teacher is frozen and deterministic (eval mode), so the steps that cycle back to a batch would
    # recompute the same outputs. They are kept where they are small (a classifier's logits, an encoder's
    # hidden states); a language model's logits over its vocabulary are recomputed instead.
    remembered: dict[int, object] = {}
    keep_targets = task != "text-generation"
    batches = itertools.cycle(enumerate(feeds))
    for _ in progress.track(range(config.steps), config.steps, "recovering (distillation)"):
        index, feed = next(batches)
        inputs = torch_inputs(feed)
        target = remembered.get(index)
        if target is None:
            with torch.no_grad():
                target = teacher(**inputs, **extra)
            if keep_targets:
                remembered[index] = target
        with torch.enable_grad():
            loss = _loss(task, student(**inputs, **extra), target, inputs["attention_mask"].float(),
                         config.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    for parameter in trainable:
        parameter.requires_grad_(False)
    window = max(1, min(10, len(losses) // 4))
    return {"recover_steps": config.steps, "recover_loss_start": round(sum(losses[:window]) / window, 5),
            "recover_loss_end": round(sum(losses[-window:]) / window, 5),
            "recover_seconds": round(time.perf_counter() - started, 1)}
