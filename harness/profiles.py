"""Profiles: backbone, data scale and trainer settings, one TOML file each in `harness/profiles/`.

A profile never changes what a method is, only its scale. `--set section.key=value` overrides a
setting for one invocation (recorded in every run's config.json, so runs made with and without it
never mix). A profile file's [tracking] and [slurm] sections say how runs are watched and
scheduled, not what they train: `harness.tracking.profile_tracking` and
`harness.executor.profile_slurm` read them (`profile_section`); a `Profile` does not hold them.
"""

from __future__ import annotations

import copy
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.overrides import parse_override

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
RESULT_FREE = "train.checkpoint_every"  # a --set that changes no result, so no fingerprint


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    model: str                       # "embedded" or a local checkpoint path ("" = must be given)
    train_per_task: int | None       # None = the whole split
    test_per_task: int | None
    data_seed: int                   # fixes the sub-samples, the same for every method and seed
    batch_size: int                  # per device (per rank under DeepSpeed)
    grad_accum: int
    epochs: int
    max_grad_norm: float
    max_source_length: int
    max_target_length: int
    eval_batch_size: int
    max_new_tokens: int
    bf16: bool = False               # bf16 weights and autocast (GPU; DeepSpeed's bf16 section)
    gradient_checkpointing: bool = False
    group_by_length: bool = False    # training batches of similar length (less padding)
    padding_free: bool = False       # causal models: a step's rows packed into one, no padding
    compile: str = ""                # torch.compile backend of the training forward ("": none)
    pad_to_multiple_of: int = 0      # training batches padded to a multiple of this many tokens
                                     # (a bounded set of shapes, for compile); 0: to the longest row
    deepspeed_config: str = "zero2"  # a shipped config (zero0/zero1/zero2) or a JSON file
    # A step checkpoint every that many optimizer steps (0: only on a preemption signal); it
    # changes no result (a resumed stage is bitwise the uninterrupted one), so it is no part of a
    # run's configuration or fingerprint.
    checkpoint_every: int = 0
    lora: dict[str, Any] = field(default_factory=dict)
    embedded: dict[str, Any] = field(default_factory=dict)
    overrides: tuple[str, ...] = ()  # the --set arguments applied, for the record

    def as_dict(self) -> dict[str, Any]:
        out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()
               if k != "checkpoint_every"}
        out["overrides"] = [o for o in self.overrides if not o.startswith(f"{RESULT_FREE}=")]
        for key in ("group_by_length", "padding_free", "compile", "pad_to_multiple_of"):
            if not out[key]:  # so that runs made before the setting existed keep their fingerprint
                del out[key]
        return out


def available() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def apply_overrides(raw: dict[str, Any], overrides: list[str], where: str) -> dict[str, Any]:
    """A copy of `raw` with each `--set` applied; an unknown key is an error (a typo would
    otherwise silently change nothing)."""
    raw = copy.deepcopy(raw)
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for depth, key in enumerate(keys[:-1]):
            if not isinstance(node.get(key), dict):
                raise HarnessError(f"--set {text}: {where} has no section "
                                   f"{'.'.join(keys[:depth + 1])!r}")
            node = node[key]
        if keys[-1] not in node and keys[-1] not in _OPTIONAL.get(keys[0] if len(keys) > 1 else "", ()):
            raise HarnessError(f"--set {text}: {where} has no setting {'.'.join(keys)!r}")
        node[keys[-1]] = value
    return raw


# Settings a profile file may leave out (their defaults apply) and --set may still give.
_OPTIONAL = {
    "data": ("train_per_task", "test_per_task", "seed"),
    "train": ("grad_accum", "max_grad_norm", "max_source_length", "max_target_length", "bf16",
              "gradient_checkpointing", "group_by_length", "padding_free", "compile",
              "pad_to_multiple_of", "checkpoint_every"),
    "eval": ("batch_size", "max_new_tokens"),
    "deepspeed": ("config",),
    "embedded": ("pretrain_steps", "pretrain_batch", "pretrain_lr"),  # harness.backbone.EmbeddedSpec
}


