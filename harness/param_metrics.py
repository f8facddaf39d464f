"""Parameter metrics of the per-task weight updates dW_t, vectorised in torch.

Input: one dict per task, as `harness_methods.deltas` stores them (`<module>::A` and `<module>::B` with
dW = B A, or a dense `<module>::W`). Every metric is computed per adapted layer (a module present
in every task) and aggregated over layers by the mean; the sum is reported too (`*_sum`).

- OO (orthogonal overlap) of the last task against the earlier ones, sum_{i<T} ||A_i A_T^T||_F^2, and
  its normalised form (each term divided by ||A_i||_F^2 ||A_T||_F^2); only for low-rank updates.
- AWOM, sum_{i<T} ||dW_T^T dW_i||_F^2.
- ACR (average collision rate): the fraction of positions where two tasks' dW are both "non-zero",
  averaged over task pairs. "Non-zero" needs a tolerance, since products B A are never exactly
  zero: |x| > TAU_ABS (ACR), or |x| > TAU_REL * max|dW| of that matrix (ACR_rel).
- GSR: the bounded Hoyer ratio ||dW||_1 / (sqrt(mn) ||dW||_F) in [1/sqrt(mn), 1] (lower = sparser),
  and its square `GSR_density` (the non-zero fraction for equal-magnitude entries); mean over tasks.
- Nuclear norm ||dW_t||_*, per task; for a low-rank update from the r x r core (thin QR of B and
  A^T: ||B A||_* = ||R_B R_A^T||_*), so no d x d SVD is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TAU_ABS = 1e-5
TAU_REL = 1e-3


@dataclass
class Update:
    """One task's update of one layer: factored (B @ A) or dense (W)."""

    B: torch.Tensor | None = None
    A: torch.Tensor | None = None
    W: torch.Tensor | None = None

    @property
    def factored(self) -> bool:
        return self.W is None

    def dense(self) -> torch.Tensor:
        return self.W if self.W is not None else self.B @ self.A

    def nuclear_norm(self) -> float:
        if not self.factored:
            return float(torch.linalg.svdvals(self.W).sum())
        _, r_b = torch.linalg.qr(self.B)
        _, r_a = torch.linalg.qr(self.A.T)
        return float(torch.linalg.svdvals(r_b @ r_a.T).sum())


def by_layer(deltas: list[dict[str, torch.Tensor]]) -> dict[str, list[Update]]:
    """Group per-task delta dicts into per-layer lists of updates; layers missing in any task are
    left out (they cannot be compared)."""
    per_task = []
    for task in deltas:
        layers: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in task.items():
            module, _, part = key.rpartition("::")
            layers.setdefault(module, {})[part] = value.double()
        per_task.append({m: Update(**p) for m, p in layers.items()})
    common = set.intersection(*(set(t) for t in per_task)) if per_task else set()
    return {m: [t[m] for t in per_task] for m in sorted(common)}


def frob2_of_product(x: Update, y: Update) -> float:
    """||dW_x^T dW_y||_F^2; for two low-rank updates via k x k matrices only:
    tr(M^T (A_x A_x^T) M (A_y A_y^T)) with M = B_x^T B_y."""
    if x.factored and y.factored:
        M = x.B.T @ y.B
        return float(torch.trace(M.T @ (x.A @ x.A.T) @ M @ (y.A @ y.A.T)))
    return float((x.dense().T @ y.dense()).pow(2).sum())


def collision_rates(updates: list[Update], relative: bool) -> torch.Tensor:
    """T x T matrix of CR_ij: the fraction of positions where both dW_i and dW_j exceed the
    tolerance (the diagonal is each update's own non-zero fraction)."""
    masks = []
    for u in updates:
        dense = u.dense().abs()
        tau = TAU_REL * float(dense.max()) if relative else TAU_ABS
        masks.append((dense > tau).flatten().double())
    stacked = torch.stack(masks)
    return (stacked @ stacked.T) / stacked.shape[1]


def pair_mean(matrix: torch.Tensor) -> float:
    T = matrix.shape[0]
    upper = torch.triu_indices(T, T, offset=1)
    return float(matrix[upper[0], upper[1]].mean())


def layer_metrics(updates: list[Update]) -> dict[str, float | list]:
    T = len(updates)
    out: dict[str, float | list] = {}
    gsr = []
    for u in updates:
        dense = u.dense()
        norm = float(dense.norm())
        gsr.append(float(dense.abs().sum()) / (math.sqrt(dense.numel()) * norm) if norm else math.nan)
    out["GSR_hoyer"] = sum(gsr) / T
    out["GSR_density"] = sum(g * g for g in gsr) / T
    out["nuclear_norm"] = [u.nuclear_norm() for u in updates]
    if T < 2:
        return out
    out["ACR"] = pair_mean(collision_rates(updates, relative=False))
    out["ACR_rel"] = pair_mean(collision_rates(updates, relative=True))
    last = updates[-1]
    out["AWOM"] = sum(frob2_of_product(last, u) for u in updates[:-1])
    if all(u.factored for u in updates):
        A = [u.A for u in updates]
        pairwise = torch.tensor([[float((a @ b.T).pow(2).sum()) for b in A] for a in A])
        norms = torch.tensor([float(a.pow(2).sum()) for a in A])
        out["OO"] = float(pairwise[:-1, -1].sum())
        scale = norms[:-1] * norms[-1]
        out["OO_normalised"] = float((pairwise[:-1, -1] / scale.clamp(min=1e-300)).sum())
        out["OO_pairwise"] = pairwise.tolist()
    return out


def parameter_metrics(deltas: list[dict[str, torch.Tensor]]) -> dict | None:
    """All parameter metrics of a run, aggregated over layers (mean, and `*_sum`); None when no
    layer is common to every task."""
    layers = by_layer(deltas)
    if not layers:
        return None
    per_layer = [layer_metrics(u) for u in layers.values()]
    out: dict = {"layers": len(per_layer), "aggregation": "mean over layers (and *_sum)",
                 "tau_abs": TAU_ABS, "tau_rel": TAU_REL}
    for key in ("GSR_hoyer", "GSR_density", "ACR", "ACR_rel", "AWOM", "OO", "OO_normalised"):
        values = [m[key] for m in per_layer if key in m]
        if values:
            out[key] = sum(values) / len(values)
            out[f"{key}_sum"] = sum(values)
    nuclear = torch.tensor([m["nuclear_norm"] for m in per_layer])  # layers x tasks
    out["nuclear_norm_per_task"] = nuclear.mean(0).tolist()
    out["nuclear_norm_per_task_sum"] = nuclear.sum(0).tolist()
    out["nuclear_norm"] = float(nuclear.mean())
    pairwise = [torch.tensor(m["OO_pairwise"]) for m in per_layer if "OO_pairwise" in m]
    if pairwise:
        out["OO_pairwise"] = torch.stack(pairwise).mean(0).tolist()
    return out
