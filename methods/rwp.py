"""RWP modifier: random weight perturbation.

Per step: g0 = grad L(theta); noise eps is drawn (seeded) and added to the perturbed tensors, whose
exact values are saved; g1 = grad L(theta + eps) on the same batch; the tensors are restored by
copying back; the optimizer steps with lambda g1 + (1 - lambda) g0.
- `scope = "lora"`: perturb only the trainable parameters; `"full"`: every weight of the model
  (backbone, frozen branches, trainable ones), while gradients and updates stay on the trainable ones.
- `noise_scale`: `var_abs` (default, std sigma sqrt|theta_i|), `std_abs` (std sigma |theta_i|),
  `filter` (the RWP paper: std sigma ||theta_o,:|| per output row; sigma ||theta|| for 1-D tensors).

Reference: no code for this benchmark; random weight perturbation as its paper mixes the clean
and the perturbed gradient (Li et al., "Revisiting Random Weight Perturbation for Efficiently
Improving Generalization", TMLR 2024).
"""

from __future__ import annotations

import torch

from harness_methods.base import stage_seed
from harness_methods.modifier import Modifier

SCALES = ("var_abs", "std_abs", "filter")


def noise_std(param: torch.Tensor, sigma: float, law: str) -> torch.Tensor:
    if law == "var_abs":
        return sigma * param.abs().sqrt()
    if law == "std_abs":
        return sigma * param.abs()
    if law == "filter":
        if param.dim() < 2:
            return sigma * param.norm().expand_as(param)
        rows = param.reshape(param.shape[0], -1).norm(dim=1)
        return sigma * rows.reshape(-1, *([1] * (param.dim() - 1))).expand_as(param)
    raise ValueError(f"noise law {law!r} is none of {SCALES}")


class RWP(Modifier):
    name = "rwp"

    def __init__(self, base, config=None):
        super().__init__(base, config)
        self.scope = self.choice("scope", ("lora", "full"), "lora")
        self.noise_scale = self.choice("noise_scale", SCALES, "var_abs")
        self.sigma = self.number("sigma", 0.01, low=0)
        self.mix = self.number("lambda", 0.5, low=0, high=1)  # weight of the perturbed gradient
        self.generator = torch.Generator()

    def before_task(self, ctx):
        super().before_task(ctx)
        self.generator = torch.Generator().manual_seed(stage_seed(ctx, ctx.stage))

    def fit_state(self):  # the noise drawn so far moved the generator on
        return {"base": super().fit_state(), "generator": self.generator.get_state()}

    def load_fit_state(self, state):
        super().load_fit_state(state["base"])
        self.generator.set_state(state["generator"])

    def perturbed_tensors(self, ctx) -> list[torch.Tensor]:
        return list(self.params) if self.scope == "lora" else list(ctx.model.parameters())

    def sample_noise(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Drawn on the CPU generator (the same noise on any device), then moved to the tensor's."""
        return [torch.randn(t.shape, generator=self.generator, dtype=t.dtype).to(t.device) *
                noise_std(t.detach(), self.sigma, self.noise_scale) for t in tensors]

    def step(self, ctx, closure):
        loss = self.gradient_pass(ctx, closure)
        clean = [p.grad.clone() if p.grad is not None else None for p in self.params]
        tensors = self.perturbed_tensors(ctx)
        noise = self.sample_noise(tensors)
        with torch.no_grad():
            saved = [t.detach().clone() for t in tensors]
            for t, e in zip(tensors, noise):
                t.add_(e)
        self.gradient_pass(ctx, closure)
        lam = self.mix
        with torch.no_grad():
            for t, s in zip(tensors, saved):
                t.copy_(s)
            for p, g0 in zip(self.params, clean):
                if p.grad is not None and g0 is not None:
                    p.grad.mul_(lam).add_(g0, alpha=1 - lam)
        return loss
