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

    def stages(self, ctx):
        return self.base.stages(ctx)

    @property
    def max_zero_stage(self) -> int:  # type: ignore[override]
        return min(type(self).own_max_zero_stage, self.base.max_zero_stage)

    # A modifier reads the whole gradient between its two passes (ZeRO-2 partitions it away).
    own_max_zero_stage: int = 0

    def check(self, ctx):
        self.base.check(ctx)

    def setup(self, ctx):
        self.base.setup(ctx)

    def before_task(self, ctx):
        self.base.before_task(ctx)

    def training_data(self, ctx):
        return self.base.training_data(ctx)

    def trainable_parameters(self, ctx):
        self.params = self.base.trainable_parameters(ctx)
        return self.params

    def make_optimizer(self, ctx, params):
        return self.base.make_optimizer(ctx, params)

    def penalty(self, ctx, batch, outputs):
        return self.base.penalty(ctx, batch, outputs)

    def select_for_eval(self, ctx, task):
        self.base.select_for_eval(ctx, task)

    def evaluates_as_before(self, ctx, task):
        return self.base.evaluates_as_before(ctx, task)

    def after_task(self, ctx):
        self.base.after_task(ctx)

    def task_deltas(self, ctx):
        return self.base.task_deltas(ctx)

    def stage_metrics(self, ctx):
        return self.base.stage_metrics(ctx)

    def state_dict(self):
        return self.base.state_dict()

    def load_state_dict(self, state, ctx, completed_stages):
        self.base.load_state_dict(state, ctx, completed_stages)

    def fit_state(self):
        return self.base.fit_state()

    def load_fit_state(self, state):
        self.base.load_fit_state(state)

    def gradient_pass(self, ctx: Context, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One forward/backward through the base method's own step, from zeroed gradients."""
        for p in self.params:
            p.grad = None
        return self.base.step(ctx, closure)
