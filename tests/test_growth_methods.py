"""O-LoRA and N-LoRA: loss terms equal their formulas; growth keeps earlier branches."""

import pytest
import torch

from harness.errors import HarnessError
from harness_methods.nlora import sparsity_term
from harness_methods.growth import norm_term, orthogonality_term
from harness_methods.base import penalty_terms
from harness_methods.lora import lora_layers
from tests.helpers import at_second_stage, make_context, train_stage
from tests.tolerance import assert_close, magnitude

A_OLD = torch.tensor([[1.0, 0.0, 2.0], [0.0, -1.0, 1.0]])   # (t-1)r x d_in, here 2 x 3
A_NEW = torch.tensor([[0.5, 1.0, 0.0], [1.0, 1.0, -1.0]])   # r x d_in, here 2 x 3
B_NEW = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0]])  # d_out x r, here 3 x 2
# Entries of a few bits: every product and sum of them below is exact in float32.


def at_magnitudes(formula, params):
    """A scalar `formula` of `params` and the largest entry of its gradient, at the params'
    absolute values: every term they sum made positive, the magnitudes their rounding scales."""
    positive = [p.detach().abs().requires_grad_() for p in params]
    value = formula(positive)
    grads = torch.autograd.grad(value, positive, allow_unused=True)
    return float(value.detach()), magnitude(*(g for g in grads if g is not None))


def test_olora_terms_equal_their_formulas():
    # A_old A_new^T = [[0.5, -1], [-1, -2]] by hand
    assert orthogonality_term(A_OLD, A_NEW, "code_l1").item() == 0.5 + 1 + 1 + 2
    assert orthogonality_term(A_OLD, A_NEW, "paper_fro2").item() == 0.25 + 1 + 1 + 4
    assert orthogonality_term(None, A_NEW, "code_l1").item() == 0.0  # t = 1: exactly zero
    squared_a, squared_b = 0.25 + 1 + 1 + 1 + 1, 1 + 4 + 1 + 1
    assert norm_term([A_NEW, B_NEW], "squared").item() == squared_a + squared_b
    # two square roots, their sum, and the expected's rounding to float32
    assert_close(norm_term([A_NEW, B_NEW], "code_norm"),
                 torch.tensor(squared_a ** 0.5 + squared_b ** 0.5), ops=3)


def test_nlora_terms_equal_their_formulas():
    # A_new B_new (r x r) = [[0.5, 2], [2, 1]] by hand
    assert sparsity_term(A_NEW, B_NEW, 4.0, "code_rxr").item() == 0.5 + 2 + 2 + 1
    full = (4.0 * B_NEW @ A_NEW).abs().sum().item()
    assert sparsity_term(A_NEW, B_NEW, 4.0, "paper_full").item() == full
    with pytest.raises(HarnessError, match="d_in = d_out"):
        sparsity_term(torch.ones(2, 5), torch.ones(3, 2), 1.0, "code_rxr")


@pytest.mark.parametrize("method_name", ["olora", "nlora"])
def test_growth_keeps_old_branches_and_rank_grows_by_r(synthetic_dir, method_name):
    ctx, method, batcher = make_context(synthetic_dir, method_name)
    method.setup(ctx)
    train_stage(ctx, method, batcher, 0)
    if method_name == "olora":  # at stage 1 there is no old branch: only the (zero) L2 term
        assert "orthogonal" not in penalty_terms(method.penalty(ctx, None, None))
    first = {n: p.detach().clone() for n, p in ctx.model.named_parameters() if ".task1." in n}
    train_stage(ctx, method, batcher, 1)
    after = dict(ctx.model.named_parameters())
    assert first and all(torch.equal(first[n], after[n]) for n in first)
    assert all(not after[n].requires_grad for n in first)
    layer = lora_layers(ctx.model)[0]
    r = layer.r["task1"]
    stacked = torch.cat([layer.lora_A[b].weight for b in ("task1", "task2")])
    assert stacked.shape[0] == 2 * r
    merged = sum(layer.scaling[b] * layer.lora_B[b].weight @ layer.lora_A[b].weight
                 for b in ("task1", "task2"))
    assert torch.linalg.matrix_rank(merged.detach()) == 2 * r


def test_olora_penalty_is_the_sum_over_layers(synthetic_dir):
    ctx, method, batcher = at_second_stage(synthetic_dir, "olora")
    pairs = [(layer.lora_A["task1"].weight.detach(), layer.lora_A["task2"].weight.detach())
             for layer in lora_layers(ctx.model)]
    expected = sum((a1 @ a2.T).abs().sum() for a1, a2 in pairs)
    # d_in-term dot products, then every layer's r x r entries summed, and lambda1; of the terms'
    # magnitude, the same sum of |A1| |A2|^T
    terms = sum(orthogonality_term(a1.abs(), a2.abs(), "code_l1") for a1, a2 in pairs)
    r, d_in = pairs[0][0].shape
    lambda1 = method.config["lambda1"]
    assert_close(method.penalty(ctx, None, None)["orthogonal"].detach(), lambda1 * expected,
                 ops=d_in + r * r * len(pairs) + 1, scale=lambda1 * terms)


def test_per_task_lambdas_apply_only_to_listed_orders(synthetic_dir):
    from harness_methods.growth import stage_lambdas

    ctx, _, _ = make_context(synthetic_dir, "olora", tasks=("dbpedia",))
    config = {"lambda1": 0.5, "per_task_orders": [6], "per_task": {"dbpedia": {"lambda1": 5.0}}}
    ctx.order = 1
    assert stage_lambdas(config, ctx, ("lambda1",)) == [0.5]
    ctx.order = 6
    assert stage_lambdas(config, ctx, ("lambda1",)) == [5.0]


