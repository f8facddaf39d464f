"""Shared LoRA helpers for the LoRA-based methods (built on peft's multi-adapter API)."""

from __future__ import annotations

from peft import LoraConfig, PeftModel, get_peft_model

from methods.base import Context


def lora_config(ctx: Context) -> LoraConfig:
    """The profile's LoRA shape (rank, alpha, dropout, target modules); a method's config may
    override any of them under the same keys prefixed `lora_`."""
    spec = {**ctx.profile.lora, **{k[5:]: v for k, v in ctx.config.items() if k.startswith("lora_")}}
    return LoraConfig(r=int(spec["r"]), lora_alpha=int(spec["alpha"]),
                      lora_dropout=float(spec["dropout"]), target_modules=list(spec["targets"]),
                      bias="none")


def add_branch(ctx: Context, name: str) -> PeftModel:
    """Add a LoRA branch called `name` (A Kaiming-uniform, B zero) and return the peft model."""
    if isinstance(ctx.model, PeftModel):
        ctx.model.add_adapter(name, lora_config(ctx))
    else:
        ctx.model = get_peft_model(ctx.model, lora_config(ctx), adapter_name=name)
    return ctx.model
