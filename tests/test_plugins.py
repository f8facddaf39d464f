"""Adding a method: the scaffold writes a working plugin and test, and a plugin shipped by another
installed distribution is found through its `harness.methods` entry point, with no edit here."""

import importlib.util
import json
import shutil
import sys

import pytest

from harness.cli import main
from harness.errors import HarnessError
from harness.paths import PROJECT_ROOT
from harness.scaffold import new_method
from harness_methods import registry


@pytest.fixture
def scratch_project(tmp_path):
    root = tmp_path / "project"
    for folder in ("methods/configs", "tests"):
        (root / folder).mkdir(parents=True)
    shutil.copy(PROJECT_ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


def install_thirdparty(site, module_name, source, method_name, class_name):
    """A distribution in `site`: a module and a dist-info whose entry point names it."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module_name}.py").write_text(source)
    info = site / "thirdparty_methods-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-methods\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        f"[harness.methods]\n{method_name} = {module_name}:{class_name}\n")


def test_scaffold_writes_plugin_config_test_and_entry_point(scratch_project):
    written = new_method("l2anchor", root=scratch_project)
    assert {p.name for p in written} == {"l2anchor.py", "l2anchor.toml", "test_method_l2anchor.py",
                                         "pyproject.toml"}
    plugin = (scratch_project / "methods" / "l2anchor.py").read_text()
    assert len(plugin.splitlines()) < 60 and "class L2Anchor(Method)" in plugin
    assert 'l2anchor = "harness_methods.l2anchor:L2Anchor"' in (scratch_project / "pyproject.toml").read_text()
    with pytest.raises(HarnessError, match="already exists"):
        new_method("l2anchor", root=scratch_project)
    with pytest.raises(HarnessError, match="not a valid name"):
        new_method("Bad-Name", root=scratch_project)


def test_thirdparty_plugin_is_found_runs_and_passes_its_test(scratch_project, tmp_path, synthetic_dir,
                                                             monkeypatch):
    new_method("l2anchor", root=scratch_project)
    source = (scratch_project / "methods" / "l2anchor.py").read_text()
    site = tmp_path / "site"
    install_thirdparty(site, "thirdparty_l2anchor", source, "l2anchor", "L2Anchor")
    monkeypatch.syspath_prepend(str(site))
    # Its hyperparameters come with it: the class names its own config file.
    config = scratch_project / "methods" / "configs" / "l2anchor.toml"
    registry.available.cache_clear()
    try:
        assert "l2anchor" in registry.available()
        cls = registry.method_class("l2anchor")
        monkeypatch.setattr(cls, "config_file", str(config), raising=False)
        results = tmp_path / "results"
        assert main(["run", "--method", "l2anchor", "--tasks", "agnews,SST-2", "--data-dir",
                     str(synthetic_dir), "--results", str(results), "--train-per-task", "16",
                     "--test-per-task", "8", "--no-progress"]) == 0
        summary = json.loads(next(results.glob("default/l2anchor/*/seed0/summary.json")).read_text())
        assert summary["method"] == "l2anchor"
        # The generated test passes against the generated plugin.
        spec = importlib.util.spec_from_file_location(
            "generated_test", scratch_project / "tests" / "test_method_l2anchor.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.test_l2anchor_penalty_zero_at_anchor_and_equal_to_formula(synthetic_dir)
    finally:
        sys.modules.pop("thirdparty_l2anchor", None)
        registry.available.cache_clear()
