"""OSFT: orthogonal subspace fine-tuning ("Sculpting Subspaces"): full fine-tuning in which every
targeted weight matrix moves only in the subspace of its low singular directions.

Per stage t (0-based) of T, for every targeted linear W (m x n):
- at the stage's start, W = U S V^T (thin SVD, float32); the top k = floor(f_t min(m, n)) triplets
  (U_h, S_h, V_h) are the high subspace, kept fixed, where earlier tasks live; the rest (U_l, S_l,
  V_l) train, starting from their SVD values, so training starts exactly at W. The protected
  share grows with the tasks seen: f_t = max_fraction * t / (T - 1) (the first task is plain full
  fine-tuning, as the reference's T5 script's first task; its later tasks raise the share by a
  fixed step per task);
- the model computes with W = U_h S_h V_h^T + U_l diag(S_l) V_l^T, rebuilt after every step;
  the factors' gradients come from W's, dU_l = G V_l^T diag(S_l), dS_l = diag(U_l^T G V_l^T),
  dV_l = diag(S_l) U_l^T G, and are projected off the high subspace before the optimizer step:
  dU_l <- dU_l - U_h U_h^T dU_l, dV_l <- dV_l - dV_l V_h^T V_h (dS_l as it is);
- after the step the factors are projected again (AdamW's per-coordinate scaling turns an update
  out of the allowed subspace): U_l <- U_l - U_h U_h^T U_l, V_l <- V_l - V_l V_h^T V_h;
- every other weight (embeddings, norms, the targets the profile leaves out) trains unconstrained,
  as in the reference (`train_other = false` freezes them).
So W's update stays in the complement of the high subspace on both sides:
(I - U_h U_h^T) dW (I - V_h^T V_h) = dW.

Reference: Red-Hat-AI-Innovation-Team/mini_trainer (`src/mini_trainer/osft_utils.py` at 01a3054:
the factorised weights, the gradient projection before the step and the parameter projection
after it), the method's maintained code; the paper's research code
Red-Hat-AI-Innovation-Team/orthogonal-subspace-learning at a5f91f6 (`notebooks/finetune_svd.py`,
`run_finetuning.sh`: the targets, the SVD at each task's start, the protected share growing per
task, lr 1e-5, batch 8, one epoch on T5-large).
"""

from __future__ import annotations

from typing import Any

import torch

from harness.errors import HarnessError
from harness_methods.base import Context, Method
from harness_methods.lora import matching_modules


class Factors:
    """One targeted matrix's factors at a stage: the fixed high part and the trained low part."""

    def __init__(self, weight: torch.Tensor, k: int):
        U, S, Vt = torch.linalg.svd(weight.detach().float(), full_matrices=False)
        self.U_h, self.S_h, self.V_h = U[:, :k], S[:k], Vt[:k]
        # LAPACK returns U and Vt column-major; the trained factors are made row-major, as the
        # gradients `take_gradient` writes are (a fused AdamW pairs entries by memory order: the
        # trainer would otherwise copy each gradient into its factor's layout at every step).
        row_major = torch.contiguous_format
        self.U_l = torch.nn.Parameter(U[:, k:].clone(memory_format=row_major))
        self.S_l = torch.nn.Parameter(S[k:].clone())
        self.V_l = torch.nn.Parameter(Vt[k:].clone(memory_format=row_major))

    def params(self) -> list[torch.nn.Parameter]:
        return [self.U_l, self.S_l, self.V_l]

    def weight(self) -> torch.Tensor:
        return (self.U_h * self.S_h) @ self.V_h + (self.U_l * self.S_l) @ self.V_l

    def take_gradient(self, G: torch.Tensor) -> None:
        """The factors' gradients from the weight's G, projected off the high subspace."""
        with torch.no_grad():
            G = G.float()
            dU = (G @ self.V_l.T) * self.S_l
            dS = ((self.U_l.T @ G) * self.V_l).sum(1)
            dV = self.S_l[:, None] * (self.U_l.T @ G)
            self.U_l.grad = dU - self.U_h @ (self.U_h.T @ dU)
            self.S_l.grad = dS
            self.V_l.grad = dV - (dV @ self.V_h.T) @ self.V_h

    def project(self) -> None:
        with torch.no_grad():
            self.U_l -= self.U_h @ (self.U_h.T @ self.U_l)
            self.V_l -= (self.V_l @ self.V_h.T) @ self.V_h


class OSFT(Method):
    name = "osft"
    paper_name = "OSFT"
    table_rank = 8.7
    max_zero_stage = 0  # reads and rewrites whole gradients and weights
    search_space = {"max_fraction": (0.3, 0.99)}  # the protected share at the last task

    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__(config)
        self.max_fraction = self.number("max_fraction", 0.98, low=0, high=1)
        self.train_other = self.flag("train_other", True)
        self.targets = {key: self.module_targets(key) for key in ("targets", "causal_targets")}
        self.factors: dict[str, Factors] = {}
        self.start: dict[str, torch.Tensor] = {}
        self.linears: dict[str, torch.nn.Linear] = {}  # the targets, found once per stage

    def _targets(self, ctx: Context) -> dict[str, torch.nn.Linear]:
        """The linear layers the backbone's targets select (peft's rule, as LoRA targets)."""
        targets = self.targets["targets" if ctx.backbone.is_seq2seq else "causal_targets"]
        names = set(matching_modules(ctx.model, targets)) if targets is not None else set()
        return {n: m for n, m in ctx.model.named_modules()
                if n in names and isinstance(m, torch.nn.Linear)}

    def check(self, ctx: Context) -> None:
        if not self._targets(ctx):
            key = "targets" if ctx.backbone.is_seq2seq else "causal_targets"
            raise HarnessError(f"{self.name}: {key} {self.targets[key]!r} match no linear layer "
                               f"of {ctx.backbone.path}")

    def protected_fraction(self, stage: int, stages: int) -> float:
        return self.max_fraction * stage / max(1, stages - 1)

    def before_task(self, ctx: Context) -> None:
        fraction = self.protected_fraction(ctx.stage, len(ctx.tasks))
        for p in ctx.model.parameters():
            p.requires_grad_(self.train_other)
        self.factors, self.start, self.linears = {}, {}, self._targets(ctx)
        for name, linear in self.linears.items():
            weight = linear.weight
            k = int(fraction * min(weight.shape))
            self.factors[name] = Factors(weight, k)
            self.start[name] = weight.detach().clone()
            weight.requires_grad_(True)  # its gradient feeds the factors'; the optimizer skips it

    def trainable_parameters(self, ctx: Context) -> list[torch.nn.Parameter]:
        targets = {id(m.weight) for m in self.linears.values()}
        others = [p for p in ctx.model.parameters() if p.requires_grad and id(p) not in targets]
        return [p for f in self.factors.values() for p in f.params()] + others

    def step(self, ctx: Context, closure) -> torch.Tensor:
        loss = closure()
        for name, linear in self.linears.items():
            G = linear.weight.grad
            self.factors[name].take_gradient(torch.zeros_like(linear.weight) if G is None else G)
            linear.weight.grad = None
        return loss

    def after_step(self, ctx: Context) -> None:
        with torch.no_grad():
            for name, linear in self.linears.items():
                factors = self.factors[name]
                factors.project()
                linear.weight.copy_(factors.weight().to(linear.weight.dtype))

    def task_deltas(self, ctx: Context) -> dict[str, torch.Tensor]:
        return {f"{name}::W": (linear.weight.detach() - self.start[name]).float()
                for name, linear in self.linears.items()}
