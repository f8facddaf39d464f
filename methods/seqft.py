"""SeqFT: sequential full fine-tuning, the lower bound.

One model is carried from stage to stage and every backbone weight trains, except the shared token
embedding, which the reference training script always freezes.
"""

from __future__ import annotations

from harness_methods.sequential import Sequential


class SeqFT(Sequential):
    name = "seqft"
    paper_name = "SeqFT"
    table_rank = 0
    base = "full"
