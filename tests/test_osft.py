"""OSFT against the reference's formulas (mini_trainer's osft_utils: factorised weights, gradients
projected off the high subspace before the step, factors projected after it) on fixed tensors,
and the protected share's schedule over the stages."""

import torch

from harness_methods.osft import OSFT, Factors
from tests.helpers import at_second_stage
from tests.tolerance import assert_close, assert_small


def fixed(m=12, n=8, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g)
    return W, Factors(W, k), torch.randn(m, n, generator=g)


def test_the_factors_start_at_the_weight_with_the_top_k_triplets_fixed():
    W, f, _ = fixed()
    assert f.U_h.shape == (12, 3) and f.V_h.shape == (3, 8) and f.S_l.shape == (5,)
    assert not f.U_h.requires_grad and f.U_l.requires_grad
    # a thin SVD reproduces W to an SVD's rounding: a few n-term sums, on |W|
    assert_close(f.weight().detach(), W, ops=4 * 8)
    assert torch.all(f.S_h.min() >= f.S_l.max())  # the high part holds the largest values


def test_the_factor_gradients_are_the_chain_rule_projected_off_the_high_subspace():
    """dU = G V_l^T diag(S_l), dS = diag(U_l^T G V_l^T), dV = diag(S_l) U_l^T G (autograd's), then
    dU <- (I - U_h U_h^T) dU and dV <- dV (I - V_h^T V_h); dS as it is."""
    W, f, G = fixed()
    (f.weight() * G).sum().backward()  # autograd: the factors' gradients for dL/dW = G
    auto = [p.grad.clone() for p in f.params()]
    f.take_gradient(G)
    P_U = torch.eye(12) - f.U_h @ f.U_h.T
    P_V = torch.eye(8) - f.V_h.T @ f.V_h
    # two m- or n-term products each, on the gradients' magnitude
    assert_close(f.U_l.grad, P_U @ auto[0], ops=4 * 12)
    assert_close(f.S_l.grad, auto[1], ops=4 * 12)
    assert_close(f.V_l.grad, auto[2] @ P_V, ops=4 * 12)
    assert_small(f.U_h.T @ f.U_l.grad, ops=4 * 12, scale=float(f.U_l.grad.abs().max()))


def test_after_a_step_the_update_leaves_the_high_singular_triplets_as_they_were():
    """An AdamW step on the factors, then the projection: U_h^T dW = 0 and dW V_h^T = 0, so
    U_h^T W V_h^T is still diag(S_h)."""
    W, f, G = fixed()
    f.take_gradient(G)
    optimizer = torch.optim.AdamW(f.params(), lr=0.05)
    optimizer.step()  # element-wise scaling: the update leaves the allowed subspace
    moved = (f.U_h.T @ (f.weight().detach() - W)).abs().max()
    f.project()
    dW = f.weight().detach() - W
    scale = float(W.abs().max())
    assert float(moved) > 1e3 * 4 * 12 * torch.finfo(torch.float32).eps * scale  # it did leave
    assert_small(f.U_h.T @ dW, ops=6 * 12, scale=scale)
    assert_small(dW @ f.V_h.T, ops=6 * 12, scale=scale)


def test_a_fused_adamw_step_moves_each_factor_entry_by_its_own_gradient():
    """The harness's AdamW is fused (one kernel over memory) when the parameters are row-major;
    the factors' gradients are written as new row-major tensors, so the factors are row-major too
    (LAPACK's U and Vt are column-major), and a fused step, pairing entries by memory order, moves
    each entry by its own gradient with no copy."""
    _, fused, G = fixed()
    _, plain, _ = fixed()
    assert all(p.is_contiguous() for p in fused.params())
    for f, kind in ((fused, True), (plain, False)):
        f.take_gradient(G)
        torch.optim.AdamW(f.params(), lr=0.05, fused=kind).step()
    for a, b in zip(fused.params(), plain.params()):
        # one AdamW update: a handful of element-wise operations on each entry
        assert_close(a.detach(), b.detach(), ops=8)


def test_the_protected_share_grows_from_nothing_to_max_fraction(synthetic_dir):
    """k = floor(f_t min(m, n)) with f_t = max_fraction t / (T - 1): the first task is plain full
    fine-tuning, the last protects max_fraction of every targeted matrix."""
    method = OSFT({"lr": 1e-3, "max_fraction": 0.9, "targets": ".*q", "causal_targets": ".*q"})
    assert [method.protected_fraction(t, 4) for t in range(4)] == [0.9 * t / 3 for t in range(4)]
    ctx, method, batcher = at_second_stage(synthetic_dir, "osft",
                                           settings={"max_fraction": 0.5})
    for name, linear in method.linears.items():
        k = method.factors[name].U_h.shape[1]
        assert k == int(0.5 * 1 / 1 * min(linear.weight.shape))  # T = 2: the last task
    assert {n.rsplit(".", 1)[-1] for n in method.linears} <= {"q", "k", "v", "o", "wi", "wo"}


def test_the_cost_benchmark_counts_memory_and_times_both_steps(tmp_path):
    """benchmarks/osft_cost.py at a tiny shape: OSFT's bytes beside the weight, by the count of
    its tensors, and both steps timed."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "osft.md"
    subprocess.run([sys.executable, str(root / "benchmarks" / "osft_cost.py"), "--models", "tiny",
                    "--repeats", "1", "--out", str(out)], check=True, capture_output=True)
    sys.path.insert(0, str(root))
    from benchmarks.osft_cost import memory

    # 64 x 32, k = 16: full FT 4 m n; OSFT U S V (64x32 + 32 + 32x32), 3x the low half
    # (64x16 + 16 + 16x32), W's gradient and the starting copy
    assert memory(64, 32, 16) == (4 * 4 * 64 * 32,
                                  4 * (64 * 32 + 32 + 32 * 32 + 3 * (64 * 16 + 16 + 16 * 32)
                                       + 2 * 64 * 32))
    assert "| tiny | 64x32 x 2 |" in out.read_text()
