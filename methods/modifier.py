"""Modifiers: plugins that change only the training step and compose with any base method
(`seqlora+sam`, `olora+rwp`). A modifier wraps the base method and forwards every other hook.

Its own settings are its `config`; a run records them under its name beside the base method's
(`recorded_config`), so the two never clash.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from harness_methods.base import Context, Method


class Modifier(Method):
    def __init__(self, base: Method, config: dict[str, Any] | None = None):
        super().__init__(config)
        self.base = base
        self.params: list[torch.nn.Parameter] = []

    def recorded_config(self) -> dict[str, Any]:
        return {**self.base.recorded_config(), type(self).name: self.config}

    @property
    def max_zero_stage(self) -> int:  # type: ignore[override]
        return min(type(self).own_max_zero_stage, self.base.max_zero_stage)

    # A modifier reads the whole gradient between its two passes (ZeRO-2 partitions it away).
    own_max_zero_stage: int = 0

    def trainable_parameters(self, ctx):
        self.params = self.base.trainable_parameters(ctx)  # what `gradient_pass` clears
        return self.params

    def gradient_pass(self, ctx: Context, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One forward/backward through the base method's own step, from zeroed gradients."""
        for p in self.params:
            p.grad = None
        return self.base.step(ctx, closure)


# Every hook but the step goes to the base method unchanged; `trainable_parameters` is forwarded
# above, where the modifier also keeps what it returns.
FORWARDED = ("stages", "check", "setup", "before_task", "training_data", "make_optimizer", "penalty",
             "after_step", "select_for_eval", "evaluates_as_before", "after_task", "task_deltas", "stage_metrics",
             "state_dict", "load_state_dict", "fit_state", "load_fit_state")


def _forwarding(hook: str):
    def forwarded(self, *args, **kwargs):
        return getattr(self.base, hook)(*args, **kwargs)
    forwarded.__name__ = forwarded.__qualname__ = hook
    forwarded.__doc__ = f"The base method's `{hook}`."
    return forwarded


for _hook in FORWARDED:
    setattr(Modifier, _hook, _forwarding(_hook))
