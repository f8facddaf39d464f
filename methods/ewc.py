"""EWC: elastic weight consolidation (standard definition, no reference code).

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

from harness_methods.base import Context
from harness_methods.sequential import Sequential


def example_log_likelihood_grads(ctx: Context, batcher, source: str, target: str,
                                 params: dict[str, torch.nn.Parameter]) -> list[torch.Tensor]:
    """Gradient of log p(target | source) = -(mean token loss x number of target tokens)."""
    batch = batcher.train_batch([source], [target])
    outputs = ctx.model(**batch)
    n_tokens = int((batch["labels"] != -100).sum())
    return torch.autograd.grad(-outputs.loss * n_tokens, list(params.values()))


def linear_owners(model: torch.nn.Module,
                  params: dict[str, torch.nn.Parameter]) -> dict[str, torch.nn.Linear] | None:
    """The bias-free nn.Linear whose weight each parameter is (LoRA's A and B are), or None when
    some parameter is not one (full fine-tuning: embeddings, layer norms)."""
    modules = dict(model.named_modules())
    owners = {}
    for name, param in params.items():
        module = modules.get(name.removesuffix(".weight"))
        if not (name.endswith(".weight") and isinstance(module, torch.nn.Linear)
                and module.bias is None and module.weight is param):
            return None
        owners[name] = module
    return owners


def summed_squared_example_grads(model: torch.nn.Module, batch: dict,
                                 owners: dict[str, torch.nn.Linear]) -> dict[str, torch.Tensor]:
    """sum_n (d log p(y_n | x_n) / dW)^2 for each Linear weight W, from one batched backward.

    The per-example gradient of y = x W^T is sum over positions of g^T x, with g the gradient at
    the layer's output; a hook keeps each call's x and output, so the B single-example backward
    passes this replaces become one (Opacus computes per-sample gradients the same way). Examples
    do not interact in an encoder-decoder forward (padding is masked, there is no batch norm), so
    each example's part of the summed log-likelihood's gradient is its own gradient.
    """
    calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (weight, input, output) per call

    def keep(name):
        def hook(module, args, output):
            calls.append((name, args[0].detach(), output))
        return hook

    handles = [module.register_forward_hook(keep(name)) for name, module in owners.items()]
    try:
        logits, labels = model(**batch).logits, batch["labels"]
    finally:
        for handle in handles:
            handle.remove()
    if not getattr(model.config, "is_encoder_decoder", False):  # causal: logits[t] -> token t+1
        logits, labels = logits[:, :-1], labels[:, 1:]
    logp = -torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                              ignore_index=-100, reduction="sum")
    # The gradient at each call's output (None for a call the loss does not reach).
    output_grads = torch.autograd.grad(logp, [output for _, _, output in calls], allow_unused=True)
    squared_sum = {name: torch.zeros_like(module.weight) for name, module in owners.items()}
    per_example: dict[str, torch.Tensor] = {}
    for (name, x, _), g in zip(calls, output_grads):
        if g is not None:  # a module called twice contributes both calls
            part = torch.einsum("bto,bti->boi", g.flatten(1, -2), x.flatten(1, -2))
            per_example[name] = per_example[name] + part if name in per_example else part
    for name, per in per_example.items():
        squared_sum[name] = (per ** 2).sum(0)
    return squared_sum


class EWC(Sequential):
    name = "ewc"
    paper_name = "EWC"
    table_rank = 4
    search_space = {"lambda": (1e-2, 1e4)}

    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__(config)
        self.lam = self.number("lambda", low=0)
        self.online = self.flag("online", False)
        self.gamma = self.number("gamma", 1.0, low=0)
        self.fisher_samples = self.number("fisher_samples", 1000, integer=True, low=1)
        self.normalize_fisher = self.flag("normalize_fisher", True)
        self.params: dict[str, torch.nn.Parameter] = {}
        self.fishers: list[dict[str, torch.Tensor]] = []
        self.anchors: list[dict[str, torch.Tensor]] = []

    def before_task(self, ctx: Context) -> None:
        super().before_task(ctx)
        self.params = {n: p for n, p in ctx.model.named_parameters() if p.requires_grad}

    def fisher(self, ctx: Context, batcher) -> dict[str, torch.Tensor]:
        train = ctx.task_data.train
        n = min(self.fisher_samples, len(train))
        total = {name: torch.zeros_like(p) for name, p in self.params.items()}
        was_training = ctx.model.training
        ctx.model.eval()  # the Fisher of the model as it predicts (no dropout)
        owners = linear_owners(ctx.model, self.params)
        if owners is None:  # one backward per example
            for source, target in zip(train["source"][:n], train["target"][:n]):
                grads = example_log_likelihood_grads(ctx, batcher, source, target, self.params)
                for name, grad in zip(self.params, grads):
                    total[name] += grad.detach() ** 2
        else:  # one backward per batch, per-example gradients from the Linear layers' hooks
            size = ctx.profile.batch_size
            for k in range(0, n, size):
                batch = batcher.train_batch(train["source"][k:min(n, k + size)],
                                            train["target"][k:min(n, k + size)])
                for name, value in summed_squared_example_grads(ctx.model, batch, owners).items():
                    total[name] += value
        ctx.model.train(was_training)
        fisher = {name: value / n for name, value in total.items()}
        if self.normalize_fisher:
            mean = torch.cat([f.flatten() for f in fisher.values()]).mean()
            if mean > 0:
                fisher = {name: f / mean for name, f in fisher.items()}
        return fisher

    def after_task(self, ctx: Context) -> None:
        fisher = self.fisher(ctx, ctx.batcher)
        anchor = {name: p.detach().clone() for name, p in self.params.items()}
        if self.online and self.fishers:
            fisher = {n: self.gamma * self.fishers[0][n] + f for n, f in fisher.items()}
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
        return 0.5 * self.lam * total

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
