"""Methods that each break one rule of the plugin contract (tests/test_contract.py installs them
as a distribution of their own, so that a process of their own finds them too)."""

import random

from harness_methods.seqlora import SeqLoRA


class Forgetful(SeqLoRA):
    """Keeps a count its penalty reads but never hands it to a resumed run (no state_dict)."""

    def __init__(self, config=None):
        super().__init__(config)
        self.tasks_seen = 0

    def after_task(self, ctx):
        self.tasks_seen += 1

    def penalty(self, ctx, batch, outputs):
        return 1e-3 * self.tasks_seen * sum(p.sum() for p in ctx.model.parameters() if p.requires_grad)


class Unseeded(SeqLoRA):
    """Draws noise from the operating system instead of a generator seeded by the run."""

    def penalty(self, ctx, batch, outputs):
        return random.SystemRandom().random() * 1e-2 * outputs.loss


class Lazy(SeqLoRA):
    """Reads a setting only where it uses it, after the run folder exists."""

    def penalty(self, ctx, batch, outputs):
        return float(self.config["scale"]) * 0.0 * outputs.loss


class ClassCache(SeqLoRA):
    """Keeps what it learned on the class, which outlives a run in the same process only."""

    seen: list = []

    def after_task(self, ctx):
        ClassCache.seen.append(ctx.task.name)

    def penalty(self, ctx, batch, outputs):
        return 1e-3 * len(ClassCache.seen) * outputs.loss
