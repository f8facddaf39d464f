"""MIGU against the reference's rule (wenyudu/MIGU: per layer, the weight gradient's output rows
kept where the step's summed output magnitude reaches the layer's threshold quantile; the first
task unmasked) on fixed tensors and on a step of a real model."""

import torch

from harness_methods.migu import MIGU, row_mask
from tests.helpers import at_second_stage, at_stage


def test_the_mask_keeps_the_rows_at_or_above_the_layers_quantile():
    # torch.quantile's linear interpolation: q0.7 of (1, 2, 3, 4, 5) is 3 + 0.8 * (4 - 3) = 3.8
    magnitude = torch.tensor([5.0, 1.0, 3.0, 2.0, 4.0])
    assert row_mask(magnitude, 0.7).tolist() == [True, False, False, False, True]
    assert row_mask(magnitude, 0.5).tolist() == [True, False, True, False, True]  # q0.5 = 3: >=
    assert row_mask(magnitude, 0.0).all()


def step_with_outputs(ctx, method, batcher):
    """One step's `step` hook on the first two training examples, every Linear's output kept."""
    outputs, handles = {}, []
    for name, layer in method.layers.items():
        def keep(module, inputs, output, name=name):
            outputs.setdefault(name, []).append(output.detach())
        handles.append(layer.register_forward_hook(keep))
    rows = ctx.task_data.train.to_list()[:2]
    batch = batcher.train_batch([r["source"] for r in rows], [r["target"] for r in rows])
    ctx.model.train()
    ctx.model.zero_grad(set_to_none=True)

    def closure():
        loss = ctx.model(**batch).loss
        loss.backward()
        return loss.detach()

    plain = {}
    closure()  # the unmasked gradient, for comparison
    plain = {n: m.weight.grad.clone() for n, m in method.layers.items() if m.weight.grad is not None}
    ctx.model.zero_grad(set_to_none=True)
    outputs.clear()
    method.step(ctx, closure)
    for handle in handles:
        handle.remove()
    return outputs, plain


def test_each_layers_gradient_keeps_exactly_the_rows_of_its_largest_outputs(synthetic_dir):
    ctx, method, batcher = at_second_stage(synthetic_dir, "migu", settings={"threshold": 0.6})
    outputs, plain = step_with_outputs(ctx, method, batcher)
    assert plain and set(plain) <= set(outputs)
    for name, grad in plain.items():
        # a_j = sum over batch and positions of |y_j| (the reference's sum over the whole output)
        a = sum(y.abs().reshape(-1, y.shape[-1]).sum(0) for y in outputs[name])
        keep = a >= torch.quantile(a, 0.6)
        masked = method.layers[name].weight.grad
        assert torch.equal(masked[keep], grad[keep])  # kept rows: the gradient itself
        assert not masked[~keep].any()                 # the rest: zero, whole rows
        assert 0 < int(keep.sum()) < len(keep)
    assert not method.magnitude  # reset for the next step


def test_the_first_task_trains_every_row_and_evaluation_does_not_count(synthetic_dir):
    ctx, method, batcher = at_stage(synthetic_dir, "migu", stage=0)
    _, plain = step_with_outputs(ctx, method, batcher)
    for name, grad in plain.items():
        assert torch.equal(method.layers[name].weight.grad, grad)
    ctx.model.eval()
    with torch.no_grad():
        rows = ctx.task_data.test.to_list()[:2]
        ctx.model(**batcher.train_batch([r["source"] for r in rows], [r["target"] for r in rows]))
    assert not method.magnitude


def test_rows_held_at_a_stages_first_step_do_not_move(synthetic_dir):
    """With a fresh optimizer (each stage has one), a row whose gradient is masked has no moment
    either: AdamW leaves it exactly where it was."""
    ctx, method, batcher = at_second_stage(synthetic_dir, "migu")
    params = method.trainable_parameters(ctx)
    optimizer = method.make_optimizer(ctx, params)
    before = {n: m.weight.detach().clone() for n, m in method.layers.items()}
    step_with_outputs(ctx, method, batcher)
    held = {n: ~m.weight.grad.any(dim=1) for n, m in method.layers.items()
            if m.weight.grad is not None}
    optimizer.step()
    for name, rows in held.items():
        weight = method.layers[name].weight.detach()
        assert rows.any() and torch.equal(weight[rows], before[name][rows])
        assert not torch.equal(weight[~rows], before[name][~rows])
    # about `threshold` of each layer's rows held (0.7; a layer of n rows holds ceil(0.7 (n - 1)))
    assert isinstance(method, MIGU) and abs(method.stage_metrics(ctx)["held_rows"] - 0.7) < 0.05
