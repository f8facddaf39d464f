"""IncLoRA: a new LoRA branch per task; earlier branches and the backbone frozen; inference uses the
sum of all branches. It is O-LoRA with both regularisers at zero.

One known difference from the O-LoRA code, shared by every growth method here: peft gives each
branch its own LoRA dropout, so with dropout > 0 the frozen and the new branch see independent masks,
where the reference applies one mask x~ = dropout(x) to both. The expected output is the same; the
noise differs. The embedded default uses dropout 0, where the two coincide.

Reference: cmnfriend/O-LoRA at commit 2a2e620 (`src/uie_trainer_lora.py`,
`src/run_uie_lora.py`) run with `lamda_1 = lamda_2 = 0`.
"""

from __future__ import annotations

from typing import Any

from harness_methods.base import Context
from harness_methods.growth import BranchGrowth
from harness_methods.lora import train_only


class IncLoRA(BranchGrowth):
    name = "inclora"
    paper_name = "IncLoRA"
    table_rank = 2

    def _activate(self, ctx: Context, name: str) -> None:
        # Every branch acts (their outputs add up); only the newest one trains.
        ctx.model.base_model.set_adapter(self.branches)
        train_only(ctx.model, name)

    def state_dict(self) -> dict[str, Any]:
        return {"branches": list(self.branches)}
