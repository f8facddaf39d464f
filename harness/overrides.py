"""The `--set KEY=VALUE` parser, shared by profiles (`train.batch_size=8`) and methods
(`method.lambda1=0.5`): a small module of its own, so that methods read it without importing
the profiles."""

from __future__ import annotations

import tomllib
from typing import Any

from harness.errors import HarnessError


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.batch_size=8' -> (['train', 'batch_size'], 8); the value is read as TOML (numbers,
    booleans, "strings", [lists]); a bare word is taken as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise HarnessError(f"--set {text!r}: expected KEY=VALUE, e.g. train.batch_size=8")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip().split("."), value
