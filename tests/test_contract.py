"""The plugin contract (`harness check-method`): every built-in method keeps it, and a method that
breaks one of its rules fails the check that states the rule. Two DeepSpeed ranks are checked for
the built-in methods in test_deepspeed.py, batched into two launches; their determinism in another
process here, in one launch (a process start costs seconds: a launch per method was a third of
this file's time)."""

import os

import pytest

from harness.paths import PROJECT_ROOT
from harness.testing import check_method
from harness.testing.contract import (Trial, assert_same, outcome, runnable_name,
                                       runs_in_another_process)
from harness_methods import registry

BUILT_IN = sorted(n for n, ep in registry.available().items() if ep.value.startswith("harness_methods."))


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_built_in_method_keeps_the_contract(name, synthetic_dir, tmp_path):
    results = check_method(name, skip=("determinism", "two_ranks"), workdir=tmp_path,
                           data_dir=synthetic_dir)
    failed = [r.line() for r in results if r.passed is False]
    assert not failed, "\n".join(failed)
    assert [r.check for r in results if r.passed is None] in (
        ["determinism", "evaluation", "two_ranks"], ["determinism", "two_ranks"])  # only a
    # method that carries cells over evaluates some afresh


def test_every_built_in_method_runs_alike_in_another_process(synthetic_dir, tmp_path):
    """The contract's determinism check for all of them: their second runs, one after another in
    one process under another hash seed, equal their runs in this one (a method whose state leaks
    into the next method's run fails here too)."""
    names = [runnable_name(n) for n in BUILT_IN]
    again = runs_in_another_process(names, tmp_path / "again", synthetic_dir)
    for name, run_dir in zip(names, again):
        reference = Trial(name, tmp_path / name, synthetic_dir).reference
        assert_same(outcome(run_dir), outcome(reference), f"{name}: a second run, another process")


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
    broken = BROKEN[name][1]
    # the determinism check (a process start) only where it is the one to fail
    skip = ("two_ranks",) if "determinism" in broken else ("determinism", "two_ranks")
    results = check_method(name, skip=skip, workdir=tmp_path / "work", data_dir=synthetic_dir)
    assert {r.check for r in results if r.passed is False} == broken
