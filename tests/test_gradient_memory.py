"""A-GEM and OGD, each checked by its defining property against the reference's formula.

A plausible mistake each check catches (each was tried once and failed the test): A-GEM projecting
per tensor instead of over the flattened gradient, projecting a gradient that agrees with the
reference one, or drawing its memory batch from the current task; OGD reading a causal model's
logits unshifted or at padded positions, keeping later tasks' directions ahead of earlier ones,
normalising a dependent gradient from noise, or leaving the update with momentum.
"""

from functools import partial

import torch

from harness.trainer import FitSettings, LocalStep, _closure, _micro_batches
from harness_methods.agem import agem_project
from harness_methods.ogd import orthonormal_basis, output_function, project_out
from tests.helpers import at_second_stage, make_context, train_stage
from tests.tolerance import assert_close, assert_small, bound, magnitude


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


# -- A-GEM ------------------------------------------------------------------------------------------
def test_agem_projects_the_flattened_gradient_only_when_it_conflicts():
    # Two tensors: the first agrees with the reference (+2), the second conflicts (-8): the flat
    # product is -6 < 0, so the whole vector is projected, the agreeing part included.
    g = [torch.tensor([1.0, 1.0]), torch.tensor([[2.0, -2.0]])]
    r = [torch.tensor([1.0, 1.0]), torch.tensor([[-2.0, 2.0]])]
    dot, norm2 = -6.0, 10.0
    expected = flat(g) - dot / norm2 * flat(r)  # the reference's g - (g.r / r.r) r
    projected = agem_project(g, r)
    assert [p.shape for p in projected] == [t.shape for t in g]
    # Each entry is two roundings (the scale, the product-difference) of inputs of magnitude 2.
    assert_close(flat(projected), expected, ops=3, scale=magnitude(flat(g)))
    assert_small(torch.dot(flat(projected).double(), flat(r).double()), ops=8, scale=4.0 * 2.0 * 4)
    # A gradient that agrees, or whose product is exactly zero, is kept as it is.
    agree = [torch.tensor([1.0, 0.5]), torch.tensor([[0.25, 0.0]])]
    assert agem_project(agree, r) is agree
    orthogonal = [torch.tensor([1.0, -1.0]), torch.tensor([[1.0, 1.0]])]  # dyadic: product exactly 0
    assert agem_project(orthogonal, r) is orthogonal


def test_agem_step_takes_the_reference_gradient_on_earlier_tasks_memory(synthetic_dir):
    ctx, method, batcher = at_second_stage(synthetic_dir, "agem",
                                           settings={"memory_per_task": 6, "memory_batch": 4})
    ctx.model.eval()  # no dropout: the passes below are repeated exactly
    params = method.trainable_parameters(ctx)
    settings = FitSettings(batch_size=8, progress=False)
    stepper = LocalStep(ctx.model, method.make_optimizer(ctx, params), params, 0.0)
    # The memory holds the first task's examples only, and the draw reads nothing else.
    stored = method.memory.earlier(ctx)
    assert {r["source"] for r in stored} <= set(ctx.data["agnews"].train["source"])
    state = method.generator.get_state()
    drawn = method.memory_batch_of(stored)
    assert len(drawn) == 4 and set(drawn) <= {(r["source"], r["target"]) for r in stored}
    train = ctx.task_data.train
    rows = train.select(range(8)).to_list()
    closure = _closure(ctx, method, stepper, _micro_batches(batcher, rows, settings), None,
                       partial(_micro_batches, batcher, s=settings))

    def grads_of(examples=None):
        for p in params:
            p.grad = None
        closure(examples)
        return [p.grad.clone() for p in params]

    g, ref = grads_of(), grads_of(drawn)
    dot = torch.dot(flat(g).double(), flat(ref).double())
    expected = flat(g) - (dot / torch.dot(flat(ref).double(), flat(ref).double())).float() * flat(ref) \
        if dot < 0 else flat(g)
    method.generator.set_state(state)
    for p in params:
        p.grad = None
    method.step(ctx, closure)
    found = flat([p.grad for p in params])
    # A dot product over every entry, then one scale and difference per entry.
    assert_close(found, expected, ops=flat(g).numel() + 3, scale=magnitude(flat(g)) + magnitude(flat(ref)))
    assert torch.dot(found.double(), flat(ref).double()) >= -bound(
        flat(g).norm() * flat(ref).norm(), ops=flat(g).numel() + 3)  # never against the memory


def test_agem_step_projects_a_conflicting_step_gradient_on_the_memory_batch(synthetic_dir):
    """The conflict branch, with fixed gradients in place of the passes: the closure leaves g for
    the step's batch and g_ref for the examples it is given, which must be the memory batch."""
    ctx, method, _ = at_second_stage(synthetic_dir, "agem",
                                     settings={"memory_per_task": 6, "memory_batch": 4})
    params = method.trainable_parameters(ctx)
    generator = torch.Generator().manual_seed(1)
    g = [torch.randn(p.shape, generator=generator) for p in params]
    ref = [-t + 0.1 * torch.randn(t.shape, generator=generator) for t in g]  # g . g_ref < 0
    given = []

    def closure(examples=None):
        given.append(examples)
        for p, value in zip(params, g if examples is None else ref):
            p.grad = value.clone()
        return torch.tensor(1.0)

    state = method.generator.get_state()
    drawn = method.memory_batch_of(method.memory.earlier(ctx))
    method.generator.set_state(state)
    method.step(ctx, closure)
    assert given == [None, drawn]
    dot = torch.dot(flat(g).double(), flat(ref).double())
    expected = flat(g) - (dot / torch.dot(flat(ref).double(), flat(ref).double())).float() * flat(ref)
    n = flat(g).numel()
    assert_close(flat([p.grad for p in params]), expected, ops=n + 3, scale=magnitude(flat(g), flat(ref)))


