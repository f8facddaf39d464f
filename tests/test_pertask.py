"""PerTaskFT: every task is scored by its own adapter, trained from the base model alone."""

import torch

from tests.helpers import make_context, train_stage


def layer_output(ctx, x):
    layer = next(m for n, m in ctx.model.named_modules()
                 if n.endswith("SelfAttention.q") and hasattr(m, "lora_A"))
    return layer, layer(x)


def test_each_task_uses_its_own_adapter_and_unseen_tasks_the_base(synthetic_dir):
    ctx, method, batcher = make_context(synthetic_dir, "pertask", tasks=("agnews", "yahoo", "CB"))
    method.setup(ctx)
    train_stage(ctx, method, batcher, 0)
    first = {n: p.detach().clone() for n, p in ctx.model.named_parameters() if ".task1." in n}
    ctx.model.eval()
    x = torch.randn(3, 32)
    method.select_for_eval(ctx, ctx.tasks[0])
    layer, before = layer_output(ctx, x)
    method.select_for_eval(ctx, None)
    train_stage(ctx, method, batcher, 1)
    ctx.model.eval()
    # Adapter 2 started from the base model (B = 0), not from adapter 1, and adapter 1 is unchanged.
    assert all(torch.equal(first[n], p) for n, p in ctx.model.named_parameters() if n in first)
    method.select_for_eval(ctx, ctx.tasks[0])
    assert layer.active_adapters == ["task1"]
    torch.testing.assert_close(layer_output(ctx, x)[1], before)   # task 1 scored by adapter 1 only
    method.select_for_eval(ctx, ctx.tasks[1])
    assert layer.active_adapters == ["task2"]
    expected = layer.base_layer(x) + layer.scaling["task2"] * layer.lora_B["task2"](layer.lora_A["task2"](x))
    torch.testing.assert_close(layer_output(ctx, x)[1], expected)
    method.select_for_eval(ctx, ctx.tasks[2])                      # not trained yet: base model
    torch.testing.assert_close(layer_output(ctx, x)[1], layer.base_layer(x))
    method.select_for_eval(ctx, None)                              # training view restored
    assert layer.active_adapters == ["task2"] and not layer.disable_adapters
