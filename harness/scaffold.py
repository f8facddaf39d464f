"""`python -m harness new-method NAME`: a plugin file, its config and its test, from templates."""

from __future__ import annotations

import re
from pathlib import Path

from harness.errors import HarnessError
from harness.paths import PROJECT_ROOT

TEMPLATES = Path(__file__).resolve().parent / "templates"
ENTRY_HEADER = '[project.entry-points."harness.methods"]'


def new_method(name: str, root: Path = PROJECT_ROOT) -> list[Path]:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise HarnessError(f"new-method: {name!r} is not a valid name (lower-case letters, digits, _)")
    title = name.replace("_", " ").title().replace(" ", "")
    fields = {"name": name, "Title": title, "Class": title}
    targets = {
        root / "methods" / f"{name}.py": "method.py.tmpl",
        root / "methods" / "configs" / f"{name}.toml": "config.toml.tmpl",
        root / "tests" / f"test_method_{name}.py": "test.py.tmpl",
    }
    existing = [str(p) for p in targets if p.exists()]
    if existing:
        raise HarnessError(f"new-method: {existing[0]} already exists")
    pyproject = root / "pyproject.toml"
    text = pyproject.read_text()
    if ENTRY_HEADER not in text:
        raise HarnessError(f"{pyproject}: no {ENTRY_HEADER} section to register the method in")
    if re.search(rf"^{name}\s*=", text, flags=re.M):
        raise HarnessError(f"{pyproject}: a method named {name!r} is already registered")
    for path, template in targets.items():
        path.write_text((TEMPLATES / template).read_text().format(**fields))
    entry = f'{name} = "harness_methods.{name}:{title}"'
    pyproject.write_text(text.replace(ENTRY_HEADER, f"{ENTRY_HEADER}\n{entry}", 1))
    return list(targets) + [pyproject]
