"""SeqFT: sequential full fine-tuning, the lower bound (METHODS.md §5.1).

One model is carried from stage to stage and every backbone weight trains, except the shared token
embedding, which the reference training script always freezes.
"""

from __future__ import annotations

from methods.base import Context, Method


class SeqFT(Method):
    name = "seqft"

    def setup(self, ctx: Context) -> None:
        ctx.model.requires_grad_(True)
        ctx.model.get_input_embeddings().weight.requires_grad_(False)
