"""Adding a method: the scaffold writes a standalone plugin package that installs, passes its own
test and the plugin contract, and runs, without touching the harness's tree; settings files are
found through the method's package; a method's per-stage numbers reach its stage records."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.paths import PROJECT_ROOT
from harness.scaffold import new_builtin_method, new_plugin_package
from harness.testing import run_method
from harness_methods import registry
from harness_methods.base import Method

EXAMPLE = PROJECT_ROOT / "examples" / "l2anchor-plugin"


def files_of(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def test_the_example_plugin_is_what_the_scaffold_writes(tmp_path):
    written = new_plugin_package("l2anchor", tmp_path / "plugin")
    assert {p.name for p in written} == {"pyproject.toml", "README.md", "__init__.py", "method.py",
                                         "l2anchor.toml", "test_l2anchor.py"}
    assert files_of(tmp_path / "plugin") == files_of(EXAMPLE)
    method = (tmp_path / "plugin" / "l2anchor" / "method.py").read_text()
    assert len(method.splitlines()) < 70 and "class L2Anchor(Method)" in method
    with pytest.raises(HarnessError, match="not an empty folder"):
        new_plugin_package("other", tmp_path / "plugin")
    with pytest.raises(HarnessError, match="not a valid name"):
        new_plugin_package("Bad-Name", tmp_path / "bad")
    with pytest.raises(HarnessError, match="already registered"):
        new_plugin_package("seqlora", tmp_path / "taken")


def test_without_out_only_a_development_clone_is_written_to(tmp_path):
    installed = tmp_path / "site-packages"  # the harness's tree as pip installs it: no clone
    (installed / "harness").mkdir(parents=True)
    with pytest.raises(HarnessError, match="give --out DIR"):
        new_builtin_method("l2anchor", root=installed)
    assert [p.name for p in installed.iterdir()] == ["harness"]
    clone = tmp_path / "clone"
    for folder in ("methods/configs", "tests"):
        (clone / folder).mkdir(parents=True)
    shutil.copy(PROJECT_ROOT / "pyproject.toml", clone / "pyproject.toml")
    (clone / "methods" / "base.py").write_text("")
    written = new_builtin_method("l2anchor", root=clone)
    assert {p.name for p in written} == {"l2anchor.py", "l2anchor.toml", "test_method_l2anchor.py",
                                         "pyproject.toml"}
    assert 'l2anchor = "harness_methods.l2anchor:L2Anchor"' in (clone / "pyproject.toml").read_text()


def test_a_plugin_package_installs_passes_its_test_and_the_contract_and_runs(tmp_path,
                                                                             synthetic_dir):
    """`pip install` of the example (into a folder of its own, not this environment), then its
    own pytest, `harness check-method` and a run, each as a user types them."""
    plugin, site = tmp_path / "l2anchor-plugin", tmp_path / "site"
    shutil.copytree(EXAMPLE, plugin, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--target", str(site), str(plugin)], check=True)
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}

    def command(*args):
        return subprocess.run([sys.executable, *args], env=env, cwd=tmp_path, capture_output=True,
                              text=True)

    listed = command("-m", "harness", "list", "methods")
    assert "l2anchor" in listed.stdout, listed.stderr[-2000:]
    tested = command("-m", "pytest", "-p", "no:cacheprovider", "-q", str(plugin))
    assert tested.returncode == 0 and "2 passed" in tested.stdout, tested.stdout[-3000:]
    # The command, on the installed package: the checks that make runs were just run by the
    # plugin's own test (method_contract); running them twice would only cost the suite time.
    checked = command("-m", "harness", "check-method", "l2anchor", "--skip",
                      "determinism,resume_between_stages,resume_inside_stage,evaluation,two_ranks")
    assert checked.returncode == 0, checked.stdout[-3000:] + checked.stderr[-2000:]
    assert "all 9 checks passed or did not apply" in checked.stdout
    assert "PASS  registered             l2anchor.method.L2Anchor" in checked.stdout
    ran = command("-m", "harness", "run", "--method", "l2anchor", "--tasks", "agnews,SST-2",
                  "--data-dir", str(synthetic_dir), "--results", str(tmp_path / "results"),
                  "--train-per-task", "16", "--test-per-task", "8", "--no-progress")
    assert ran.returncode == 0, ran.stderr[-2000:]
    run_dir = tmp_path / "results" / "default" / "l2anchor" / "tasks-agnews+SST-2" / "seed0"
    stage = json.loads((run_dir / "stage_02-SST-2" / "metrics.json").read_text())
    assert stage["method"] == {"anchored_tensors": 12}  # stage_metrics: the adapter's tensors


class Relative(Method):
    config_file = "settings/relative.toml"


class Beside(Method):
    pass


def test_a_config_file_is_found_beside_the_module_that_defines_the_method(tmp_path, monkeypatch):
    module = sys.modules[__name__]
    monkeypatch.setattr(module, "__file__", str(tmp_path / "plugin.py"))
    with pytest.raises(HarnessError, match=r"relative\.toml: config file of method 'relative' not "
                                           r"found \(the class's config_file = 'settings/relative\.toml'"):
        registry.method_config("relative", "default", Relative)
    with pytest.raises(HarnessError, match=r"no config_file on the class, so configs/beside\.toml"):
        registry.method_config("beside", "default", Beside)
    (tmp_path / "settings").mkdir()
    (tmp_path / "settings" / "relative.toml").write_text("[common]\nlr = 0.5\n[default]\nlr = 0.25\n")
    assert registry.method_config("relative", "default", Relative) == {"lr": 0.25}
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "beside.toml").write_text("[common]\nweight_decay = 0.1\n")
    with pytest.raises(HarnessError, match=r"beside\.toml \[default\]: method beside: lr is required"):
        registry.build("beside", "default", Beside, Beside)


def test_per_stage_numbers_of_a_method_land_in_its_stage_records(synthetic_dir, tmp_path):
    run_dir = run_method("agem", synthetic_dir, tmp_path, ("agnews", "SST-2"), 16, 8)
    first, second = (json.loads((d / "metrics.json").read_text()) for d in run_dir.stage_folders()[1:])
    assert first["method"] == {"projected_steps": 0}  # no memory yet: nothing to project onto
    assert 0 <= second["method"]["projected_steps"] <= second["train"]["steps"]


def test_a_plugins_warnings_are_collected_into_its_run_record(tmp_path):
    """The runner adds the method's own package to the loggers a run collects (method_packages)."""
    import logging

    from harness.runlog import QUIET, RunLog
    from harness.runner import method_packages
    from harness_methods.sam import SAM
    from harness_methods.seqlora import SeqLoRA

    assert method_packages(SAM(SeqLoRA({"lr": 1e-3}), {"rho": 0.05})) == ("harness_methods",)
    with RunLog(tmp_path, sources=QUIET + ("myplugin",)) as runlog:
        logging.getLogger("myplugin.method").warning("a short subspace")
        logging.getLogger("elsewhere").warning("not the run's")
        assert runlog.take() == ["a short subspace"]
