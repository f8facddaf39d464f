"""L2Anchor: its defining property (the penalty is zero at the anchor and equals its formula), and
the plugin contract every method keeps (`harness check-method l2anchor`, DeepSpeed aside)."""

import torch

from harness.testing import at_second_stage


def test_l2anchor_penalty_zero_at_anchor_and_equal_to_formula(synthetic_dir):
    ctx, method, batcher = at_second_stage(synthetic_dir, "l2anchor")
    assert method.penalty(ctx, None, None).item() == 0.0
    name, param = next(iter(method.params.items()))
    shift = 0.1
    with torch.no_grad():
        moved = (param + shift) - param  # the shift as float32 gives it back, per entry
        param.add_(shift)
    expected = 0.5 * method.config["lambda"] * (moved.double() ** 2).sum().item()
    # Float32 rounding: a square and a sum over every entry of every tensor of the penalty.
    entries = sum(p.numel() for p in method.params.values())
    rtol = 4 * (entries + 2) * torch.finfo(torch.float32).eps
    torch.testing.assert_close(method.penalty(ctx, None, None).item(), expected, rtol=rtol, atol=0)


def test_l2anchor_keeps_the_plugin_contract(method_contract):
    method_contract("l2anchor")
