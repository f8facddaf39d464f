"""GORP: the projected AdamW keeps every full-rank update inside the span of its current projector,
refreshes the projector exactly every `update_proj_gap` steps, removes the memory subspace from the
gradient, and the memory grows from the first moments; in a run, LoRA sits on self-attention only,
old branches stay bitwise fixed and the cross-attention weights move."""

import pytest
import torch

from harness.trainer import FitSettings, fit
from harness_methods.gorp import (ProjectedAdamW, galore_projector, grow_memory, project, project_back,
                          remove_subspace)
from harness_methods.lora import lora_layers
from harness_methods.growth import orthogonality_term
from tests.helpers import at_second_stage, make_context, train_stage
from tests.tolerance import assert_close, assert_small, magnitude


def quadratic_steps(shape, rank, gap, steps, memory=None, seed=0):
    """Run the projected group on W with a loss whose gradient changes every step; record the
    projector and the weight before and after each step."""
    g = torch.Generator().manual_seed(seed)
    W = torch.nn.Parameter(torch.randn(*shape, generator=g))
    targets = [torch.randn(*shape, generator=g) for _ in range(steps)]
    opt = ProjectedAdamW([{"params": [W], "rank": rank, "update_proj_gap": gap, "scale": 1.0}],
                         lr=1e-2)
    opt.set_memory(W, memory)
    history = []
    for target in targets:
        W.grad = None
        ((W - target) ** 2 * torch.arange(1.0, shape[1] + 1)).sum().backward()
        grad = W.grad.clone()
        before = W.detach().clone()
        opt.step()
        history.append((grad, opt.state[W]["projector"].clone(), before, W.detach().clone()))
    return opt, W, history


@pytest.mark.parametrize("shape", [(12, 8), (6, 10)], ids=["right", "left"])
def test_every_full_rank_update_lies_in_the_span_of_its_projector(shape):
    _, _, history = quadratic_steps(shape, rank=3, gap=4, steps=9)
    for _, P, before, after in history:
        delta = after - before
        if shape[0] >= shape[1]:  # rows of P span the update's row space: dW (I - P^T P) = 0
            residual = delta @ (torch.eye(shape[1]) - P.T @ P)
        else:  # columns of P span its column space
            residual = (torch.eye(shape[0]) - P @ P.T) @ delta
        # delta = after - before carries the weights' rounding (scale |W|), and the residual
        # multiplies it by I - P^T P (a sum of one dimension's terms plus the rank's)
        assert_small(residual, ops=max(shape) + 3, scale=magnitude(before, after))
        assert delta.abs().max() > 0


def test_projector_is_recomputed_exactly_at_multiples_of_the_gap():
    _, _, history = quadratic_steps((12, 8), rank=3, gap=4, steps=10)
    for step, (grad, P, _, _) in enumerate(history):
        # bitwise: the same SVD of the same gradient in this process, or the projector kept
        if step % 4 == 0:  # a fresh SVD of this step's gradient
            assert torch.equal(P, galore_projector(grad, 3))
        else:  # kept from the last refresh
            assert torch.equal(P, history[step - step % 4][1])


def test_full_rank_projection_maps_back_to_the_gradient():
    G = torch.randn(7, 5, generator=torch.Generator().manual_seed(1))
    P = galore_projector(G, 5)  # k = n: P^T P = I
    # an SVD's vectors are orthonormal to a few eps times the dimension; two products of 5 terms
    assert_close(project_back(project(G, P), P, G.shape), G, ops=7 + 2 * 5, scale=magnitude(G))


def test_memory_is_removed_from_the_projected_gradient():
    g = torch.Generator().manual_seed(2)
    U, _ = torch.linalg.qr(torch.randn(12, 2, generator=g))  # a memory in R^m (right case)
    opt, W, history = quadratic_steps((12, 8), rank=3, gap=4, steps=3, memory=U)
    # The first moment is built only from projected, memory-free gradients, so U^T M1 = 0.
    # (The update itself is not confined: Adam's element-wise scaling mixes directions.)
    # Zero in exact arithmetic; rounded in U^T G, G - U (U^T G) and U^T M1: three sums of 12 terms
    # of the gradients' magnitude (M1 averages them).
    gradients = magnitude(*(grad for grad, _, _, _ in history))
    assert_small(U.T @ opt.state[W]["exp_avg"], ops=3 * 12, scale=gradients)
    x = torch.randn(12, 3, generator=g)
    assert_small(U.T @ remove_subspace(x, U), ops=3 * 12, scale=magnitude(x))


