"""The dependency direction: the layers `lint-imports` checks (pyproject.toml, [tool.importlinter])
hold every module, so a new module cannot sit outside them unchecked; the check passes; and no
modules import each other in a circle, within a layer either."""

import pkgutil
import tomllib
from pathlib import Path

import harness
import harness_methods

ROOT = Path(__file__).resolve().parents[1]
DATA_FOLDERS = {"harness.ds_configs", "harness.templates"}  # files only, no Python


def _layers() -> list[set[str]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers"]
    return [{name.strip() for name in layer.replace("|", ":").split(":")}
            for layer in contract["layers"]]


def test_every_module_is_in_a_layer():
    listed = set().union(*_layers())
    modules = {m.name for m in pkgutil.walk_packages(harness.__path__, "harness.")}
    outside = {m for m in modules - listed - DATA_FOLDERS
               if not any(m.startswith(f"{name}.") for name in listed)}
    assert not outside, f"modules in no layer of [tool.importlinter]: {sorted(outside)}"
    assert "harness_methods" in listed and harness_methods.__path__


def test_the_layers_are_kept():
    """import-linter's check of the contract (imports inside functions included)."""
    import subprocess
    import sys

    done = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:]


def test_no_import_circle():
    import grimp

    graph = grimp.build_graph("harness", "harness_methods")
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            assert back is None, f"import circle: {importer} -> {' -> '.join(back)}"


def test_every_function_reads_in_one_screen():
    """No function of the engine over 50 lines (docstring included)."""
    import ast

    long = []
    for path in sorted((ROOT / "harness").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 50:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
