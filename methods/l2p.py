"""L2P: learning to prompt, a pool of prompts chosen per example by their keys.

Wang et al., CVPR 2022; reference google-research/l2p and its PyTorch port JH-LEE-KR/l2p-pytorch
(prompt.py `Prompt.forward`, engine.py's loss, configs/cifar100_l2p.py).

The backbone is frozen. A pool of M prompts (each L vectors) with a learnable key each (both
initialised uniform in [0, 1), as the reference). For every example the query q is the frozen
backbone's pooled encoding of its input without prompts: the mean of T5's last encoder states over
the input tokens (T5 has no [CLS]), or of a causal model's last hidden states over the source
tokens (never the answer). The N keys most cosine-similar to q select their prompts, concatenated
in order of similarity in front of the input embeddings, at training and at test alike (no task
identity, no batch-wise majority). The loss adds the reference's pull term

    - pull_coeff * sum over the batch and the N selected keys of cos(q, k) / batch size,

which moves the selected keys toward their queries (the prompts learn from the task loss only).
The pool and keys train through every task.
"""

from __future__ import annotations

from typing import Any

import torch

from harness.textio import position_ids
from harness_methods.base import Context, Method, SettingError
from harness_methods.prompts import PromptedModel, source_mask


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """The reference's normalisation: x / sqrt(max(sum x^2, eps)) along the last dimension."""
    return x * torch.rsqrt(torch.clamp((x ** 2).sum(-1, keepdim=True), min=eps))


def pick(rows: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """`rows[chosen]` through index_select: the same values, and a backward that adds the
    gradients of a row chosen more than once in a fixed order (indexing's backward accumulates
    them with atomic adds across threads on CPU, so a run was not reproducible)."""
    return rows.index_select(0, chosen.flatten()).unflatten(0, chosen.shape)


class PromptPool(torch.nn.Module):
    def __init__(self, size: int, length: int, width: int, generator: torch.Generator):
        super().__init__()
        self.prompts = torch.nn.Parameter(torch.rand(size, length, width, generator=generator))
        self.keys = torch.nn.Parameter(torch.rand(size, width, generator=generator))

    def select(self, query: torch.Tensor, top_n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompts of the `top_n` keys nearest each query ([B, top_n * L, d], most similar
        first) and the pull term's similarity sum over the batch, divided by its size."""
        # In float32 whatever the training precision (a bf16 engine casts the keys): the ranking
        # and the pull term read cosines that bf16's 3 digits would blur.
        with torch.autocast(query.device.type, enabled=False):
            q, k = l2_normalize(query.float()), l2_normalize(self.keys.float())
            chosen = (q @ k.T).topk(top_n, dim=1).indices  # [B, N], by descending similarity
            pulled = (pick(k, chosen) * q.unsqueeze(1)).sum() / len(query)
        return pick(self.prompts, chosen).flatten(1, 2), pulled


class L2P(Method):
    name = "l2p"
    paper_name = "L2P"
    table_rank = 5.5
    search_space = {"pull_coeff": (1e-3, 1.0)}

    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__(config)
        self.pool_size = self.number("pool_size", 10, integer=True, low=1)
        self.length = self.number("prompt_length", 5, integer=True, low=1)
        self.top_n = self.number("top_n", 5, integer=True, low=1)
        if self.top_n > self.pool_size:
            raise SettingError("top_n", f"must be at most pool_size ({self.pool_size}); "
                                        f"got {self.top_n}")
        self.pull_coeff = self.number("pull_coeff", 0.1, low=0)
        self.pool: PromptPool | None = None
        self.backbone: torch.nn.Module | None = None
        self.pulled: torch.Tensor | None = None  # the latest batch's pull similarity

    def setup(self, ctx: Context) -> None:
        ctx.model.requires_grad_(False)
        self.backbone = ctx.model
        width = ctx.model.get_input_embeddings().weight.shape[1]
        generator = torch.Generator().manual_seed(ctx.seed)
        self.pool = PromptPool(self.pool_size, self.length, width, generator).to(ctx.device)
        ctx.model = PromptedModel(ctx.model, self.prompt_for)
        ctx.model.prompts = self.pool  # the wrapper keeps a method's prompt modules under `prompts`

    @torch.no_grad()
    def query(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              labels: torch.Tensor | None) -> torch.Tensor:
        """The frozen backbone's mean last hidden state over each row's source tokens (in eval
        mode: no dropout in the query, as the reference's frozen feature extractor)."""
        model, was_training = self.backbone, self.backbone.training
        model.eval()
        try:
            if model.config.is_encoder_decoder:
                mask = attention_mask.bool()
                hidden = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask)
            else:
                mask = source_mask(attention_mask, labels)
                hidden = getattr(model, model.base_model_prefix)(
                    input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids(attention_mask))
        finally:
            model.train(was_training)
        states = hidden.last_hidden_state.float() * mask.unsqueeze(-1)
        return states.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)

    def prompt_for(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor | None = None) -> torch.Tensor:
        prompts, self.pulled = self.pool.select(self.query(input_ids, attention_mask, labels),
                                                self.top_n)
        return prompts

    def penalty(self, ctx: Context, batch: dict, outputs: Any) -> dict[str, torch.Tensor]:
        return {"key_pull": -self.pull_coeff * self.pulled}
