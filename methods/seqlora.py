"""SeqLoRA: one LoRA adapter (peft) trained through all tasks; the backbone stays frozen.
The optimizer is re-created at every stage; the adapter carries over.

Reference: no code of its own; the SeqLoRA row of O-LoRA's Table 1, one peft LoRA adapter as
cmnfriend/O-LoRA's `src/run_uie_lora.py` builds it (r 8, alpha 32, dropout 0.1 on T5).
"""

from __future__ import annotations

from harness_methods.sequential import Sequential


class SeqLoRA(Sequential):
    name = "seqlora"
    paper_name = "SeqLoRA"
    table_rank = 1
    fixed_parametrisation = "lora"
