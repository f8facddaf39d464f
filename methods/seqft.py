"""SeqFT: sequential full fine-tuning, the lower bound.

One model is carried from stage to stage and every backbone weight trains, except the shared token
embedding, which the reference training script always freezes.

Reference: cmnfriend/O-LoRA's `src/run_uie_lora.py` (commit 1d5def7), which freezes every
parameter named `shared`; the SeqFT row of O-LoRA's Table 1.
"""

from __future__ import annotations

from harness_methods.sequential import Sequential


class SeqFT(Sequential):
    name = "seqft"
    paper_name = "SeqFT"
    table_rank = 0
    fixed_parametrisation = "full"