def _read(name: str, overrides: list[str] | tuple[str, ...]) -> tuple[dict[str, Any], str]:
    """The profile file's settings with each `--set` applied, and how to name it in an error."""
    path = PROFILE_DIR / f"{name}.toml"
    if not path.exists():
        raise HarnessError(f"unknown profile {name!r}; known profiles: {', '.join(available())}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise HarnessError(f"{path}: invalid TOML: {exc}") from exc
    for section in _OPTIONAL:
        raw.setdefault(section, {})
    raw = apply_overrides(raw, list(overrides), f"profile {name!r} ({path})")
    return raw, f"{path}{' with --set ' + ' '.join(overrides) if overrides else ''}"


def profile_section(name: str, section: str, overrides: list[str] | tuple[str, ...] = ()
                    ) -> tuple[Any, str]:
    """A section of the profile file that is no part of a `Profile` ([tracking], [slurm]: how a
    run is watched or scheduled, not what it trains), for the module that reads it; {} if absent.
    Returned with how to name it in an error."""
    raw, where = _read(name, overrides)
    return raw.get(section, {}), where


def load_profile(name: str, overrides: list[str] | tuple[str, ...] = ()) -> Profile:
    raw, where = _read(name, overrides)
    train, evaluation, data = raw["train"], raw["eval"], raw["data"]
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
            bf16=train.get("bf16", False),
            gradient_checkpointing=train.get("gradient_checkpointing", False),
            group_by_length=train.get("group_by_length", False),
            padding_free=train.get("padding_free", False),
            compile=train.get("compile", ""),
            pad_to_multiple_of=train.get("pad_to_multiple_of", 0),
            checkpoint_every=train.get("checkpoint_every", 0),
            deepspeed_config=raw["deepspeed"].get("config", "zero2"),
            lora=raw.get("lora", {}), embedded=raw.get("embedded", {}),
            overrides=tuple(overrides))
    except KeyError as exc:
        raise HarnessError(f"{where}: missing setting {exc}") from exc
    _validate(profile, where)
    return profile


def _validate_compile(backend: Any, where: str) -> None:
    """`train.compile`: "" (none) or a backend torch.compile knows ("inductor", "aot_eager", ...)."""
    if not isinstance(backend, str):
        raise HarnessError(f"{where}: compile must be a torch.compile backend name or \"\" (none), "
                           f"got {backend!r}")
    if backend:
        import torch._dynamo

        if backend not in torch._dynamo.list_backends(exclude_tags=()):
            raise HarnessError(f"{where}: compile: unknown torch.compile backend {backend!r}; known: "
                               f"{', '.join(torch._dynamo.list_backends())}")


def _validate(profile: Profile, where: str) -> None:
    def positive_int(key: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise HarnessError(f"{where}: {key} must be a positive integer, got {value!r}")

    for key in ("batch_size", "grad_accum", "epochs", "eval_batch_size", "max_new_tokens",
                "max_source_length", "max_target_length"):
        positive_int(key, getattr(profile, key))
    for key, zero in (("checkpoint_every", "only on a preemption signal"),
                      ("pad_to_multiple_of", "to the longest row")):
        value = getattr(profile, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise HarnessError(f"{where}: {key} must be an integer >= 0 (0 = {zero}), got {value!r}")
    for key in ("train_per_task", "test_per_task"):
        if getattr(profile, key) is not None:
            positive_int(key, getattr(profile, key))
    if isinstance(profile.max_grad_norm, bool) or not isinstance(profile.max_grad_norm, (int, float)) \
            or profile.max_grad_norm < 0:
        raise HarnessError(f"{where}: max_grad_norm must be a number >= 0 (0 = no clipping), "
                           f"got {profile.max_grad_norm!r}")
    _validate_compile(profile.compile, where)
    for key in ("bf16", "gradient_checkpointing", "group_by_length", "padding_free"):
        if not isinstance(getattr(profile, key), bool):
            raise HarnessError(f"{where}: {key} must be true or false, got {getattr(profile, key)!r}")
    if "r" in profile.lora:
        positive_int("lora.r", profile.lora["r"])
