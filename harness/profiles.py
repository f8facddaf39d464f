"""Profiles: backbone, data scale and trainer settings, one TOML file each in `harness/profiles/`.

A profile never changes what a method is, only its scale.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import HarnessError

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    model: str                       # "embedded" or a local checkpoint path ("" = must be given)
    train_per_task: int | None       # None = the whole split
    test_per_task: int | None
    data_seed: int                   # fixes the sub-samples, the same for every method and seed
    batch_size: int
    grad_accum: int
    epochs: int
    max_grad_norm: float
    max_source_length: int
    max_target_length: int
    eval_batch_size: int
    max_new_tokens: int
    lora: dict[str, Any] = field(default_factory=dict)
    embedded: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def available() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def load_profile(name: str) -> Profile:
    path = PROFILE_DIR / f"{name}.toml"
    if not path.exists():
        raise HarnessError(f"unknown profile {name!r}; known profiles: {', '.join(available())}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise HarnessError(f"{path}: invalid TOML: {exc}") from exc
    train, evaluation, data = raw.get("train", {}), raw.get("eval", {}), raw.get("data", {})
    try:
        profile = Profile(
            name=name, description=raw.get("description", ""), model=raw.get("model", ""),
            train_per_task=data.get("train_per_task"), test_per_task=data.get("test_per_task"),
            data_seed=data.get("seed", 0),
            batch_size=train["batch_size"], grad_accum=train.get("grad_accum", 1),
            epochs=train["epochs"], max_grad_norm=train.get("max_grad_norm", 1.0),
            max_source_length=train.get("max_source_length", 512),
            max_target_length=train.get("max_target_length", 50),
            eval_batch_size=evaluation.get("batch_size", 64),
            max_new_tokens=evaluation.get("max_new_tokens", 50),
            lora=raw.get("lora", {}), embedded=raw.get("embedded", {}))
    except KeyError as exc:
        raise HarnessError(f"{path}: missing setting {exc}") from exc
    for key in ("batch_size", "grad_accum", "epochs", "eval_batch_size", "max_new_tokens"):
        if int(getattr(profile, key)) < 1:
            raise HarnessError(f"{path}: {key} must be a positive integer")
    return profile
