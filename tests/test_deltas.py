"""The `task_deltas` hook of every method returns the stage's weight change of each adapted layer:
rebuilt from its factors (or dense part), it equals the change of the effective weight the model
computes with, measured around the training of stage 2."""

import pytest
import torch

from harness.trainer import FitSettings, fit
from tests.helpers import at_second_stage


def effective_weights(model, names):
    """The weight each named module applies: its base weight plus every active LoRA branch."""
    out = {}
    for name in names:
        module = model.get_submodule(name)
        if hasattr(module, "lora_A"):
            weight = module.get_base_layer().weight.detach().clone()
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    weight += module.get_delta_weight(adapter).detach()
        else:
            weight = module.weight.detach().clone()
        out[name] = weight
    return out


def dense(deltas):
    modules = sorted({k.rsplit("::", 1)[0] for k in deltas})
    return {m: deltas[f"{m}::W"] if f"{m}::W" in deltas else deltas[f"{m}::B"] @ deltas[f"{m}::A"]
            for m in modules}


@pytest.mark.parametrize("method_name", ["seqft", "seqlora", "inclora", "olora", "nlora", "inflora",
                                         "gorp", "ewc", "replay", "lwf", "pertask"])
def test_task_deltas_equal_the_stage_change_of_the_effective_weights(synthetic_dir, method_name):
    ctx, method, batcher = at_second_stage(synthetic_dir, method_name)
    probe = dense(method.task_deltas(ctx))  # before training: no change yet
    assert probe and all(float(d.abs().max()) <= 1e-6 for d in probe.values()), method_name
    before = effective_weights(ctx.model, probe)
    fit(ctx, method, batcher, FitSettings(batch_size=8, seed=1, progress=False))
    method.after_task(ctx)
    deltas = dense(method.task_deltas(ctx))
    after = effective_weights(ctx.model, deltas)
    assert any(float(d.abs().max()) > 0 for d in deltas.values())
    for name, delta in deltas.items():
        torch.testing.assert_close(delta, after[name] - before[name], atol=1e-5, rtol=1e-4)
