"""Per-task weight updates dW_t of the adapted layers, for the parameter metrics.

A method's `task_deltas` hook returns a flat dict of tensors keyed `<module>::<part>`:
- `<module>::A` (k x d_in) and `<module>::B` (d_out x k), with dW = B @ A (LoRA scaling folded into
  B): the low-rank form, kept factored so that a 7B model's deltas stay small on disk;
- `<module>::W` (d_out x d_in): a dense dW, for full-rank updates.
"""

from __future__ import annotations

import torch

from harness_methods.base import Context
from harness_methods.lora import lora_config, lora_layers, matching_modules


def branch_factors(model, branch: str) -> dict[str, torch.Tensor]:
    """The factors of one LoRA branch in every layer that has it: dW = (s B) A."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and branch in module.lora_A:
            out[f"{name}::A"] = module.lora_A[branch].weight.detach().float().clone()
            out[f"{name}::B"] = (module.lora_B[branch].weight.detach().float()
                                 * module.scaling[branch]).clone()
    return out


class StageChange:
    """dW_t = theta after stage t - theta before it, for methods that carry one parametrisation
    through every task (the harness's choice for SeqFT and SeqLoRA).

    With a LoRA adapter the change s(B_t A_t - B_{t-1} A_{t-1}) is kept in factored form (rank <= 2r:
    B = [s B_t, -s B_{t-1}], A = [A_t; A_{t-1}]); with full fine-tuning it is the dense difference of
    the weights of the modules the profile's LoRA targets name, the layers the metrics compare."""

    def __init__(self, ctx: Context, config: dict, branch: str = "seq"):
        self.branch = branch
        self.lora = bool(lora_layers(ctx.model))
        if not self.lora:  # the modules the LoRA targets of the profile and `config` name
            targets = lora_config(ctx, config).target_modules
            self.modules = {n: ctx.model.get_submodule(n) for n in matching_modules(ctx.model, targets)}
        self.before = self._state(ctx)

    def _state(self, ctx: Context) -> dict[str, torch.Tensor]:
        if self.lora:
            return branch_factors(ctx.model, self.branch)
        return {f"{n}::W": m.weight.detach().float().clone() for n, m in self.modules.items()}

    def delta(self, ctx: Context) -> dict[str, torch.Tensor]:
        now = self._state(ctx)
        if not self.lora:
            return {k: v - self.before[k] for k, v in now.items()}
        out = {}
        for key in now:
            if key.endswith("::A"):
                out[key] = torch.cat([now[key], self.before[key]], dim=0)
            else:
                out[key] = torch.cat([now[key], -self.before[key]], dim=1)
        return out