def test_memory_keeps_ninety_percent_of_the_energy_and_may_be_empty():
    # Singular values 3, 2, 1, 0.5: energies 9, 4, 1, 0.25 of 14.25; cumulative 0.63, 0.91, ...
    U, _ = torch.linalg.qr(torch.randn(6, 4, generator=torch.Generator().manual_seed(3)))
    moment = U @ torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5])) @ torch.eye(4, 5)
    first = grow_memory(None, moment)
    assert first.shape == (6, 1)  # only the first prefix stays below 0.9 (as the reference)
    # a singular vector is exact to eps * dimension * sigma_1 / gap (3 / (3 - 2) here), then a dot
    # product of 6 terms
    assert_close((first.T @ U[:, 0]).abs(), torch.ones(1), ops=6 * 3 + 6, scale=1.0)
    # One dominant direction holding more than 90%: no prefix stays below, so no memory at all.
    spike = U[:, :1] @ torch.ones(1, 5) * 10 + U[:, 1:2] @ torch.ones(1, 5) * 0.1
    assert grow_memory(None, spike).shape == (6, 0)
    # An existing memory is extended by the residual's directions until 90% is covered.
    grown = grow_memory(first, moment)
    assert grown.shape == (6, 2)
    # orthonormal columns from two SVDs of 6-row matrices: rounding of a few eps x 6 each
    assert_close(grown.T @ grown, torch.eye(2), ops=3 * 6, scale=1.0)
    assert grow_memory(grown, torch.randn(6, 40)).shape[1] <= 6


def test_structure_old_branches_frozen_and_cross_attention_trained(synthetic_dir):
    ctx, method, batcher = at_second_stage(synthetic_dir, "gorp")
    names = [n for n, m in ctx.model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)]
    assert names and all("SelfAttention" in n for n in names)
    assert all("EncDecAttention" in n for n in method.full_rank)
    old = {n: p.detach().clone() for n, p in ctx.model.named_parameters() if ".task1." in n}
    cross = {n: w.detach().clone() for n, w in method.full_rank.items()}
    trainable = {n for n, p in ctx.model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if ".task2." in n or "EncDecAttention" in n}
    # The memory built after task 1 reaches the optimizer of task 2.
    assert set(method.memory) == {f"lora{i}" for i in range(len(names))} | set(method.full_rank)
    fit(ctx, method, batcher, FitSettings(batch_size=8, seed=1, progress=False))
    for key, param in method._projected().items():
        if method.memory[key].shape[1]:
            assert torch.equal(method.optimizer.state[param]["memory"], method.memory[key])
    for n, p in ctx.model.named_parameters():
        if n in old:
            assert torch.equal(p, old[n]), n
    assert any(not torch.equal(w, cross[n]) for n, w in method.full_rank.items())
    deltas = method.task_deltas(ctx)
    for name, w in method.full_rank.items():  # the same subtraction of the same tensors: bitwise
        assert torch.equal(deltas[f"{name}::W"], w.detach() - method.stage_start[name])


def test_quirk_options_drop_memory_and_full_rank_updates(synthetic_dir):
    ctx, method, batcher = make_context(synthetic_dir, "gorp", settings=dict(
        memory_source="current_dir_quirk", persist_full_rank=False))
    method.setup(ctx)
    pristine = {n: w.detach().clone() for n, w in method.full_rank.items()}
    train_stage(ctx, method, batcher, 0)
    assert any(not torch.equal(w, pristine[n]) for n, w in method.full_rank.items())
    ctx.stage = 1
    method.before_task(ctx)
    for n, w in method.full_rank.items():  # reloaded as at the start, as the public code does
        assert torch.equal(w, pristine[n])
    method.make_optimizer(ctx, method.trainable_parameters(ctx))
    assert not any("memory" in s for s in method.optimizer.state.values())


def test_regulariser_terms_only_when_enabled(synthetic_dir):
    ctx, method, _ = at_second_stage(synthetic_dir, "gorp")
    assert method.penalty(ctx, {}, None) is None  # the public code's loss: the task loss only
    ctx, method, batcher = make_context(synthetic_dir, "gorp", settings=dict(
        enable_reg_terms=True, lambda1=0.5, lambda2=0.0, lambda3=0.0))
    method.setup(ctx)
    train_stage(ctx, method, batcher, 0)
    ctx.stage = 1
    method.before_task(ctx)
    pairs = [(l.lora_A["task1"].weight.detach(), l.lora_A["task2"].weight.detach())
             for l in lora_layers(ctx.model)]
    expected = 0.5 * sum((a1 @ a2.T).abs().sum() for a1, a2 in pairs)
    terms = method.penalty(ctx, {}, None)
    # d_in-term dot products, then every layer's r x r entries summed, and lambda1; of the terms'
    # magnitude, the same sum of |A1| |A2|^T
    r, d_in = pairs[0][0].shape
    magnitudes = 0.5 * sum(orthogonality_term(a1.abs(), a2.abs(), "code_l1") for a1, a2 in pairs)
    assert_close(terms["orthogonal"].detach(), expected, ops=d_in + r * r * len(pairs) + 1,
                 scale=magnitudes)
    assert terms["l2"].item() == 0.0  # lambda2 = 0
