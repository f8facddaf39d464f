"""O-LoRA: orthogonal subspaces (METHODS.md §5.9).

The growth of IncLoRA (a new branch per task, earlier branches frozen, all summed at inference)
plus two loss terms on the new branch, summed over every adapted layer l:
- orthogonality between the new down-projection A_t and every earlier one, stacked as A_old:
  `code_l1` (default, the reference code): lambda1 * sum |A_old A_t^T| (entry-wise L1);
  `paper_fro2` (the paper): lambda1 * ||A_old A_t^T||_F^2;
- a norm on the new parameters: `code_norm` (default, the reference code): lambda2 * sum over the new
  A's and B's of ||p||_F (not squared); `squared`: lambda2 * sum ||p||_F^2.
Per-task lambdas (the reference's order-6 script) live in the config under `per_task.<task>`,
applied to the orders listed in `per_task_orders`.
"""

from __future__ import annotations

import torch

from harness.errors import HarnessError
from methods.base import Context
from methods.inclora import IncLoRA, branch_name
from methods.lora import lora_layers

ORTH_FORMS = ("code_l1", "paper_fro2")
L2_FORMS = ("code_norm", "squared")


def orthogonality_term(a_old: torch.Tensor | None, a_new: torch.Tensor, form: str) -> torch.Tensor:
    """Overlap of the new down-projection (r x d_in) with the stacked old ones ((t-1)r x d_in)."""
    if a_old is None or a_old.shape[0] == 0:
        return a_new.new_zeros(())
    overlap = a_old @ a_new.T
    return overlap.abs().sum() if form == "code_l1" else overlap.pow(2).sum()


def norm_term(params: list[torch.Tensor], form: str) -> torch.Tensor:
    if form == "code_norm":
        return sum(p.norm() for p in params)
    return sum(p.pow(2).sum() for p in params)


def stage_lambdas(config: dict, ctx: Context, names: tuple[str, ...]) -> list[float]:
    """The lambdas for this stage: the config's values, overridden by `per_task.<task>` when the
    run's order is one of `per_task_orders`."""
    override = {}
    if ctx.order in config.get("per_task_orders", []):
        override = config.get("per_task", {}).get(ctx.task.name, {})
    return [float(override.get(n, config.get(n, 0.0))) for n in names]


class OLoRA(IncLoRA):
    name = "olora"

    def before_task(self, ctx: Context) -> None:
        super().before_task(ctx)
        self.orth_form = self.config.get("orth_form", "code_l1")
        self.l2_form = self.config.get("l2_form", "code_norm")
        if self.orth_form not in ORTH_FORMS or self.l2_form not in L2_FORMS:
            raise HarnessError(f"olora: orth_form must be one of {ORTH_FORMS} and l2_form one of "
                               f"{L2_FORMS}; got {self.orth_form!r}, {self.l2_form!r}")
        self.lambda1, self.lambda2 = stage_lambdas(self.config, ctx, ("lambda1", "lambda2"))
        new, old = branch_name(ctx.stage), self.branches[:-1]
        # Old branches are frozen: stack their A's once per stage instead of every step.
        self.pairs = []
        for layer in lora_layers(ctx.model):
            a_old = torch.cat([layer.lora_A[b].weight.detach() for b in old]) if old else None
            self.pairs.append((a_old, layer.lora_A[new].weight, layer.lora_B[new].weight))

    def penalty(self, ctx: Context, batch: dict, outputs) -> torch.Tensor | None:
        total = None
        if self.lambda1:
            total = self.lambda1 * sum(orthogonality_term(a_old, a, self.orth_form)
                                       for a_old, a, _ in self.pairs)
        if self.lambda2:
            l2 = self.lambda2 * norm_term([p for _, a, b in self.pairs for p in (a, b)], self.l2_form)
            total = l2 if total is None else total + l2
        return total
