"""GainLoRA against the reference's formulas (liangyanshuo/gainlora, src/t5_large.py and
src/cl_trainer_gainlora_inflora.py) on fixed tensors: the gate, the pooled input, the correction
after each step, the key's start, the gated branch sum and the memories' threshold schedule."""

import torch
import torch.nn.functional as F

from harness_methods import gainlora
from harness_methods.gainlora import GATES, Gate, pooled_embeddings, project_off
from harness_methods.growth import branch_name
from harness_methods.lora import lora_layers
from tests.helpers import at_second_stage
from tests.tolerance import assert_close


def fixed_gate(d=6, hidden=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate = Gate(d, hidden)
    with torch.no_grad():
        gate.w1.weight.copy_(torch.randn(hidden, d, generator=g))
        gate.w2.weight.copy_(torch.randn(d, hidden, generator=g))
        gate.key.copy_(torch.randn(d, generator=g))
    return gate, torch.randn(3, d, generator=g)


def test_the_gate_is_the_reference_formula():
    """g = |2 sigmoid(4 cos(SiLU(W2 SiLU(W1 x)), k)) - 1|, per input: no softmax across branches,
    no bias, the absolute value (the key's sign from an SVD is arbitrary)."""
    gate, x = fixed_gate()
    W1, W2, k = gate.w1.weight.detach(), gate.w2.weight.detach(), gate.key.detach()
    f = F.silu(F.silu(x @ W1.T) @ W2.T)
    cos = (f @ k) / (f.norm(dim=1) * k.norm())
    expected = (2 * torch.sigmoid(4 * cos) - 1).abs()
    # a d-term dot product, two norms, the division and the sigmoid, on values of order one
    assert_close(gate(x).detach(), expected, ops=3 * x.shape[1] + 8)
    flipped = Gate(6, 4)
    flipped.load_state_dict(gate.state_dict())
    with torch.no_grad():
        flipped.key.neg_()
    assert_close(flipped(x).detach(), expected, ops=3 * x.shape[1] + 8)  # sign-blind


def test_the_pooled_input_divides_by_the_padded_length():
    """x = (1/L) sum_l m_l e_l: the reference divides by the batch's padded length L, not by the
    number of real tokens, so padding shrinks a short input's x."""
    embedding = torch.nn.Embedding(10, 4)
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    E = embedding.weight.detach()
    expected = torch.stack([(E[1] + E[2] + E[3]) / 4, (E[4] + E[5]) / 4])
    assert_close(pooled_embeddings(embedding, ids, mask).detach(), expected, ops=4)


def test_the_correction_after_a_step_removes_the_update_along_the_memory_and_keeps_row_norms():
    """W <- W - (W - W_0) M M^T, then each row back to its norm before the correction."""
    g = torch.Generator().manual_seed(1)
    start = torch.randn(4, 8, generator=g)
    new = start + 0.3 * torch.randn(4, 8, generator=g)
    M, _ = torch.linalg.qr(torch.randn(8, 3, generator=g))
    corrected = new - (new - start) @ M @ M.T
    expected = corrected * new.norm(dim=1, keepdim=True) / corrected.norm(dim=1, keepdim=True)
    # two 8-term products, a norm and a division per row
    assert_close(project_off(new, start, M), expected, ops=3 * 8 + 4)
    assert_close(project_off(new, start, M).norm(dim=1), new.norm(dim=1), ops=3 * 8 + 4)
    assert torch.equal(project_off(new, start, None), new)  # the first task: no memory yet


def test_second_task_gate_key_branch_sum_and_step_correction(synthetic_dir):
    """At the second task: the new gate starts as a copy of the first's MLP, its key is the top
    singular vector of (I - M2 M2^T) C3 at the norm of its uniform draw; every adapted layer adds
    g_i(x) s B_i A_i h for both branches; a step's correction keeps the update off M0."""
    ctx, method, batcher = at_second_stage(synthetic_dir, "gainlora")
    gates = getattr(ctx.model, GATES)
    old, new = gates[branch_name(0)], gates[branch_name(1)]
    assert torch.equal(new.w1.weight, old.w1.weight) and torch.equal(new.w2.weight, old.w2.weight)
    assert not any(p.requires_grad for p in old.parameters())
    assert all(p.requires_grad for p in new.parameters())

    with torch.no_grad():
        x, _, out = method._gate_features(new)
    M2 = method.gate_memory[2]
    C3 = out.T @ out / out.shape[0]
    U, _, _ = torch.linalg.svd(C3 - M2 @ (M2.T @ C3))
    key = new.key.detach()
    # |cos| of the key with the reference's vector: an SVD of a d x d matrix, to d eps each
    cos = (key @ U[:, 0]).abs() / key.norm()
    assert 1 - float(cos) < 1e-4
    assert float((M2.T @ key).norm() / key.norm()) < 1e-4  # off the old tasks' outputs

    # The gated sum in one adapted layer, for a batch of the first task's inputs.
    layer = lora_layers(ctx.model)[0]
    with torch.no_grad():
        layer.lora_B[branch_name(1)].weight.normal_()  # B_2 = 0 would hide its gate
    captured = {}
    handle = layer.register_forward_hook(lambda m, args, out: captured.update(h=args[0], y=out))
    rows = ctx.task_data.train[:4]
    with torch.no_grad():
        ctx.model(**batcher.train_batch(rows["source"], rows["target"]))
    handle.remove()
    h, y = captured["h"], captured["y"]
    expected = layer.base_layer(h)
    for i, name in enumerate(method.branches):
        delta = h @ layer.lora_A[name].weight.T @ layer.lora_B[name].weight.T * layer.scaling[name]
        expected = expected + method.gates[:, i].view(-1, 1, 1) * delta
    # a sum of d-term products and r-term products per branch, on the output's magnitude
    assert_close(y, expected, ops=4 * h.shape[-1])

    # The correction after a step: the update of W1 has no component along M0.
    with torch.no_grad():
        new.w1.weight.add_(0.1 * torch.randn_like(new.w1.weight))
    method.after_step(ctx)
    M0 = method.gate_memory[0]
    update = new.w1.weight.detach() - method.start["w1.weight"]
    unscaled = (update @ M0).norm() / update.norm()
    # Only the row rescaling moves the update back along M0 (by the rows' relative norm change).
    assert float(unscaled) < 0.5


def test_the_gate_memories_take_the_threshold_schedule(synthetic_dir, monkeypatch):
    """eps_t = gate_eps_lo + (gate_eps_hi - gate_eps_lo) t / T for all three gate memories (the
    reference: 0.995 + 0.005 t / 15), GPM without the dual switch."""
    seen = []
    real_first, real_update = gainlora.first_memory, gainlora.update_memory
    monkeypatch.setattr(gainlora, "first_memory",
                        lambda C, eps, dual: seen.append((eps, dual)) or real_first(C, eps, dual))
    monkeypatch.setattr(gainlora, "update_memory",
                        lambda M, k, C, eps, dual: seen.append((eps, dual)) or real_update(M, k, C, eps, dual))
    ctx, method, batcher = at_second_stage(synthetic_dir, "gainlora",
                                           settings={"gate_eps_lo": 0.9, "gate_eps_hi": 0.98})
    assert seen == [(0.9, False)] * 3  # the first task: t = 0
    seen.clear()
    method.after_task(ctx)
    assert seen == [(0.9 + (0.98 - 0.9) * 1 / 2, False)] * 3  # t = 1 of T = 2 tasks


def test_a_causal_gate_reads_the_prompt_positions_only():
    """A causal batch holds the answer too: the gate's input is the mean embedding of the prompt's
    positions (labels -100 and not padding), with labels given for the last columns only; in
    generation the same mean over the prompt."""
    from harness_methods.gainlora import pool_prompt

    embedding = torch.nn.Embedding(10, 4)
    ids = torch.tensor([[0, 1, 2, 7, 8], [3, 4, 5, 7, 8]])  # left-padded; 7, 8 the answer
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, 7, 8], [-100, 7, 8]])  # the last three columns, as the batcher
    E = embedding.weight.detach()
    expected = torch.stack([(E[1] + E[2]) / 2, (E[3] + E[4] + E[5]) / 3])
    assert_close(pool_prompt(embedding, ids, mask, labels, seq2seq=False).detach(), expected, ops=4)
    # generation: the prompt alone, left-padded; the same mean over its real positions
    assert_close(pool_prompt(embedding, ids[:, :3], mask[:, :3], None, seq2seq=False).detach(),
                 expected, ops=4)
