"""`harness new-method NAME --out DIR`: a method plugin as a package of its own (its method file,
its config shipped as package data, a test on the testing kit, an entry point), installable with
`pip install -e DIR`. Without --out, only inside a development clone of the harness, a built-in
method in its `methods/` folder."""

from __future__ import annotations

import importlib.util
import keyword
import re
from pathlib import Path

from harness.errors import HarnessError
from harness.paths import PROJECT_ROOT, is_development_clone

TEMPLATES = Path(__file__).resolve().parent / "templates"
ENTRY_HEADER = '[project.entry-points."harness.methods"]'


def fields_of(name: str) -> dict[str, str]:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or keyword.iskeyword(name):
        raise HarnessError(f"new-method: {name!r} is not a valid name (lower-case letters, digits, "
                           "_; no Python keyword)")
    from harness_methods import registry

    if name in registry.available():
        raise HarnessError(f"new-method: a method named {name!r} is already registered "
                           f"({registry.available()[name].value})")
    title = name.replace("_", " ").title().replace(" ", "")
    return {"name": name, "Title": title, "Class": title, "dist": f"cl-harness-{name.replace('_', '-')}"}


def write_all(targets: dict[Path, str], fields: dict[str, str]) -> list[Path]:
    existing = [str(p) for p in targets if p.exists()]
    if existing:
        raise HarnessError(f"new-method: {existing[0]} already exists")
    for path, template in targets.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text((TEMPLATES / template).read_text().format(**fields))
    return list(targets)


def new_plugin_package(name: str, out: Path) -> list[Path]:
    """The standalone package in `out` (created; refused if it holds files already)."""
    fields = fields_of(name)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HarnessError(f"new-method --out {out}: not an empty folder")
    if any(out.resolve().is_relative_to(tree) for tree in package_trees()):
        raise HarnessError(f"new-method --out {out}: inside the harness's own package tree")
    if importlib.util.find_spec(name) is not None:  # the plugin's package would shadow it
        raise HarnessError(f"new-method: a Python module named {name!r} is already importable; "
                           "choose another name")
    return write_all({out / "pyproject.toml": "plugin-pyproject.toml.tmpl",
                      out / "README.md": "plugin-readme.md.tmpl",
                      out / name / "__init__.py": "plugin-init.py.tmpl",
                      out / name / "method.py": "method.py.tmpl",
                      out / name / "configs" / f"{name}.toml": "config.toml.tmpl",
                      out / "tests" / f"test_{name}.py": "test.py.tmpl"}, fields)


def package_trees() -> list[Path]:
    """The folders of the harness's own packages, which no command writes into."""
    import harness
    import harness_methods

    return [Path(harness.__file__).resolve().parent, Path(harness_methods.__file__).resolve().parent]


def new_builtin_method(name: str, root: Path = PROJECT_ROOT) -> list[Path]:
    """A built-in method in a development clone: its file and config under `methods/`, its test
    under `tests/`, its entry point in the clone's `pyproject.toml`."""
    if not is_development_clone(root):
        raise HarnessError("new-method: this harness is installed, not a development clone, and a "
                           "command never writes into its tree; give --out DIR to write the method "
                           "as a package of its own")
    fields = fields_of(name)
    pyproject = root / "pyproject.toml"
    text = pyproject.read_text()
    if ENTRY_HEADER not in text:
        raise HarnessError(f"{pyproject}: no {ENTRY_HEADER} section to register the method in")
    section = text.split(ENTRY_HEADER, 1)[1].split("\n[", 1)[0]
    if re.search(rf"^{name}\s*=", section, flags=re.M):
        raise HarnessError(f"{pyproject}: a method named {name!r} is already registered")
    written = write_all({root / "methods" / f"{name}.py": "method.py.tmpl",
                         root / "methods" / "configs" / f"{name}.toml": "config.toml.tmpl",
                         root / "tests" / f"test_method_{name}.py": "test.py.tmpl"}, fields)
    entry = f'{name} = "harness_methods.{name}:{fields["Class"]}"'
    pyproject.write_text(text.replace(ENTRY_HEADER, f"{ENTRY_HEADER}\n{entry}", 1))
    return written + [pyproject]
