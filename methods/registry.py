"""Finding method plugins by name, through Python entry points (group `harness.methods`).

Built-in methods are registered in this project's `pyproject.toml` exactly like a third-party
package registers its own, so `pip install some-package` adds methods without editing this repo.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import math
import sys
import tomllib
from functools import lru_cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import HarnessError
from harness.overrides import parse_override

if TYPE_CHECKING:  # imported where a method is: the tables read this module without torch
    from harness_methods.base import Method

TABLE_KEYS = ("table_rank", "paper_name")

GROUP = "harness.methods"


@lru_cache(maxsize=None)
def available() -> dict[str, Any]:
    """Method name -> entry point (loaded lazily, so a broken plugin only fails when used)."""
    found = {ep.name: ep for ep in entry_points(group=GROUP)}
    if not found:
        raise HarnessError(
            f"no method plugins registered under entry-point group {GROUP!r}; "
            "install the project (pip install -e .) so its entry points exist")
    return dict(sorted(found.items()))


def method_class(name: str) -> type[Method]:
    from harness_methods.base import Method

    methods = available()
    if name not in methods:
        close = difflib.get_close_matches(name, methods, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise HarnessError(f"unknown method {name!r}{hint}; known methods: {', '.join(methods)}")
    cls = methods[name].load()
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise HarnessError(f"entry point {name!r} ({methods[name].value}) is not a Method subclass")
    return cls


@lru_cache(maxsize=None)
def table_entry(name: str) -> tuple[tuple[float, str], str]:
    """(sort key in the tables, name in the published tables) as the method's own class declares
    them (`table_rank`, `paper_name`); a name that is no installed method (a combination, an
    imported run under another name) sorts after the ranked ones under its own name."""
    try:
        own = _stated_in_source(name)
        if own is None:
            own = vars(method_class(name))
    except (HarnessError, ImportError):
        own = {}
    rank = own.get("table_rank")
    return (math.inf if rank is None else rank, name), own.get("paper_name") or name


def _stated_in_source(name: str) -> dict[str, Any] | None:
    """The class's own `table_rank` and `paper_name` as its class body states them, read from its
    module's source without running it (a method's import brings torch and peft: seconds for a
    table). None where the source does not settle them, and the class is imported instead: no
    such class there, a decorated class, a value that is no literal, or one set elsewhere than by
    a plain assignment in the class body."""
    entry = available().get(name)
    if entry is None:
        return None
    module, _, qualname = entry.value.partition(":")
    try:
        tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text(encoding="utf-8"))
    except (ImportError, ValueError, AttributeError, TypeError, OSError, SyntaxError):
        return None
    cls = next((node for node in tree.body
                if isinstance(node, ast.ClassDef) and node.name == qualname), None)
    if cls is None or cls.decorator_list:
        return None
    stated, assigned = {}, 0
    for node in cls.body:
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, ast.AnnAssign) and node.value is not None else []
        for target in targets:
            if isinstance(target, ast.Name) and target.id in TABLE_KEYS:
                try:
                    stated[target.id] = ast.literal_eval(node.value)
                except (ValueError, TypeError, SyntaxError):
                    return None
                assigned += 1
    stores = sum(isinstance(node, ast.Name) and node.id in TABLE_KEYS and isinstance(node.ctx, ast.Store)
                 for node in ast.walk(cls))
    return stated if stores == assigned else None


def config_path(name: str, cls: type[Method]) -> Path:
    """Where a method's settings are: its class's `config_file`, relative to the folder of the
    module that defines the class, or else `configs/<name>.toml` in that folder. Either way the
    file ships with the method's package (as package data), wherever it is installed."""
    owner = next((k for k in cls.__mro__ if "config_file" in vars(k)), cls)  # who set config_file
    module = sys.modules.get(owner.__module__)
    folder = Path(module.__file__).resolve().parent if getattr(module, "__file__", None) else Path.cwd()
    given = vars(owner).get("config_file")
    return folder / given if given else folder / "configs" / f"{name}.toml"