def test_olora_training_reduces_the_overlap(synthetic_dir):
    """Same data, seed and steps: with lambda1 > 0 the new branch ends more orthogonal to the old
    one than with lambda1 = 0 (IncLoRA), and less overlapping than it started."""
    from harness.trainer import FitSettings, fit

    def overlaps(lambda1):
        ctx, method, batcher = make_context(synthetic_dir, "olora", settings={"lambda1": lambda1})
        method.setup(ctx)
        train_stage(ctx, method, batcher, 0)
        ctx.stage = 1
        method.before_task(ctx)

        def overlap():
            return sum(orthogonality_term(a_old, a.detach(), "code_l1").item()
                       for a_old, a, _ in method.pairs)

        start = overlap()
        fit(ctx, method, batcher, FitSettings(batch_size=8, seed=1, progress=False))
        return start, overlap()

    start, with_term = overlaps(0.5)
    start0, without = overlaps(0.0)
    assert start == start0  # the same seeds, data and arithmetic in one process: bitwise equal
    assert with_term < start and with_term < without


@pytest.mark.parametrize("form", ["code_rxr", "paper_full"])
def test_batched_sparsity_equals_the_sum_of_per_branch_terms(form):
    """The stacked computation N-LoRA uses per micro-batch: same value and same gradients as the
    per-branch sum, with branches of two shapes and two scalings mixed."""
    from harness_methods.nlora import batched_sparsity

    g = torch.Generator().manual_seed(0)
    shapes = [((4, 6), (6, 4), 2.0), ((4, 6), (6, 4), 2.0), ((2, 3), (3, 2), 0.5), ((4, 6), (6, 4), 1.0)]
    branches = [(torch.randn(*sa, generator=g, requires_grad=True),
                 torch.randn(*sb, generator=g, requires_grad=True), s) for sa, sb, s in shapes]
    params = [t for a, b, _ in branches for t in (a, b)]

    def per_branch(p):
        return sum(sparsity_term(a, b, s, form) for a, b, (_, _, s) in zip(p[::2], p[1::2], shapes))

    one_by_one, stacked = per_branch(params), batched_sparsity(branches, form)
    terms, grad_terms = at_magnitudes(per_branch, params)
    # products of at most 6 terms, then the 4 x 36 entries at most summed and scaled
    assert_close(stacked.detach(), one_by_one.detach(), ops=6 + 4 * 36 + 2, scale=terms)
    # each gradient entry: a sum of at most 6 signed terms of the other factor, scaled
    for x, y in zip(torch.autograd.grad(one_by_one, params), torch.autograd.grad(stacked, params)):
        assert_close(y, x, ops=6 + 2, scale=grad_terms)


@pytest.mark.parametrize("orth_form,l2_form", [("code_l1", "code_norm"), ("paper_fro2", "squared")])
def test_olora_batched_penalty_equals_the_per_layer_formula(orth_form, l2_form):
    """Same value and gradients as lambda1 * sum_l orthogonality_term + lambda2 * norm_term, with
    layers of two shapes, and with no old branch (the first stage: the L2 term only)."""
    from harness_methods.olora import batched_penalty

    g = torch.Generator().manual_seed(0)

    def layer(d_in, d_out, old_rows):
        a = torch.randn(4, d_in, generator=g).requires_grad_()
        b = torch.randn(d_out, 4, generator=g).requires_grad_()
        return (torch.randn(old_rows, d_in, generator=g) if old_rows else None), a, b

    for old_rows in (8, 0):
        pairs = [layer(6, 6, old_rows), layer(6, 6, old_rows), layer(6, 10, old_rows)]
        params = [p for _, a, b in pairs for p in (a, b)]
        olds = [a_old for a_old, _, _ in pairs]

        def per_layer(olds, p):
            want = {"l2": 0.1 * norm_term(p, l2_form)}
            if old_rows:
                want["orthogonal"] = 0.5 * sum(orthogonality_term(a_old, a, orth_form)
                                               for a_old, a in zip(olds, p[::2]))
            return want

        got, want = batched_penalty(pairs, 0.5, 0.1, orth_form, l2_form), per_layer(olds, params)
        assert got.keys() == want.keys()
        magnitudes = [a_old.abs() if old_rows else None for a_old in olds]
        # dot products of 6 terms (doubled by a square), then at most one term per entry summed
        # (160 squares, or 3 x 8 x 4 overlaps), a square root, the lambdas
        ops = 2 * 6 + sum(p.numel() for p in params) + 3
        for name in want:
            terms, _ = at_magnitudes(lambda p: per_layer(magnitudes, p)[name], params)
            assert_close(got[name].detach(), want[name].detach(), ops=ops, scale=terms)
        # a gradient entry: 8 overlaps (of 6 terms) times the other factor, or an entry over its
        # tensor's norm (a sum of its entries), the lambdas
        _, grad_terms = at_magnitudes(lambda p: sum(per_layer(magnitudes, p).values()), params)
        for x, y in zip(torch.autograd.grad(sum(got.values()), params),
                        torch.autograd.grad(sum(want.values()), params)):
            assert_close(x, y, ops=2 * 6 + max(p.numel() for p in params) + 3, scale=grad_terms)
