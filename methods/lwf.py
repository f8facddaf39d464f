"""LwF: learning without forgetting, adapted to seq2seq (no reference code).

Before stage t > 1 the model is copied as a frozen teacher (eval mode). On every batch the teacher
runs with the same inputs and gold decoder inputs, and the penalty is
lambda * T^2 * mean over the positions whose logits predict a target token (the target positions of
a seq2seq decoder; for a causal model, the positions one before them) of
KL(softmax(z_T / T) || softmax(z_S / T)).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F

from harness_methods.base import Context
from harness_methods.sequential import Sequential


def distillation_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 x mean over masked positions of KL(teacher || student) at temperature T."""
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
    return temperature ** 2 * (kl * mask).sum() / mask.sum().clamp(min=1)


class LwF(Sequential):
    name = "lwf"
    paper_name = "LwF"
    table_rank = 5
    search_space = {"lambda": (1e-2, 10.0)}  # distillation

    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__(config)
        self.lam = self.number("lambda", 1.0, low=0)
        self.temperature = self.number("temperature", 2.0, above=0)
        self.teacher: torch.nn.Module | None = None

    def before_task(self, ctx: Context) -> None:
        super().before_task(ctx)
        if ctx.stage == 0:
            return
        self.teacher = copy.deepcopy(ctx.model).eval()
        self.teacher.requires_grad_(False)

    def penalty(self, ctx: Context, batch: dict, outputs) -> torch.Tensor | None:
        if self.teacher is None:
            return None
        with torch.no_grad():
            teacher_logits = self.teacher(**batch).logits
        mask = ctx.batcher.predicts_label(batch["labels"]).float()
        return self.lam * distillation_term(outputs.logits, teacher_logits, mask, self.temperature)