def _missing_config(name: str, cls: type[Method], path: Path) -> str:
    given = getattr(cls, "config_file", None)
    where = (f"the class's config_file = {given!r}, relative to its module" if given else
             f"no config_file on the class, so configs/{name}.toml beside its module")
    return (f"{path}: config file of method {name!r} not found ({where}); ship it as package data "
            "of the method's package")


def method_config(name: str, profile: str, cls: type[Method] | None = None) -> dict[str, Any]:
    """Hyperparameters of a method for a profile: the `[common]` table of its config file
    (`config_path`), overlaid with `[<profile>]`."""
    cls = cls or method_class(name)
    path = config_path(name, cls)
    if not path.is_file():
        raise HarnessError(_missing_config(name, cls, path))
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise HarnessError(f"{path}: invalid TOML: {exc}") from exc
    config = dict(raw.get("common", {}))
    config.update(raw.get(profile, {}))
    _validate(config, f"{path} [{profile}]")
    return config


def _validate(config: dict[str, Any], where: str) -> None:
    """Settings every method shares the meaning of: learning rates are positive numbers."""
    for key, value in config.items():
        if key == "lr" or key.endswith("_lr"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise HarnessError(f"{where}: {key} must be a positive number, got {value!r}")


def apply_overrides(name: str, config: dict[str, Any], overrides: list[str]) -> dict[str, str]:
    """`--set method.KEY=VALUE`: change the method's setting KEY (it must exist) in `config`.
    Returns KEY -> the argument that set it."""
    given = {}
    for text in overrides:
        keys, value = parse_override(text)
        if len(keys) != 2 or keys[0] != "method":
            raise HarnessError(f"--set {text}: method settings are written method.KEY=VALUE")
        if keys[1] not in config:
            raise HarnessError(f"--set {text}: method {name!r} has no setting {keys[1]!r} "
                               f"(it has: {', '.join(sorted(config))})")
        config[keys[1]] = value
        given[keys[1]] = f"--set {text}"
    _validate({k: config[k] for k in given}, f"--set {' '.join(overrides)}")
    return given


def build(name: str, profile: str, cls: type[Method], make, overrides: list[str] = ()) -> Method:
    """`make(config)`, the method with its settings read and checked; a bad one is reported as
    the argument or config file that gave it."""
    from harness_methods.base import SettingError

    config = method_config(name, profile, cls)
    given = apply_overrides(name, config, list(overrides))
    try:
        method = make(config)
    except SettingError as exc:
        where = given.get(exc.key.split(".")[0]) or f"{config_path(name, cls)} [{profile}]"
        raise HarnessError(f"{where}: method {name}: {exc}") from None
    return method


def create(name: str, profile: str, overrides: list[str] | tuple[str, ...] = ()) -> Method:
    """A method by name; `base+modifier[+modifier...]` wraps the base in each modifier in turn.
    `overrides` are `method.KEY=VALUE` settings for the base method."""
    from harness_methods.modifier import Modifier

    base_name, *modifiers = name.split("+")
    repeated = sorted({m for m in modifiers if modifiers.count(m) > 1})
    if repeated:  # a second SAM ascent or RWP draw on top of the first is no method of any paper
        raise HarnessError(f"{name!r}: modifier {repeated[0]!r} is given twice; each modifier "
                           "wraps the method once")
    cls = method_class(base_name)
    if issubclass(cls, Modifier):
        raise HarnessError(f"{base_name!r} is a modifier; combine it with a base method, "
                           f"e.g. seqlora+{base_name}")
    method = build(base_name, profile, cls, cls, overrides)
    method.name = base_name
    for modifier in modifiers:
        mod_cls = method_class(modifier)
        if not issubclass(mod_cls, Modifier):
            raise HarnessError(f"{modifier!r} in {name!r} is not a modifier (a step-changing plugin "
                               "such as sam or rwp)")
        method = build(modifier, profile, mod_cls, lambda config, base=method: mod_cls(base, config))
    method.name = name
    return method
