"""GORP: continual gradient low-rank projection.

The intended behaviour by default, the public code's quirks as options (below). Hyperparameters
may differ per order group (`per_order`, as the paper's scripts for orders 4-6).

Trainable parts, updated jointly by one projected AdamW (eps 1e-6, bias correction on):
- LoRA branches on the self-attention projections only, grown as in O-LoRA (a new branch per task,
  earlier ones frozen, all summed at inference). New B's: plain AdamW at `lr`. New A's: AdamW at
  `lr` on the gradient with the stored memory subspace removed, g <- g - U U^T g (U: r x k').
- The full-rank weights of `full_rank_targets` (T5: decoder cross-attention q and v; LLaMA:
  mlp.gate_proj), trained GaLore-style at `galore_lr`: the gradient G (m x n) is projected onto its
  top-`galore_rank` singular directions, P recomputed every `update_proj_gap` steps of the
  parameter (right case m >= n: R = G P^T, update N P; left case: R = P^T G, update P N), the
  memory subspace is removed from R, Adam runs on R, and the update is scaled by `galore_scale`.
  Moments live in the projected space and are not rotated when P changes (as GaLore).
- Memory, after each task, from the final first moments M1 of the projected parameters (a LoRA A's
  r x d_in moment, a full-rank W's m x k projected moment): the left singular vectors that reach 90%
  of the spectral energy (none is a valid outcome); later tasks append the residual's directions
  until 90% of the new moment's energy is covered, truncated to the row count.

Options for the public code's behaviour: `memory_source = "current_dir_quirk"` (its memory never
loads in a fresh run, so no projection ever happens), `persist_full_rank = false` (its full-rank
updates are discarded after each stage's evaluation), `enable_reg_terms = true` (the lambda terms the
code has but never applies: O-LoRA orthogonality lambda1, norm of the new branch lambda2, soft
orthogonality of the full-rank update lambda3 * ||dW dW^T - I||_F).

Reference: Wcxwcxw/GORP (the code released after the paper; its `scripts/order_*.sh` and
`scripts_llama` give the settings in `configs/gorp.toml`).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from harness.errors import HarnessError
from harness_methods.base import Context, SettingError
from harness_methods.deltas import branch_factors
from harness_methods.growth import branch_name, norm_term, orthogonality_term
from harness_methods.inclora import IncLoRA
from harness_methods.lora import lora_layers, matching_modules

MEMORY_THRESHOLD = 0.9  # fixed in the reference code
MEMORY_SOURCES = ("previous_stage", "current_dir_quirk")


def galore_projector(grad: torch.Tensor, rank: int) -> torch.Tensor:
    """The GaLore 'std' projector of a gradient: its top-`rank` right singular vectors as rows
    (k x n) when m >= n, else its top left singular vectors as columns (m x k)."""
    U, _, Vh = torch.linalg.svd(grad.float(), full_matrices=False)
    m, n = grad.shape
    return Vh[:rank].contiguous() if m >= n else U[:, :rank].contiguous()


def project(grad: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    return grad @ P.T if grad.shape[0] >= grad.shape[1] else P.T @ grad


def project_back(low: torch.Tensor, P: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return low @ P if shape[0] >= shape[1] else P @ low


def remove_subspace(x: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """x - U U^T x for an orthonormal basis U (columns); x unchanged without one."""
    if basis is None or basis.shape[1] == 0:
        return x
    return x - basis @ (basis.T @ x)


def grow_memory(basis: torch.Tensor | None, moment: torch.Tensor,
                threshold: float = MEMORY_THRESHOLD) -> torch.Tensor:
    """The memory after one more task: left singular vectors of the first moment (see module doc).
    The result has as many rows as `moment` and at most that many columns; it may be empty."""
    moment = moment.float()
    rows = moment.shape[0]
    sq = torch.linalg.svdvals(moment) ** 2
    total = float(sq.sum())
    if basis is None:
        U, S, _ = torch.linalg.svd(moment, full_matrices=False)
        keep = int((torch.cumsum(S ** 2, 0) / max(total, 1e-30) < threshold).sum()) if total else 0
        return U[:, :keep].contiguous()
    if total == 0.0:
        return basis
    U, S, _ = torch.linalg.svd(remove_subspace(moment, basis), full_matrices=False)
    acc, take = (total - float((S ** 2).sum())) / total, 0
    while acc < threshold and take < len(S):
        acc += float(S[take] ** 2) / total
        take += 1
    return torch.cat([basis, U[:, :take]], dim=1)[:, :rows].contiguous()


class ProjectedAdamW(torch.optim.Optimizer):
    """GORP's AdamW. Each parameter group may set `rank` (GaLore projection, with `update_proj_gap`
    and `scale`); any parameter may carry a memory basis (`set_memory`), removed from its (projected)
    gradient before the moments. The update rule is the transformers AdamW that GaLore and GORP
    modify: step size lr * sqrt(1 - b2^s) / (1 - b1^s), denominator sqrt(v) + eps.

    Hand-written because no maintained optimizer combines GaLore's projection with a per-parameter
    memory subspace (the `galore-torch` package has no hook for the latter)."""

    def __init__(self, groups: Iterable[dict], lr: float, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=None,
                        update_proj_gap=200, scale=1.0)
        super().__init__(list(groups), defaults)

    def set_memory(self, param: torch.Tensor, basis: torch.Tensor | None) -> None:
        if basis is not None:
            self.state[param]["memory"] = basis.to(param.device, torch.float32)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                step = state.get("step", 0)
                grad = p.grad.float()
                if group["rank"]:
                    if "projector" not in state or step % group["update_proj_gap"] == 0:
                        state["projector"] = galore_projector(grad, group["rank"])
                    grad = project(grad, state["projector"])
                grad = remove_subspace(grad, state.get("memory"))
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                step += 1
                state["step"] = step
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                size = group["lr"] * (1 - beta2 ** step) ** 0.5 / (1 - beta1 ** step)
                update = m / (v.sqrt() + group["eps"])
                if group["rank"]:
                    update = project_back(update, state["projector"], p.shape) * group["scale"]
                p.add_(update.to(p.dtype), alpha=-size)
                if group["weight_decay"]:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss


class GORP(IncLoRA):
    name = "gorp"
    paper_name = "GORP"
    table_rank = 9
    # ProjectedAdamW projects each gradient as a matrix; ZeRO-1/2 hand the optimizer flat
    # partitions instead, so only ZeRO-0 (plain data parallel) keeps the method what it is.
    max_zero_stage = 0

    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__(config)
        self.persist_full_rank = self.flag("persist_full_rank", True)
        self.enable_reg_terms = self.flag("enable_reg_terms", False)
        self._check(self.config)
        for order, overrides in self.config.get("per_order", {}).items():
            if not isinstance(overrides, dict):
                raise SettingError(f"per_order.{order}", f"must be a table; got {overrides!r}")
            self._check({**self.config, **overrides})
        self.memory: dict[str, torch.Tensor] = {}   # parameter key -> basis (may be empty)
        self.full_rank: dict[str, torch.nn.Parameter] = {}
        self.initial: dict[str, torch.Tensor] = {}  # full-rank weights as loaded
        self.optimizer: ProjectedAdamW | None = None
        self.stage_config: dict[str, Any] = dict(self.config)  # with this order's overrides
        self.stage_start: dict[str, torch.Tensor] = {}
        self.new_a: dict[str, torch.nn.Parameter] = {}
        self.pairs: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]] = []

    def _check(self, config: dict[str, Any]) -> None:
        """The settings an order group may change, as one stage reads them."""
        self.choice("memory_source", MEMORY_SOURCES, "previous_stage", config=config)
        for key in ("lora_targets", "lora_causal_targets", "full_rank_targets",
                    "causal_full_rank_targets"):
            self.module_targets(key, config=config)
        for key in ("galore_lr", "galore_scale", "eps"):
            self.number(key, above=0, config=config)
        for key in ("galore_rank", "update_proj_gap"):
            self.number(key, integer=True, low=1, config=config)
        for key in ("lambda1", "lambda2", "lambda3", "weight_decay"):
            self.number(key, 0.0, low=0, config=config)

    def check(self, ctx: Context) -> None:
        super().check(ctx)
        self._full_rank_names(ctx)

    def _full_rank_names(self, ctx: Context) -> list[str]:
        targets = self._targets(ctx)
        names = matching_modules(ctx.model, targets)
        if not names:
            raise HarnessError(f"gorp: full_rank_targets {targets!r} match no module of "
                               f"{ctx.backbone.path}")
        return names

    def setup(self, ctx: Context) -> None:
        names = self._full_rank_names(ctx)
        self.full_rank = {n: ctx.model.get_submodule(n).weight for n in names}
        if not self.persist_full_rank or self._lambda3():
            self.initial = {n: w.detach().clone() for n, w in self.full_rank.items()}

    def _targets(self, ctx: Context) -> str | list[str]:
        key = "full_rank_targets" if ctx.backbone.is_seq2seq else "causal_full_rank_targets"
        if key not in self.config:
            raise HarnessError(f"gorp: the config has no {key}")
        return self.config[key]

    def _lambda3(self) -> float:
        return float(self.stage_config.get("lambda3", 0.0)) if self.enable_reg_terms else 0.0

    def before_task(self, ctx: Context) -> None:
        super().before_task(ctx)
        self.stage_config = {**self.config,
                             **self.config.get("per_order", {}).get(str(ctx.order), {})}
        if not self.persist_full_rank:  # the public code reloads the backbone
            with torch.no_grad():
                for name, weight in self.full_rank.items():
                    weight.copy_(self.initial[name])
        for weight in self.full_rank.values():
            weight.requires_grad_(True)
        self.stage_start = {n: w.detach().clone() for n, w in self.full_rank.items()}
        new, old = branch_name(ctx.stage), self.branches[:-1]
        self.new_a = {f"lora{i}": layer.lora_A[new].weight
                      for i, layer in enumerate(lora_layers(ctx.model))}
        self.pairs = []
        if self.enable_reg_terms:
            for layer in lora_layers(ctx.model):
                a_old = torch.cat([layer.lora_A[b].weight.detach() for b in old]) if old else None
                self.pairs.append((a_old, layer.lora_A[new].weight, layer.lora_B[new].weight))

    def make_optimizer(self, ctx: Context, params: list[torch.nn.Parameter]) -> ProjectedAdamW:
        cfg = self.stage_config
        lora_a = {id(p) for p in self.new_a.values()}
        full = {id(p) for p in self.full_rank.values()}
        groups = [
            {"params": [p for p in params if id(p) not in lora_a | full]},
            {"params": [p for p in params if id(p) in lora_a]},
            {"params": [p for p in params if id(p) in full], "lr": float(cfg["galore_lr"]),
             "rank": int(cfg["galore_rank"]), "update_proj_gap": int(cfg["update_proj_gap"]),
             "scale": float(cfg["galore_scale"])},
        ]
        self.optimizer = ProjectedAdamW([g for g in groups if g["params"]], lr=float(cfg["lr"]),
                                        eps=float(cfg.get("eps", 1e-6)),
                                        weight_decay=float(cfg.get("weight_decay", 0.0)))
        if cfg.get("memory_source", "previous_stage") == "previous_stage":
            for key, param in self._projected().items():
                self.optimizer.set_memory(param, self.memory.get(key))
        return self.optimizer

    def _projected(self) -> dict[str, torch.nn.Parameter]:
        """The parameters with a memory: this stage's LoRA A's and the full-rank weights."""
        return {**self.new_a, **self.full_rank}

    def penalty(self, ctx: Context, batch: dict, outputs) -> dict[str, torch.Tensor] | None:
        if not self.enable_reg_terms:
            return None
        lambda1, lambda2 = (float(self.stage_config.get(k, 0.0)) for k in ("lambda1", "lambda2"))
        terms = {"orthogonal": lambda1 * sum(orthogonality_term(a_old, a, "code_l1")
                                             for a_old, a, _ in self.pairs),
                 "l2": lambda2 * norm_term([p for _, a, b in self.pairs for p in (a, b)], "code_norm")}
        if self._lambda3():
            deltas = [weight - self.initial[name] for name, weight in self.full_rank.items()]
            terms["full_rank_orthogonality"] = self._lambda3() * sum(
                torch.linalg.matrix_norm(d @ d.T - torch.eye(d.shape[0], dtype=d.dtype, device=d.device))
                for d in deltas)
        return terms

    def after_task(self, ctx: Context) -> None:
        for key, param in self._projected().items():
            moment = self.optimizer.state.get(param, {}).get("exp_avg") if self.optimizer else None
            if moment is not None:
                self.memory[key] = grow_memory(self.memory.get(key), moment)
        self.optimizer = None

    def task_deltas(self, ctx: Context) -> dict[str, torch.Tensor]:
        deltas = branch_factors(ctx.model, branch_name(ctx.stage))
        deltas.update({f"{name}::W": (w.detach() - self.stage_start[name])
                       for name, w in self.full_rank.items()})
        return deltas

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"branches": list(self.branches), "memory_keys": sorted(self.memory)}
        state.update({f"memory::{k}": v for k, v in self.memory.items()})
        return state

    def load_state_dict(self, state: dict[str, Any], ctx: Context, completed_stages: int) -> None:
        super().load_state_dict(state, ctx, completed_stages)
        self.memory = {k: state[f"memory::{k}"] for k in state["memory_keys"]}
