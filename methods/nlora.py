"""N-LoRA: non-collision through sparsity.

The growth of IncLoRA plus one L1 term on the new branch, summed over every adapted layer:
- `code_rxr` (default, the reference code): lambda1 * sum |A_t B_t|, the entry-wise L1 of the r x r
  product (A_t: r x d_in, B_t: d_out x r); defined only where d_in = d_out, refused otherwise;
- `paper_full` (the paper): lambda1 * sum |s B_t A_t|, the L1 of the full update Delta W_t.
No orthogonality and no L2 term.

Reference: PKU-YuanGroup/N-LoRA, code adapted from cmnfriend/O-LoRA's; the settings of its
`scripts/order_*.sh` are cited in `configs/nlora.toml`.
"""

from __future__ import annotations

from typing import Any

import torch

from harness.errors import HarnessError
from harness_methods.base import Context
from harness_methods.growth import branch_name, stage_lambdas
from harness_methods.inclora import IncLoRA
from harness_methods.lora import lora_config, lora_layers, matching_modules

L1_FORMS = ("code_rxr", "paper_full")


def sparsity_term(a: torch.Tensor, b: torch.Tensor, scaling: float, form: str) -> torch.Tensor:
    if form == "code_rxr":
        if a.shape[1] != b.shape[0]:
            raise HarnessError(
                f"nlora: l1_form code_rxr needs square layers (d_in = d_out), got A {tuple(a.shape)} "
                f"and B {tuple(b.shape)}; use l1_form = \"paper_full\"")
        return (a @ b).abs().sum()
    return (scaling * (b @ a)).abs().sum()


def batched_sparsity(branches: list[tuple[torch.Tensor, torch.Tensor, float]], form: str) -> torch.Tensor:
    """The sum of `sparsity_term` over every branch, with the branches of one shape and scaling
    stacked into a single batched product: a dozen small matmuls per micro-batch cost more in
    per-op overhead than in arithmetic (measured: 1.27x seqlora's step time one by one)."""
    groups: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for a, b, scaling in branches:
        groups.setdefault((a.shape, b.shape, scaling), []).append((a, b))
    total = []
    for (_, _, scaling), pairs in groups.items():
        A = torch.stack([a for a, _ in pairs])
        B = torch.stack([b for _, b in pairs])
        total.append((A @ B).abs().sum() if form == "code_rxr" else (scaling * (B @ A)).abs().sum())
    return torch.stack(total).sum()


class NLoRA(IncLoRA):
    name = "nlora"
    paper_name = "N-LoRA"
    table_rank = 7
    search_space = {"lambda1": (1e-3, 10.0)}  # L1 sparsity

    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__(config)
        self.l1_form = self.choice("l1_form", L1_FORMS, "code_rxr")
        self.number("lambda1", 0.0, low=0)
        self.lambda1 = 0.0  # this stage's (per-task values may replace it)
        self.new_branches: list[tuple[torch.Tensor, torch.Tensor, float]] = []

    def check(self, ctx: Context) -> None:
        super().check(ctx)
        if self.l1_form != "code_rxr":
            return
        targets = lora_config(ctx, self.config).target_modules
        for name in matching_modules(ctx.model, targets):
            weight = ctx.model.get_submodule(name).weight
            if weight.shape[0] != weight.shape[1]:
                raise HarnessError(
                    f"nlora: l1_form code_rxr needs square layers (d_in = d_out); {name} maps "
                    f"{weight.shape[1]} -> {weight.shape[0]}; use --set method.l1_form='paper_full'")

    def before_task(self, ctx: Context) -> None:
        super().before_task(ctx)
        (self.lambda1,) = stage_lambdas(self.config, ctx, ("lambda1",))
        new = branch_name(ctx.stage)
        self.new_branches = [(layer.lora_A[new].weight, layer.lora_B[new].weight, layer.scaling[new])
                             for layer in lora_layers(ctx.model)]

    def penalty(self, ctx: Context, batch: dict, outputs) -> torch.Tensor | None:
        if not self.lambda1:
            return None
        return self.lambda1 * batched_sparsity(self.new_branches, self.l1_form)
