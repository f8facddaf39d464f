"""The clipping norm (harness.grad_norm) is the same to the bit for any split of the gradient into
tensors, and is the correctly rounded Euclidean norm; the scale is DeepSpeed's formula."""

import math

import torch

from harness import grad_norm
from harness.grad_norm import clip_, clip_scale, global_norm
from tests.tolerance import assert_close


def entries(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(3700, generator=g) * 1e-3, torch.randn(5000, generator=g),
                      torch.randn(9, generator=g) * 1e4, torch.zeros(5)])


def test_any_split_of_the_entries_gives_the_same_norm_to_the_bit():
    flat = entries()
    whole = global_norm([flat])
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        shuffled = flat[torch.randperm(flat.numel(), generator=g)]
        cuts = sorted(torch.randint(0, flat.numel(), (6,), generator=g).tolist())
        parts = [p for p in torch.tensor_split(shuffled, cuts) if p.numel()]
        assert torch.equal(global_norm(parts), whole)


def test_chunks_of_any_size_give_the_same_norm_to_the_bit(monkeypatch):
    # The entries are processed in chunks of a kept work buffer: pieces cut at a chunk's end, a
    # tensor larger than a chunk, and the buffer reused by a smaller or larger call after it.
    flat = entries()
    whole = global_norm([flat])
    parts = list(torch.tensor_split(flat, [3000, 3001, 9000]))
    chunks = grad_norm._chunks
    for size in (1000, 4096, 8713, 1 << 20):
        monkeypatch.setattr(grad_norm, "_chunks", lambda grads, size=size: chunks(grads, size))
        assert torch.equal(global_norm(parts), whole)
        assert torch.equal(global_norm(parts[:2]), global_norm([flat[:3001]]))


def test_the_norm_is_the_float32_rounding_of_the_exact_one():
    flat = entries(2)
    exact = math.sqrt(math.fsum(float(x) ** 2 for x in flat.double()))
    # entries below 2^-120 of the largest square are dropped: far below float32's half ulp
    assert float(global_norm([flat])) == float(torch.tensor(exact, dtype=torch.float32))
    assert float(global_norm([torch.zeros(3)])) == 0.0 and float(global_norm([])) == 0.0


def test_clipping_scales_to_the_maximum_norm_and_leaves_a_small_gradient_alone():
    grads = [entries(3)[:4000].clone(), entries(3)[4000:].clone()]
    before = global_norm(grads)
    assert float(clip_(grads, 1.0)) == float(before)
    # DeepSpeed's operations: 1 / max(1, (norm + 1e-6) / max_norm); the clipped norm is then 1 up
    # to the rounding of the scale and of the products (a few ulps)
    assert_close(global_norm(grads), torch.tensor(1.0), ops=4)
    small = [torch.full((4,), 0.01)]
    assert float(clip_scale(global_norm(small), 1.0)) == 1.0
    clip_(small, 1.0)
    assert torch.equal(small[0], torch.full((4,), 0.01))
