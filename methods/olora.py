"""O-LoRA: orthogonal subspaces.

The growth of IncLoRA (a new branch per task, earlier branches frozen, all summed at inference)
plus two loss terms on the new branch, summed over every adapted layer l:
- orthogonality between the new down-projection A_t and every earlier one, stacked as A_old:
  `code_l1` (default, the reference code): lambda1 * sum |A_old A_t^T| (entry-wise L1);
  `paper_fro2` (the paper): lambda1 * ||A_old A_t^T||_F^2;
- a norm on the new parameters: `code_norm` (default, the reference code): lambda2 * sum over the new
  A's and B's of ||p||_F (not squared); `squared`: lambda2 * sum ||p||_F^2.
Per-task lambdas (the reference's order-6 script) live in the config under `per_task.<task>`,
applied to the orders listed in `per_task_orders`.

Reference: cmnfriend/O-LoRA at commit 2a2e620: the two terms in `src/uie_trainer_lora.py`
(`UIETrainer.training_step`), the branches (`loranew_A/B`) in its `src/peft/tuners/lora.py`, the
freezing in `src/run_uie_lora.py`, the settings in `scripts/order_*.sh` and `scripts/long.sh`.
"""

from __future__ import annotations

from typing import Any

import torch

from harness_methods.base import Context
from harness_methods.growth import branch_name, stage_lambdas
from harness_methods.inclora import IncLoRA
from harness_methods.lora import lora_layers

ORTH_FORMS = ("code_l1", "paper_fro2")
L2_FORMS = ("code_norm", "squared")


def batched_penalty(pairs: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]],
                    lambda1: float, lambda2: float, orth_form: str, l2_form: str
                    ) -> dict[str, torch.Tensor]:
    """{"orthogonal": lambda1 * sum of `growth.orthogonality_term`, "l2": lambda2 *
    `growth.norm_term`} over every layer's (A_old, A, B) (a term only when its lambda is set and it
    has something to measure), with the layers of one shape stacked into single batched ops: per layer, the dozen
    small ops of the two terms cost more in per-op overhead than in arithmetic on small models."""
    groups: dict[tuple, list] = {}
    for a_old, a, b in pairs:
        groups.setdefault((None if a_old is None else a_old.shape, a.shape, b.shape), []).append(
            (a_old, a, b))
    orthogonal, l2 = [], []
    for (old_shape, _, _), group in groups.items():
        A = torch.stack([a for _, a, _ in group])
        if lambda1 and old_shape is not None and old_shape[0] > 0:
            overlap = torch.stack([a_old for a_old, _, _ in group]) @ A.transpose(1, 2)
            orthogonal.append(overlap.abs().sum() if orth_form == "code_l1" else overlap.pow(2).sum())
        if lambda2:
            B = torch.stack([b for _, _, b in group])
            if l2_form == "code_norm":
                l2.append(A.flatten(1).norm(dim=1).sum() + B.flatten(1).norm(dim=1).sum())
            else:
                l2.append(A.pow(2).sum() + B.pow(2).sum())
    terms = {"orthogonal": (lambda1, orthogonal), "l2": (lambda2, l2)}
    return {name: weight * torch.stack(parts).sum() for name, (weight, parts) in terms.items() if parts}


class OLoRA(IncLoRA):
    name = "olora"
    paper_name = "O-LoRA"
    table_rank = 6
    search_space = {"lambda1": (1e-3, 10.0)}  # orthogonality

    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__(config)
        self.orth_form = self.choice("orth_form", ORTH_FORMS, "code_l1")
        self.l2_form = self.choice("l2_form", L2_FORMS, "code_norm")
        for key in ("lambda1", "lambda2"):
            self.number(key, 0.0, low=0)
        self.lambda1 = self.lambda2 = 0.0  # this stage's (per-task values may replace them)
        self.pairs: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]] = []

    def before_task(self, ctx: Context) -> None:
        super().before_task(ctx)
        self.lambda1, self.lambda2 = stage_lambdas(self.config, ctx, ("lambda1", "lambda2"))
        new, old = branch_name(ctx.stage), self.branches[:-1]
        # Old branches are frozen: stack their A's once per stage instead of every step.
        self.pairs = []
        for layer in lora_layers(ctx.model):
            a_old = torch.cat([layer.lora_A[b].weight.detach() for b in old]) if old else None
            self.pairs.append((a_old, layer.lora_A[new].weight, layer.lora_B[new].weight))

    def penalty(self, ctx: Context, batch: dict, outputs) -> dict[str, torch.Tensor] | None:
        if not (self.lambda1 or self.lambda2):
            return None
        return batched_penalty(self.pairs, self.lambda1, self.lambda2, self.orth_form, self.l2_form)