# -- OGD ----------------------------------------------------------------------------------------
def test_ogd_output_function_reads_the_gold_logits_at_target_positions():
    logits = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    labels = torch.tensor([[2, -100, 1], [0, 3, -100]])
    # seq2seq: position t's logits score label t; padded positions (-100) are left out.
    assert output_function(logits, labels, "gtl", causal=False) == 2 + 9 + 12 + 19
    assert output_function(logits, labels, "avg", causal=False) == 1.5 + 9.5 + 13.5 + 17.5
    # causal: position t's logits score the token at t + 1 (label 1 at t=2 read at t=1; 3 at t=1 at t=0).
    assert output_function(logits, labels, "gtl", causal=True) == 5 + 15


def test_ogd_basis_keeps_order_drops_dependent_columns_and_projects_them_out():
    generator = torch.Generator().manual_seed(0)
    a, b, c, d = torch.randn(4, 50, 1, generator=generator)
    # The 3rd column depends on the first two (a duplicated or summed gradient), the 5th is zero.
    columns = torch.cat([a, b, a + b, c, torch.zeros_like(a), d], 1)
    basis, kept = orthonormal_basis(columns)
    assert kept.tolist() == [True, True, False, True, False, True]
    # Orthonormal, and built in order: its first k columns span the first k kept, and every
    # column, the ones after a dropped one included, lies in the span.
    assert_close(basis.T @ basis, torch.eye(4), ops=2 * 50, scale=1.0)
    independent = columns[:, kept]
    for k in range(1, 5):
        residual = independent[:, :k] - basis[:, :k] @ (basis[:, :k].T @ independent[:, :k])
        assert_small(residual, ops=4 * 50, scale=magnitude(columns))
    assert_small(columns - basis @ (basis.T @ columns), ops=4 * 50, scale=magnitude(columns))
    g = torch.randn(50, generator=generator)
    projected = project_out(g, basis)
    assert_small(columns.T @ projected, ops=4 * 50, scale=magnitude(columns) * magnitude(g) * 50)
    assert_close(projected, g - basis @ (basis.T @ g), ops=1, scale=magnitude(g))


def test_ogd_stores_split_memory_and_steps_orthogonally_with_sgd(synthetic_dir):
    ctx, method, batcher = at_second_stage(synthetic_dir, "ogd", settings={"memory_size": 6})
    first = method.directions["agnews"]
    assert first.shape[1] == 6  # memory_size // 1 task seen
    optimizer = method.make_optimizer(ctx, method.trainable_parameters(ctx))
    assert type(optimizer) is torch.optim.SGD and optimizer.defaults["momentum"] == 0
    # A step: the gradient less its components along the basis.
    ctx.model.eval()
    params = method.params
    stepper = LocalStep(ctx.model, optimizer, params, 0.0)
    settings = FitSettings(batch_size=8, progress=False)
    train = ctx.task_data.train
    micro = _micro_batches(batcher, train.select(range(8)).to_list(), settings)
    closure = _closure(ctx, method, stepper, micro, None, partial(_micro_batches, batcher, s=settings))
    closure()
    g = flat([p.grad for p in params]).clone()
    for p in params:
        p.grad = None
    method.step(ctx, closure)
    found = flat([p.grad for p in params])
    n = first.shape[0]
    assert_close(found, g - first @ (first.T @ g), ops=2 * n, scale=magnitude(g))
    assert_small(first.T @ found, ops=4 * n, scale=magnitude(g) * n)
    # After the second task: 3 directions each, the first task's its first 3 (orthonormal, so the
    # new basis keeps them up to sign), earlier task first.
    ctx.model.train()
    train_stage(ctx, method, batcher, 1)
    assert list(method.directions) == ["agnews", "yahoo"]
    assert [d.shape[1] for d in method.directions.values()] == [3, 3]
    kept = method.directions["agnews"]
    assert_close((kept * first[:, :3]).sum(0).abs(), torch.ones(3), ops=2 * n, scale=1.0)
    assert_close(method.basis.T @ method.basis, torch.eye(6), ops=2 * n, scale=1.0)


def test_ogd_refuses_a_memory_smaller_than_the_sequence(synthetic_dir):
    """Each task keeps memory_size // tasks-seen directions: fewer than one per task is refused
    before the run starts, with the setting named."""
    import pytest

    from harness_methods.base import SettingError

    ctx, method, _ = make_context(synthetic_dir, "ogd", tasks=("agnews", "yahoo", "SST-2"),
                                  settings={"memory_size": 2})
    with pytest.raises(SettingError, match="memory_size must be at least the number of tasks"):
        method.check(ctx)
