"""MTL: the multi-task upper bound.

One stage on the shuffled union of every task's training set, with the parametrisation of the
compared family (`base = "lora"`, one adapter, by default; `"full"` as an option) and the profile's
epochs; every task is evaluated after that single stage, so R has one row and AA is its result.

Reference: no code; the MTL row of O-LoRA's Table 1 (one model trained on every task at once).
"""

from __future__ import annotations

import datasets

from harness_methods.base import Context
from harness_methods.sequential import Sequential


class MTL(Sequential):
    name = "mtl"
    paper_name = "MTL"
    table_rank = 11

    def stages(self, ctx: Context) -> list[str]:
        return ["all"]

    def training_data(self, ctx: Context) -> datasets.Dataset:
        return datasets.concatenate_datasets([ctx.data[t.name].train for t in ctx.tasks])
