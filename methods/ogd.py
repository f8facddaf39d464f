"""OGD: orthogonal gradient descent (Farajtabar et al., AISTATS 2020).

Reference: the reproduction of its generalisation study, MehdiAbbanaBennani/continual-learning-ogdplus,
ogd/ogd_core.py (the authors released none).

After each task, n = memory_size // (tasks seen) of its training examples are drawn (seeded), and
for each one the gradient of a function of the model's output on that example alone is stored:
  - "gtl" (ground-truth logit; the reference's default): the gold token's logit, summed over the
    target's positions (teacher-forced) for a generated answer;
  - "avg" (average logit): the mean logit over the vocabulary, summed over the same positions.
(The paper's third variant, a direction per logit, would store one per vocabulary entry and target
position, 32k per token on T5: not offered.) The directions kept from earlier tasks are cut to n
each (their first n), the new ones are appended, and the whole set is orthonormalised in that
order. Every later gradient g, over all trainable tensors as one vector, is replaced by
g - V V^T g, so that it is orthogonal to every stored direction; the optimizer is plain SGD without
momentum, as the reference's, so each update is too.

Memory: memory_size directions of the trainable parameters' size, in float32, kept on the device
and saved with every stage. With LoRA (the default base; r 8 on T5-large's 144 q and v linears:
2.4M parameters) the reference's 100 directions take 0.94 GB, 1,000 take 9.4 GB; on T5-large's full
738M parameters a single direction is 3 GB, so `base = "full"` fits small models only.
"""

from __future__ import annotations

import itertools
import random
from typing import Any, Callable

import torch

from harness_methods.base import Context, SettingError
from harness_methods.sequential import Sequential

VARIANTS = ("gtl", "avg")


def output_function(logits: torch.Tensor, labels: torch.Tensor, variant: str,
                    causal: bool) -> torch.Tensor:
    """The scalar whose gradient OGD stores for one example: the gold token's logit ("gtl") or the
    mean logit ("avg"), summed over the target positions. A causal model's logits at position t
    are those of token t + 1."""
    if causal:
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != -100
    if variant == "gtl":
        values = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    else:
        values = logits.mean(-1)
    return (values * mask).sum()


def orthonormal_basis(columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An orthonormal basis of the span of `columns` [n, k], built in column order (the reference's
    Gram-Schmidt, each column orthogonalised twice in float64 so that no rounding is left in it),
    and which columns it keeps: one whose remainder after its predecessors is within the float32
    rounding of its own length (sqrt(n) eps) is dropped rather than normalised from noise."""
    n = columns.shape[0]
    floor = max(1.0, n ** 0.5) * torch.finfo(torch.float32).eps
    basis = torch.empty(n, 0, dtype=torch.float64, device=columns.device)
    kept = []
    for column in columns.T.double():
        rest = column
        for _ in range(2):  # twice is enough (Giraud et al. 2005)
            rest = rest - basis @ (basis.T @ rest)
        keep = bool(rest.norm() > floor * column.norm())
        if keep:
            basis = torch.cat([basis, (rest / rest.norm()).unsqueeze(1)], 1)
        kept.append(keep)
    return basis.to(columns.dtype), torch.tensor(kept, dtype=torch.bool)


def project_out(grad: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """g - V V^T g: `grad` less its components along the orthonormal columns of `basis`."""
    if basis.shape[1] == 0:
        return grad
    return grad - basis @ (basis.T @ grad)


class OGD(Sequential):
    name = "ogd"
    paper_name = "OGD"
    table_rank = 5.2
    max_zero_stage = 0  # projects the whole gradient
    search_space = {"memory_size": (20, 500)}

    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__(config)
        self.variant = self.choice("variant", VARIANTS, "gtl")
        self.memory_size = self.number("memory_size", integer=True, low=1)
        self.directions: dict[str, torch.Tensor] = {}  # task -> its stored orthonormal columns
        self.basis = torch.empty(0, 0)
        self.params: list[torch.nn.Parameter] = []

    def check(self, ctx: Context) -> None:
        super().check(ctx)
        if self.memory_size < len(ctx.tasks):  # every task keeps at least one direction
            raise SettingError("memory_size", f"must be at least the number of tasks "
                                              f"({len(ctx.tasks)}); got {self.memory_size}")

    def make_optimizer(self, ctx: Context, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=float(self.config["lr"]), momentum=0.0, weight_decay=0.0)

    def trainable_parameters(self, ctx: Context) -> list[torch.nn.Parameter]:
        self.params = super().trainable_parameters(ctx)
        return self.params

    def step(self, ctx: Context, closure: Callable[..., torch.Tensor]) -> torch.Tensor:
        loss = closure()
        if self.basis.numel():
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            flat = project_out(torch.cat([g.reshape(-1) for g in grads]).float(), self.basis)
            for p, part in zip(self.params, flat.split([p.numel() for p in self.params])):
                p.grad = part.view_as(p).to(p.dtype)
        return loss

    def example_directions(self, ctx: Context, pairs: list[tuple[str, str]]) -> torch.Tensor:
        """[trainable parameters, len(pairs)]: each example's gradient of the output function."""
        causal = not getattr(ctx.model.config, "is_encoder_decoder", False)
        was_training = ctx.model.training
        ctx.model.eval()  # no dropout: the direction of the model as it is
        columns = []
        for source, target in pairs:
            batch = ctx.batcher.train_batch([source], [target])
            value = output_function(ctx.model(**batch).logits.float(), batch["labels"],
                                    self.variant, causal)
            grads = torch.autograd.grad(value, self.params, allow_unused=True)
            columns.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                      for g, p in zip(grads, self.params)]).float().cpu())
        ctx.model.train(was_training)
        size = sum(p.numel() for p in self.params)
        return torch.stack(columns, 1) if columns else torch.empty(size, 0)

    def after_task(self, ctx: Context) -> None:
        per_task = self.memory_size // (ctx.stage + 1)
        train = ctx.task_data.train
        drawn = random.Random(ctx.seed * 1000 + ctx.stage).sample(range(len(train)),
                                                                  min(per_task, len(train)))
        new = self.example_directions(ctx, [(train[i]["source"], train[i]["target"]) for i in drawn])
        blocks = {t: d[:, :per_task] for t, d in self.directions.items()}
        blocks[ctx.task.name] = new.to(self.basis.device)
        owners = [t for t, d in blocks.items() for _ in range(d.shape[1])]
        basis, kept = orthonormal_basis(torch.cat(list(blocks.values()), 1))
        owners = [t for t, k in zip(owners, kept.tolist()) if k]
        self.hold(basis, {t: owners.count(t) for t in blocks}, ctx.device)

    def hold(self, basis: torch.Tensor, counts: dict[str, int], device: torch.device) -> None:
        """Keep `basis` on `device`, and each task's directions as a view of its columns (the
        tasks' columns are consecutive, in task order): one copy of the stored directions."""
        self.basis = basis.to(device)
        ends = list(itertools.accumulate(counts.values()))
        self.directions = {t: self.basis[:, end - n:end] for (t, n), end in zip(counts.items(), ends)}

    def state_dict(self) -> dict[str, Any]:
        return {"tasks": list(self.directions),
                **{f"directions.{i}": d for i, d in enumerate(self.directions.values())}}

    def load_state_dict(self, state: dict[str, Any], ctx: Context, completed_stages: int) -> None:
        blocks = [state[f"directions.{i}"] for i in range(len(state["tasks"]))]
        if blocks:
            self.hold(torch.cat(blocks, 1), dict(zip(state["tasks"], (b.shape[1] for b in blocks))),
                      ctx.device)
