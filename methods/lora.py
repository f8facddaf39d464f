"""Shared LoRA helpers for the LoRA-based methods (built on peft's multi-adapter API)."""

from __future__ import annotations

import re

from peft import LoraConfig, PeftModel, get_peft_model

from harness.errors import HarnessError
from harness_methods.base import Context


def lora_config(ctx: Context, config: dict) -> LoraConfig:
    """The profile's LoRA shape (rank, alpha, dropout, target modules); a method's `config` may
    override any of them under the same keys prefixed `lora_`. Seq2seq backbones use `targets`,
    causal ones `causal_targets` (T5 names its projections q/v, LLaMA q_proj/v_proj). Targets are a
    list of module-name suffixes, or one regular expression matched against the full module name
    (peft's two forms; GORP adapts only self-attention, `.*SelfAttention\\.(q|v)`)."""
    spec = {**ctx.profile.lora, **{k[5:]: v for k, v in config.items() if k.startswith("lora_")}}
    key = "targets" if ctx.backbone.is_seq2seq else "causal_targets"
    if key not in spec:
        raise HarnessError(f"profile {ctx.profile.name!r}: [lora] has no {key} for this backbone")
    targets = spec[key] if isinstance(spec[key], str) else list(spec[key])
    if not matching_modules(ctx.model, targets):
        raise HarnessError(f"profile {ctx.profile.name!r}: LoRA {key} {targets} match no module "
                           f"of {ctx.backbone.path}")
    return LoraConfig(r=int(spec["r"]), lora_alpha=int(spec["alpha"]),
                      lora_dropout=float(spec["dropout"]), target_modules=targets, bias="none")


def matching_modules(model, targets: str | list[str]) -> list[str]:
    """Names of the modules `targets` selects, with peft's rule: a string is a regular expression
    the whole name must match, a list holds name suffixes."""
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(targets, str):
        return [n for n in names if re.fullmatch(targets, n)]
    return [n for n in names if n.rsplit(".", 1)[-1] in targets]


def add_branch(ctx: Context, name: str, config: dict) -> PeftModel:
    """Add a LoRA branch called `name` (A Kaiming-uniform, B zero), shaped by the profile and the
    method's `config`, and return the peft model."""
    if isinstance(ctx.model, PeftModel):
        ctx.model.add_adapter(name, lora_config(ctx, config))
    else:
        ctx.model = get_peft_model(ctx.model, lora_config(ctx, config), adapter_name=name)
    return ctx.model


def train_only(model, branch: str) -> None:
    """Make `branch` the only trainable part of the model."""
    for name, param in model.named_parameters():
        param.requires_grad_(f".{branch}." in name)


def lora_layers(model) -> list:
    """The peft LoRA layers of a model (modules holding per-branch `lora_A`/`lora_B`)."""
    return [m for _, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "lora_B")
            and len(m.lora_A) > 0]
