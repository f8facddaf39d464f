"""`train.compile`: the training forward compiled by torch.compile trains what the plain forward
trains (the CPU runs the graph-capturing backend `aot_eager`, which compiles nothing to C++; the
inductor and cudagraphs backends are measured in benchmarks/)."""

import torch
from torch._dynamo.utils import counters

from harness import efficiency
from harness.efficiency import FlopMeter, batch_shape
from harness.trainer import FitSettings, LocalStep, fit
from tests.helpers import make_context
from tests.tolerance import assert_close, magnitude


def trained(synthetic_dir, backend: str):
    ctx, method, batcher = make_context(synthetic_dir, "seqlora", tasks=("agnews",), n_train=16)
    method.setup(ctx)
    method.before_task(ctx)
    start = {n: p.detach().clone() for n, p in ctx.model.named_parameters() if p.requires_grad}
    result = fit(ctx, method, batcher, FitSettings(batch_size=8, epochs=1, seed=0, progress=False,
                                                   compile_backend=backend))
    end = {n: p.detach().clone() for n, p in ctx.model.named_parameters() if p.requires_grad}
    return result, start, end, ctx


def test_a_compiled_stage_trains_the_plain_stages_weights(synthetic_dir):
    plain, start, end, ctx = trained(synthetic_dir, "")
    torch._dynamo.reset()
    counters.clear()
    compiled, start_c, end_c, ctx_c = trained(synthetic_dir, "aot_eager")
    assert counters["frames"]["ok"] >= 1  # the forward was compiled, not run as it is
    assert plain.steps == compiled.steps == 2
    assert all(torch.equal(start[n], start_c[n]) for n in start)
    # Two AdamW steps from the same start: the graph computes the same operations, possibly
    # fused or reordered; a weight's rounding is that of its gradient (a sum over the batch's
    # tokens through the model's widths) times the learning rate, on the update's magnitude.
    for name in end:
        update = end[name] - start[name]
        assert_close(end_c[name] - start_c[name], update, ops=512, scale=magnitude(update))
    assert_close(torch.tensor(compiled.mean_loss), torch.tensor(plain.mean_loss), ops=512)
    assert not hasattr(ctx_c.model, "_orig_mod")  # the model itself is not replaced


def test_a_step_counted_first_leaves_the_forward_compiled(synthetic_dir, monkeypatch):
    # The FLOP counter counts the first step of each shape under a dispatch mode, which dynamo
    # does not trace; had the compiled forward been called there first, dynamo would have marked
    # its frame to be skipped, and every later step of the run would have run uncompiled.
    monkeypatch.setattr(efficiency, "_counted", {})
    torch._dynamo.reset()
    counters.clear()
    ctx, method, batcher = make_context(synthetic_dir, "seqlora", tasks=("agnews",), n_train=8)
    method.setup(ctx)
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    stepper = LocalStep(ctx.model, torch.optim.SGD(params, lr=0.0), params, 0.0,
                        compile_backend="aot_eager")
    batch = batcher.train_batch(["a b c", "d e f g"], ["x", "y z"])
    meter = FlopMeter(("test",))
    with meter.step(batch_shape([batch])):
        stepper.forward(batch).loss.backward()
    assert meter.total > 0 and counters["frames"]["ok"] == 0
    stepper.forward(batch).loss.backward()
    assert counters["frames"]["ok"] >= 1

