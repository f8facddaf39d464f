"""InfLoRA: interference-free LoRA (the reference implementation's design by default).

Per task and adapted linear: a new branch whose down-projection A_t (r x d_in) is designed before
training and frozen, and whose up-projection B_t (zero at the start) is the only trained part.
- Statistics: C = mean of h h^T over every token position (padding included, as the reference) of
  the linear's true input, over the task's whole training set.
- Design (`design = "paper_svd"`, the reference code's): the top-r left singular vectors of
  (I - P) C, A_t = U[:, :r]^T / sqrt(3); so A_t P = 0 and the new branch cannot act on protected
  inputs. In a basis F of the free subspace these are the eigenvectors of F^T C^2 F.
- `design = "projected_covariance"`: the eigenvectors of F^T C F, the covariance of the inputs
  projected onto the free subspace. It agrees with the reference only when C has no cross-terms
  between protected and free directions, which real statistics always have.
- Memory (DualGPM) after training, from C recomputed with the trained model, with the threshold
  eps_t = eps_lo + (eps_hi - eps_lo) t / T: a basis M of the protected subspace ("remove"), switched
  to a basis Q of its complement ("retain") once it is wider than d_in / 2; `memory = "gpm"` never
  switches. P = M M^T (remove) or I - Q Q^T (retain).
- `design = "random_projected"` (gainlora's T5 port, whose numbers the GainLoRA paper reports): A_t
  is peft's Kaiming-uniform draw with the protected part removed and rows rescaled to 1/sqrt(3);
  the first task keeps the raw draw. No statistics are gathered before training.

Reference: liangyanshuo/InfLoRA (`methods/inflora.py`: the design of A_t and the DualGPM
memory) and its T5 port in liangyanshuo/gainlora (`src/cl_trainer_inflora.py`: the `gpm` memory
and `random_projected` design options, the thresholds of its T5 scripts).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from harness_methods.base import Context
from harness_methods.growth import branch_name
from harness_methods.inclora import IncLoRA
from harness_methods.lora import lora_layers

log = logging.getLogger(__name__)
DESIGNS = ("paper_svd", "projected_covariance", "random_projected")
MEMORIES = ("dualgpm", "gpm")


def first_memory(C: torch.Tensor, eps: float, dual: bool) -> tuple[torch.Tensor, str]:
    U, S, _ = torch.linalg.svd(C)
    ratio = torch.cumsum(S ** 2, 0) / (S ** 2).sum()
    k = max(1, int((ratio < eps).sum()))
    d = C.shape[0]
    if dual and k >= d / 2:
        return U[:, k:], "retain"
    return U[:, :k], "remove"


def update_memory(M: torch.Tensor, kind: str, C: torch.Tensor, eps: float,
                  dual: bool) -> tuple[torch.Tensor, str]:
    """One DualGPM update of the basis `M` (type `kind`) with the statistics C of a new task."""
    d = C.shape[0]
    total = (torch.linalg.svdvals(C) ** 2).sum()
    if kind == "remove":
        U, S, _ = torch.linalg.svd(C - M @ (M.T @ C))
        acc, r = float((total - (S ** 2).sum()) / total), 0
        while acc < eps and r < len(S):
            acc += float(S[r] ** 2 / total)
            r += 1
        if r:
            M = torch.cat([M, U[:, :r]], dim=1)[:, :d]
        if dual and M.shape[1] > d / 2:  # the dual switch: keep the narrower complement instead
            U_full, _, _ = torch.linalg.svd(M, full_matrices=True)
            return U_full[:, M.shape[1]:], "retain"
        return M, "remove"
    U, S, _ = torch.linalg.svd(M @ (M.T @ C))
    acc, r = float((S ** 2).sum() / total), 0
    while acc >= 1 - eps and r < len(S):
        acc -= float(S[r] ** 2 / total)
        r += 1
    if r:
        U_r = U[:, :r]
        U2, _, _ = torch.linalg.svd(M - U_r @ (U_r.T @ M), full_matrices=False)
        M = U2[:, : M.shape[1] - r]
    return M, "retain"


def free_basis(M: torch.Tensor | None, kind: str, d: int) -> torch.Tensor:
    """An orthonormal basis of the subspace the memory leaves free (d x f)."""
    if M is None:
        return torch.eye(d)
    if kind == "retain":
        return M
    U, _, _ = torch.linalg.svd(M, full_matrices=True)
    return U[:, M.shape[1]:]


def design_down_projection(C: torch.Tensor, free: torch.Tensor, r: int,
                           form: str = "paper_svd") -> torch.Tensor:
    """The top-r designed directions, chosen inside the free subspace (basis `free`, d x f).

    "paper_svd": the top-r left singular vectors of (I - P) C = F F^T C, found as those of F^T C
    (no squared condition number); "projected_covariance": the top-r eigenvectors of F^T C F.
    Working in the basis F keeps A_t P = 0 even where the projected statistics have rank < r
    (an SVD's trailing vectors are arbitrary). If fewer than r directions are free, the extra rows
    are zero.
    """
    projected = free.T @ C if form == "paper_svd" else free.T @ C @ free
    U, _, _ = torch.linalg.svd(projected, full_matrices=False)
    k = min(r, free.shape[1])
    A = torch.zeros(r, C.shape[0])
    A[:k] = (free @ U[:, :k]).T
    return A / math.sqrt(3)


def project_rows(A: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    """gainlora's design: the random rows of A moved into the free subspace (A F F^T, i.e. the
    protected part A M M^T removed), each rescaled to norm 1/sqrt(3)."""
    projected = A @ free @ free.T
    norms = projected.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, projected / norms.clamp(min=1e-30) / math.sqrt(3), projected)


@torch.no_grad()
def input_statistics(ctx: Context, layers: list, batcher, batch_size: int) -> list[torch.Tensor]:
    """Uncentred second moment of each layer's input over the current task's training set."""
    sums = [torch.zeros(l.in_features, l.in_features) for l in layers]
    counts = [0] * len(layers)

    def hook(i):
        def record(module, inputs):
            h = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            sums[i].add_(h.T @ h)
            counts[i] += h.shape[0]
        return record

    handles = [l.base_layer.register_forward_pre_hook(hook(i)) for i, l in enumerate(layers)]
    was_training = ctx.model.training
    ctx.model.eval()
    try:
        train = ctx.task_data.train
        for start in range(0, len(train), batch_size):
            rows = train[start:start + batch_size]
            ctx.model(**batcher.train_batch(rows["source"], rows["target"]))
    finally:
        for handle in handles:
            handle.remove()
        ctx.model.train(was_training)
    return [s / max(1, c) for s, c in zip(sums, counts)]


class InfLoRA(IncLoRA):
    name = "inflora"
    paper_name = "InfLoRA"
    table_rank = 8

    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__(config)
        self.design = self.choice("design", DESIGNS, "paper_svd")
        self.dual = self.choice("memory", MEMORIES, "dualgpm") == "dualgpm"
        self.eps_lo = self.number("eps_lo", 0.995, low=0, high=1)
        self.eps_hi = self.number("eps_hi", 1.0, low=self.eps_lo, high=1)
        self.memory: list[tuple[torch.Tensor, str] | None] = []

    def before_task(self, ctx: Context) -> None:
        super().before_task(ctx)
        new = branch_name(ctx.stage)
        layers = lora_layers(ctx.model)
        if not self.memory:
            self.memory = [None] * len(layers)
        designed_from_statistics = self.design != "random_projected"
        stats = (input_statistics(ctx, layers, ctx.batcher, ctx.profile.eval_batch_size)
                 if designed_from_statistics else [None] * len(layers))
        short = []  # (free directions, rank) of the layers with fewer free directions than rank
        for layer, C, mem in zip(layers, stats, self.memory):
            A = layer.lora_A[new].weight
            free = free_basis(*(mem or (None, "remove")), A.shape[1])
            if free.shape[1] < layer.r[new]:
                short.append((free.shape[1], layer.r[new]))
            if designed_from_statistics:
                designed = design_down_projection(C, free, A.shape[0], self.design)
            elif mem is None:  # gainlora: the first task keeps peft's raw Kaiming draw
                designed = A.detach()
            else:
                designed = project_rows(A.detach().float(), free)
            with torch.no_grad():
                A.copy_(designed.to(A.dtype))
            A.requires_grad_(False)  # designed, frozen: only B_t trains
        if short:  # one line per stage, not one per layer
            log.warning("%s: stage %d (%s): %d of %d layers have fewer free input directions "
                        "than the branch rank %d (as few as %d)", self.name, ctx.stage + 1, ctx.task.name,
                        len(short), len(layers), max(r for _, r in short), min(f for f, _ in short))

    def after_task(self, ctx: Context) -> None:
        layers = lora_layers(ctx.model)
        stats = input_statistics(ctx, layers, ctx.batcher, ctx.profile.eval_batch_size)
        eps = self.eps_lo + (self.eps_hi - self.eps_lo) * ctx.stage / len(ctx.tasks)
        updated = [first_memory(C, eps, self.dual) if mem is None
                   else update_memory(*mem, C, eps, self.dual)
                   for C, mem in zip(stats, self.memory)]
        # Contiguous copies: the same layout as after a reload, so a resumed run is bitwise equal.
        self.memory = [(M.contiguous().clone(), kind) for M, kind in updated]

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"branches": list(self.branches),
                                 "kinds": [m[1] if m else None for m in self.memory]}
        state.update({f"memory{i}": m[0] for i, m in enumerate(self.memory) if m})
        return state

    def load_state_dict(self, state: dict[str, Any], ctx: Context, completed_stages: int) -> None:
        super().load_state_dict(state, ctx, completed_stages)
        for name in self.branches:  # designed down-projections stay frozen
            for layer in lora_layers(ctx.model):
                layer.lora_A[name].weight.requires_grad_(False)
        self.memory = [(state[f"memory{i}"], kind) if kind else None
                       for i, kind in enumerate(state["kinds"])]
