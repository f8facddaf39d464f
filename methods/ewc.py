"""EWC: elastic weight consolidation (METHODS.md §5.5; standard definition, no reference code).

After stage t, the diagonal empirical Fisher F_t[i] = mean over N_F training examples of
(d log p(y_n | x_n) / d theta_i)^2, each gradient taken on one example (squaring a batch-mean
gradient would be a different quantity), with log p the sum of the gold label's token
log-probabilities; theta*_t is stored as the anchor. Penalty at later stages:
(lambda / 2) * sum_k sum_i F_k[i] (theta_i - theta*_k[i])^2, or with `online = true` one running
Fisher F <- gamma F + F_t anchored at the latest theta*. `normalize_fisher` rescales each F_t to mean 1.
"""

from __future__ import annotations

from typing import Any

import torch

from methods.base import Context
from methods.sequential import Sequential


def example_log_likelihood_grads(ctx: Context, batcher, source: str, target: str,
                                 params: dict[str, torch.nn.Parameter]) -> list[torch.Tensor]:
    """Gradient of log p(target | source) = -(mean token loss x number of target tokens)."""
    batch = batcher.train_batch([source], [target])
    outputs = ctx.model(**batch)
    n_tokens = int((batch["labels"] != -100).sum())
    return torch.autograd.grad(-outputs.loss * n_tokens, list(params.values()))


class EWC(Sequential):
    name = "ewc"

    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__(config)
        self.fishers: list[dict[str, torch.Tensor]] = []
        self.anchors: list[dict[str, torch.Tensor]] = []

    def before_task(self, ctx: Context) -> None:
        super().before_task(ctx)
        self.params = {n: p for n, p in ctx.model.named_parameters() if p.requires_grad}

    def fisher(self, ctx: Context, batcher) -> dict[str, torch.Tensor]:
        train = ctx.task_data.train
        n = min(int(self.config.get("fisher_samples", 1000)), len(train))
        total = {name: torch.zeros_like(p) for name, p in self.params.items()}
        was_training = ctx.model.training
        ctx.model.eval()  # the Fisher of the model as it predicts (no dropout)
        for source, target in zip(train["source"][:n], train["target"][:n]):
            grads = example_log_likelihood_grads(ctx, batcher, source, target, self.params)
            for name, grad in zip(self.params, grads):
                total[name] += grad.detach() ** 2
        ctx.model.train(was_training)
        fisher = {name: value / n for name, value in total.items()}
        if self.config.get("normalize_fisher", True):
            mean = torch.cat([f.flatten() for f in fisher.values()]).mean()
            if mean > 0:
                fisher = {name: f / mean for name, f in fisher.items()}
        return fisher

    def after_task(self, ctx: Context) -> None:
        fisher = self.fisher(ctx, ctx.batcher)
        anchor = {name: p.detach().clone() for name, p in self.params.items()}
        if self.config.get("online", False) and self.fishers:
            gamma = float(self.config.get("gamma", 1.0))
            fisher = {n: gamma * self.fishers[0][n] + f for n, f in fisher.items()}
            self.fishers, self.anchors = [fisher], [anchor]
        else:
            self.fishers.append(fisher)
            self.anchors.append(anchor)

    def penalty(self, ctx: Context, batch: dict, outputs) -> torch.Tensor | None:
        if not self.fishers:
            return None
        total = sum(
            (fisher[n] * (p - anchor[n]) ** 2).sum()
            for fisher, anchor in zip(self.fishers, self.anchors) for n, p in self.params.items())
        return 0.5 * float(self.config["lambda"]) * total

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"count": len(self.fishers)}
        for k, (fisher, anchor) in enumerate(zip(self.fishers, self.anchors)):
            state.update({f"fisher{k}.{n}": t for n, t in fisher.items()})
            state.update({f"anchor{k}.{n}": t for n, t in anchor.items()})
        return state

    def load_state_dict(self, state: dict[str, Any], ctx: Context, completed_stages: int) -> None:
        for k in range(int(state["count"])):
            self.fishers.append({n[len(f"fisher{k}."):]: t for n, t in state.items()
                                 if n.startswith(f"fisher{k}.")})
            self.anchors.append({n[len(f"anchor{k}."):]: t for n, t in state.items()
                                 if n.startswith(f"anchor{k}.")})
