"""The `task_deltas` hook of every method returns the stage's weight change of each adapted layer:
rebuilt from its factors (or dense part), it equals the change of the effective weight the model
computes with, measured around the training of stage 2."""

import pytest
import torch

from harness.trainer import FitSettings, fit
from tests.helpers import at_second_stage
from tests.tolerance import assert_close, assert_small, magnitude


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


def dense(deltas, absolute=False):
    """Each module's dW, B A or its dense part; `absolute`: of the entries' absolute values, the
    magnitude of the terms the product sums."""
    f = torch.abs if absolute else torch.clone
    modules = sorted({k.rsplit("::", 1)[0] for k in deltas})
    return {m: f(deltas[f"{m}::W"]) if f"{m}::W" in deltas
            else f(deltas[f"{m}::B"]) @ f(deltas[f"{m}::A"]) for m in modules}


def rank(deltas):
    """The length of the factors' products (1 for dense deltas)."""
    return max([d.shape[0] for k, d in deltas.items() if k.endswith("::A")], default=1)


@pytest.mark.parametrize("method_name", ["seqft", "seqlora", "inclora", "olora", "nlora", "inflora",
                                         "gorp", "ewc", "replay", "lwf", "pertask"])
def test_task_deltas_equal_the_stage_change_of_the_effective_weights(synthetic_dir, method_name):
    ctx, method, batcher = at_second_stage(synthetic_dir, method_name)
    raw = method.task_deltas(ctx)  # before training: no change yet
    probe, terms = dense(raw), dense(raw, absolute=True)
    assert probe, method_name
    for name, d in probe.items():  # B = 0, W - W, or s (B A - B A) rounded in one product
        assert_small(d, ops=rank(raw), scale=magnitude(terms[name]))
    before = effective_weights(ctx.model, probe)
    fit(ctx, method, batcher, FitSettings(batch_size=8, seed=1, progress=False))
    method.after_task(ctx)
    raw = method.task_deltas(ctx)
    deltas, terms = dense(raw), dense(raw, absolute=True)
    after = effective_weights(ctx.model, deltas)
    assert any(float(d.abs().max()) > 0 for d in deltas.values())
    for name, delta in deltas.items():
        # the delta's product; each effective weight adds up to two branches' B A (products as
        # long) to the base, and the change subtracts the two: of the weights' and terms' magnitude
        assert_close(delta, after[name] - before[name], ops=3 * rank(raw) + 6,
                     scale=magnitude(before[name], after[name], terms[name]))
