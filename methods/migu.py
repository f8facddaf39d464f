"""MIGU: magnitude-based gradient updating. Full fine-tuning in which, at every step after the
first task, each linear layer updates only the rows (output units) whose outputs were largest in
that step's forward pass.

Per optimizer step, for every `nn.Linear` of the model (all of them: attention, feed-forward and
the LM head):
- its outputs' L1 magnitude per output unit is summed over every token of the step's forward
  passes, a[j] = sum over the batch and positions of |y[..., j]| (padding positions included, as
  the reference sums the whole output tensor);
- the unit's row of the weight's gradient is kept where a[j] >= the `threshold` quantile of a over
  the layer's units (torch.quantile, linear interpolation), and zeroed elsewhere:
  dW <- dW * mask[:, None] (the bias, if any, untouched), before clipping and the optimizer;
  with threshold 0.7 about the top 30% of each layer's rows learn;
- the first task trains every row (the reference's `--is_first_task`), later tasks are masked;
- under several ranks the magnitudes are summed over the ranks first, so every rank keeps the same
  rows (the reference all-reduces them).
The shared token embedding stays frozen, as in SeqFT (the reference builds on O-LoRA's training
code), so an LM head tied to it has no gradient to mask.

Reference: wenyudu/MIGU at 3f3b9f0 (`src/uie_trainer_ft.py`: forward hooks on every nn.Linear,
the magnitudes reset after every optimizer step; `src/accelerate_local.py`: the per-layer
quantile, the mask on the weight gradient's output rows, applied after backward; the T5-large
scripts of orders 1-6: threshold 0.7, lr 1e-4, 1 epoch, batch 8). The reference's LoRA variant
does not run as published, so only full fine-tuning is implemented here.
"""

from __future__ import annotations

from typing import Any

import torch

from harness_methods.base import Context
from harness_methods.seqft import SeqFT


def row_mask(magnitude: torch.Tensor, threshold: float) -> torch.Tensor:
    """Which output units of a layer learn: magnitude >= its `threshold` quantile."""
    return magnitude >= torch.quantile(magnitude.float(), threshold)


class MIGU(SeqFT):
    name = "migu"
    paper_name = "MIGU"
    table_rank = 8.8
    max_zero_stage = 0  # masks whole weight gradients after backward
    search_space = {"threshold": (0.3, 0.95)}

    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__(config)
        self.threshold = self.number("threshold", 0.7, low=0.0, high=1.0)
        self.layers: dict[str, torch.nn.Linear] = {}
        self.magnitude: dict[str, torch.Tensor] = {}
        self.masked_rows = 0.0  # share of rows held still, over the stage's masked steps
        self.masked_steps = 0

    def setup(self, ctx: Context) -> None:
        super().setup(ctx)
        self.layers = {n: m for n, m in ctx.model.named_modules() if isinstance(m, torch.nn.Linear)}
        for name, layer in self.layers.items():
            layer.register_forward_hook(self._recorder(name))

    def _recorder(self, name: str):
        def record(module, inputs, output):
            if not (module.training and torch.is_grad_enabled()):
                return  # evaluation and no-grad passes (a teacher, statistics) do not count
            total = output.detach().abs().reshape(-1, output.shape[-1]).sum(0).float()
            self.magnitude[name] = self.magnitude[name] + total if name in self.magnitude else total
        return record

    def before_task(self, ctx: Context) -> None:
        super().before_task(ctx)
        self.masked_rows, self.masked_steps = 0.0, 0

    def step(self, ctx: Context, closure):
        self.magnitude = {}
        loss = closure()
        if ctx.stage > 0:
            self._mask_gradients()
        self.magnitude = {}
        return loss

    def _mask_gradients(self) -> None:
        names = [n for n in self.layers if n in self.magnitude
                 and self.layers[n].weight.grad is not None]
        if torch.distributed.is_available() and torch.distributed.is_initialized() and names:
            stacked = torch.cat([self.magnitude[n] for n in names])
            torch.distributed.all_reduce(stacked)  # summed: every rank keeps the same rows
            self.magnitude.update(zip(names, stacked.split([len(self.magnitude[n]) for n in names])))
        held = total = 0
        for name in names:
            mask = row_mask(self.magnitude[name], self.threshold)
            grad = self.layers[name].weight.grad
            grad.mul_(mask.to(grad.dtype)[:, None])
            held, total = held + int((~mask).sum()), total + mask.numel()
        if total:
            self.masked_rows += held / total
            self.masked_steps += 1

    def stage_metrics(self, ctx: Context) -> dict[str, float]:
        return {"held_rows": self.masked_rows / self.masked_steps} if self.masked_steps else {}

    def fit_state(self) -> dict[str, Any]:
        return {"masked_rows": self.masked_rows, "masked_steps": self.masked_steps}

    def load_fit_state(self, state: dict[str, Any]) -> None:
        self.masked_rows, self.masked_steps = state["masked_rows"], state["masked_steps"]
