"""Defining properties of seqft, seqlora and inclora."""

import torch

from tests.helpers import assert_lora_output, make_context, train_stage


def snapshot(model, predicate=lambda name: True):
    return {n: p.detach().clone() for n, p in model.named_parameters() if predicate(n)}


def test_seqft_changes_the_backbone_but_not_the_embedding(synthetic_dir):
    ctx, method, batcher = make_context(synthetic_dir, "seqft")
    method.setup(ctx)
    before = snapshot(ctx.model)
    train_stage(ctx, method, batcher, 0)
    after = snapshot(ctx.model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert any("SelfAttention.q" in n for n in changed)
    assert any("DenseReluDense" in n for n in changed)
    assert "shared.weight" not in changed


def test_seqlora_leaves_the_backbone_bitwise_unchanged(synthetic_dir):
    ctx, method, batcher = make_context(synthetic_dir, "seqlora")
    method.setup(ctx)
    base = snapshot(ctx.model, lambda n: "lora_" not in n)
    lora = snapshot(ctx.model, lambda n: "lora_B" in n)
    for stage in range(2):
        train_stage(ctx, method, batcher, stage)
    after = snapshot(ctx.model)
    assert all(torch.equal(base[n], after[n]) for n in base)
    assert any(not torch.equal(lora[n], after[n]) for n in lora)  # the adapter did train


def test_inclora_keeps_earlier_branches_bitwise_and_sums_branches(synthetic_dir):
    ctx, method, batcher = make_context(synthetic_dir, "inclora")
    method.setup(ctx)
    train_stage(ctx, method, batcher, 0)
    first = snapshot(ctx.model, lambda n: ".task1." in n)
    backbone = snapshot(ctx.model, lambda n: "lora_" not in n)
    assert any(not torch.equal(v, torch.zeros_like(v)) for n, v in first.items() if "lora_B" in n)
    train_stage(ctx, method, batcher, 1)
    after = snapshot(ctx.model)
    assert first and all(torch.equal(first[n], after[n]) for n in first)
    assert all(torch.equal(backbone[n], after[n]) for n in backbone)
    assert any(not torch.equal(after[n.replace(".task1.", ".task2.")],
                               torch.zeros_like(after[n.replace(".task1.", ".task2.")]))
               for n in first if "lora_B" in n)
    # Inference uses every branch: the layer output is W0 x + sum of each branch's s B A x.
    layer = next(m for n, m in ctx.model.named_modules() if n.endswith("SelfAttention.q")
                 and hasattr(m, "lora_A"))
    assert sorted(layer.active_adapters) == ["task1", "task2"]
    layer.eval()
    x = torch.randn(3, layer.in_features)
    assert_lora_output(layer, x, ("task1", "task2"))
