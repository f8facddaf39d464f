"""The plugin contract (`harness check-method`): every built-in method keeps it, and a method that
breaks one of its rules fails the check that states the rule. Two DeepSpeed ranks are checked for
the built-in methods in test_deepspeed.py, batched into two launches."""

import os

import pytest

from harness.paths import PROJECT_ROOT
from harness.testing import check_method
from harness_methods import registry

BUILT_IN = sorted(n for n, ep in registry.available().items() if ep.value.startswith("harness_methods."))


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_built_in_method_keeps_the_contract(name, synthetic_dir, tmp_path):
    results = check_method(name, skip=("two_ranks",), workdir=tmp_path, data_dir=synthetic_dir)
    failed = [r.line() for r in results if r.passed is False]
    assert not failed, "\n".join(failed)
    assert [r.check for r in results if r.passed is None] in (
        ["evaluation", "two_ranks"], ["two_ranks"])  # only a method that carries cells over


BROKEN = {"forgetful": ("Forgetful", {"resume_between_stages", "resume_inside_stage"}),
          "unseeded": ("Unseeded", {"determinism", "resume_between_stages", "resume_inside_stage"}),
          "lazy": ("Lazy", {"settings"}),
          "classcache": ("ClassCache", {"determinism", "resume_between_stages", "resume_inside_stage"})}


@pytest.fixture
def broken_methods(tmp_path, monkeypatch):
    """tests/broken_methods registered as a distribution of its own (an entry point each), found
    by this process and by the ones the contract starts."""
    site = tmp_path / "site"
    info = site / "broken_methods-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-methods\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[harness.methods]\n" + "".join(
        f"{name} = tests.broken_methods.broken:{cls}\n" for name, (cls, _) in BROKEN.items()))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), str(PROJECT_ROOT)]))
    registry.available.cache_clear()
    yield
    registry.available.cache_clear()


@pytest.mark.parametrize("name", BROKEN)
def test_a_broken_rule_fails_its_check(name, broken_methods, synthetic_dir, tmp_path):
    results = check_method(name, skip=("two_ranks",), workdir=tmp_path / "work",
                           data_dir=synthetic_dir)
    assert {r.check for r in results if r.passed is False} == BROKEN[name][1]
