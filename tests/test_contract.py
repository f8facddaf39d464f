"""The plugin contract (`harness check-method`): every built-in method keeps it, and a method that
breaks one of its rules fails the check that states the rule. Two DeepSpeed ranks are checked for
the built-in methods in test_deepspeed.py, batched into two launches."""

import random

import pytest

from harness.testing import check_method
from harness_methods import registry
from harness_methods.seqlora import SeqLoRA

BUILT_IN = sorted(n for n, ep in registry.available().items() if ep.value.startswith("harness_methods."))


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_built_in_method_keeps_the_contract(name, synthetic_dir, tmp_path):
    results = check_method(name, skip=("two_ranks",), workdir=tmp_path, data_dir=synthetic_dir)
    failed = [r.line() for r in results if r.passed is False]
    assert not failed, "\n".join(failed)
    assert [r.check for r in results if r.passed is None] in (
        ["evaluation", "two_ranks"], ["two_ranks"])  # only a method that carries cells over


class Forgetful(SeqLoRA):
    """Keeps a count it reports but never hands it to a resumed run (no state_dict)."""

    def __init__(self, config=None):
        super().__init__(config)
        self.tasks_seen = 0

    def after_task(self, ctx):
        self.tasks_seen += 1

    def penalty(self, ctx, batch, outputs):
        return 1e-3 * self.tasks_seen * sum(p.sum() for p in ctx.model.parameters() if p.requires_grad)


class Lazy(SeqLoRA):
    """Reads a setting only where it uses it, after the run folder exists."""

    def penalty(self, ctx, batch, outputs):
        return float(self.config["scale"]) * 0.0 * outputs.loss


class Unseeded(SeqLoRA):
    """Draws noise from the operating system instead of a generator seeded by the run."""

    def penalty(self, ctx, batch, outputs):
        return random.SystemRandom().random() * 1e-2 * outputs.loss


@pytest.mark.parametrize("cls, failing", [
    (Forgetful, {"resume_between_stages", "resume_inside_stage"}),
    (Unseeded, {"determinism", "resume_between_stages", "resume_inside_stage"}),
    (Lazy, {"settings"}),
])
def test_a_broken_rule_fails_its_check(cls, failing, synthetic_dir, tmp_path, monkeypatch):
    real = registry.method_class
    monkeypatch.setattr(registry, "method_class", lambda name: cls if name == "broken" else real(name))
    config = tmp_path / "broken.toml"
    config.write_text("[common]\nlr = 5e-3\n" + ("scale = 0.5\n" if cls is Lazy else ""))
    monkeypatch.setattr(cls, "config_file", str(config), raising=False)
    results = check_method("broken", skip=("two_ranks",), workdir=tmp_path / "work",
                           data_dir=synthetic_dir)
    assert {r.check for r in results if r.passed is False} == failing
