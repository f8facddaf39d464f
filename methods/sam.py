"""SAM modifier: sharpness-aware minimisation of the trainable parameters.

g = grad L(theta); eps = rho g / (||g|| + 1e-12) over all trainable tensors jointly (adaptive:
eps_i = rho theta_i^2 g_i / (|| |theta| * g || + 1e-12)); the same batch is run again at
theta + eps, theta is restored by copying the saved values back (exact), and the optimizer steps
with the gradient taken at the perturbed point. Only the trainable parameters are perturbed.

Reference: no code for this benchmark; the update of Foret et al., "Sharpness-Aware
Minimization" (ICLR 2021), and its adaptive form (Kwon et al., ASAM, ICML 2021).
"""

from __future__ import annotations

import torch

from harness_methods.modifier import Modifier


class SAM(Modifier):
    name = "sam"

    def __init__(self, base, config=None):
        super().__init__(base, config)
        self.rho = self.number("rho", 0.05, low=0)
        self.adaptive = self.flag("adaptive", False)

    def step(self, ctx, closure):
        loss = self.gradient_pass(ctx, closure)
        rho, adaptive = self.rho, self.adaptive
        params = [p for p in self.params if p.grad is not None]
        with torch.no_grad():
            if adaptive:
                norm = torch.norm(torch.stack([(p.abs() * p.grad).norm() for p in params]))
                eps = [rho * p.pow(2) * p.grad / (norm + 1e-12) for p in params]
            else:
                norm = torch.norm(torch.stack([p.grad.norm() for p in params]))
                eps = [rho * p.grad / (norm + 1e-12) for p in params]
            saved = [p.detach().clone() for p in params]
            for p, e in zip(params, eps):
                p.add_(e)
        self.gradient_pass(ctx, closure)
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        return loss
