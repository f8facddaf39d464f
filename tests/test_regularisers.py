"""Replay, EWC and LwF: each checked by its defining property."""

import pytest
import torch
import torch.nn.functional as F

from harness_methods.lwf import distillation_term
from tests.helpers import at_second_stage, make_context, train_stage
from tests.tolerance import assert_close, magnitude, network_ops


def test_replay_memory_holds_earlier_tasks_only_with_its_quota(synthetic_dir):
    ctx, method, batcher = make_context(synthetic_dir, "replay", tasks=("agnews", "SST-2", "CB"),
                                        n_train=40, settings={"memory_per_task": 6})
    method.setup(ctx)
    for stage in range(3):
        ctx.stage = stage
        method.before_task(ctx)
        data = method.training_data(ctx)
        current = ctx.task_data.train
        extra = len(data) - len(current)
        assert extra == 6 * stage  # the quota of each earlier task, nothing of the current one
        assert set(method.memory.tasks) == {t.name for t in ctx.tasks[:stage]}
        for task, records in method.memory.tasks.items():
            own = set(ctx.data[task].train["source"])
            assert all(r["source"] in own for r in records)
            assert {r["target"] for r in records} == set(ctx.data[task].task.labels)  # every label
        method.after_task(ctx)
    memory = {k: list(v) for k, v in method.memory.tasks.items()}
    method.after_task(ctx)  # seeded: the same stage stores the same examples
    assert method.memory.tasks == memory


@pytest.mark.parametrize("settings", [{"memory_per_task": 0}, {"memory_fraction": 0.0}])
def test_replay_with_no_memory_stores_nothing(synthetic_dir, settings):
    """Zero means no memory (a share otherwise keeps at least one example of every label)."""
    ctx, method, batcher = make_context(synthetic_dir, "replay", tasks=("agnews", "SST-2"),
                                        n_train=40, settings=settings)
    method.setup(ctx)
    method.before_task(ctx)
    method.after_task(ctx)
    ctx.stage = 1
    method.before_task(ctx)
    assert method.memory.tasks == {"agnews": []}
    assert len(method.training_data(ctx)) == len(ctx.task_data.train)


def by_hand_fisher(ctx, batcher, params, n):
    """log p(y|x) from log-softmax of the logits at the gold tokens, one example at a time. Also
    the scale of its rounding, the mean over the examples of each gradient's largest square, and
    the longest sequence."""
    causal = not ctx.model.config.is_encoder_decoder
    expected = {name: torch.zeros_like(p) for name, p in params.items()}
    peak, tokens = dict.fromkeys(params, 0.0), 0
    ctx.model.eval()
    train = ctx.task_data.train
    for source, target in zip(train["source"][:n], train["target"][:n]):
        batch = batcher.train_batch([source], [target])
        tokens = max(tokens, batch["input_ids"].shape[1], batch["labels"].shape[1])
        logits, gold = ctx.model(**batch).logits[0], batch["labels"][0]
        if causal:
            logits, gold = logits[:-1], gold[1:]
        logp = F.log_softmax(logits, -1)[torch.arange(len(gold)), gold.clamp(min=0)]
        grads = torch.autograd.grad(logp[gold != -100].sum(), list(params.values()))
        for name, g in zip(params, grads):
            expected[name] += g ** 2 / n
            peak[name] += magnitude(g) ** 2 / n
    return expected, peak, tokens


def assert_fisher(fisher, ctx, batcher, params, n):
    """Equal to the by-hand Fisher up to rounding: each gradient to a forward and backward pass's
    chain of its largest entry, doubled by the square, then the mean's n terms."""
    expected, peak, tokens = by_hand_fisher(ctx, batcher, params, n)
    ops = 2 * network_ops(ctx.model.config, tokens, backward=True) + n
    for name in params:
        assert_close(fisher[name], expected[name], ops=ops, scale=peak[name])


@pytest.mark.parametrize("base", ["lora", "full"])
def test_ewc_fisher_is_mean_squared_per_example_gradient(synthetic_dir, base):
    """LoRA: per-example gradients from one batched backward (two batches of 16 and 4 here);
    full fine-tuning: one backward per example. Both equal the by-hand definition."""
    from harness_methods.ewc import linear_owners

    ctx, method, batcher = make_context(synthetic_dir, "ewc", n_train=24, settings=dict(
        fisher_samples=20, normalize_fisher=False, base=base))
    method.setup(ctx)
    train_stage(ctx, method, batcher, 0)
    assert (linear_owners(ctx.model, method.params) is None) == (base == "full")
    fisher = method.fishers[0]
    assert_fisher(fisher, ctx, batcher, method.params, 20)
    assert any(f.abs().sum() > 0 for f in fisher.values())


def test_ewc_batched_fisher_of_a_causal_model(synthetic_dir, tmp_path):
    """The batched per-example gradients take the causal shift (logits t predict token t+1)."""
    import json

    from harness.backbone import load_backbone
    from harness.textio import Batcher
    from harness_methods.base import Context
    from tests.test_causal import tiny_llama

    ctx, method, _ = make_context(synthetic_dir, "ewc", n_train=24,
                                  settings=dict(fisher_samples=20, normalize_fisher=False))
    records = json.loads((synthetic_dir / "TC" / "agnews" / "train.json").read_text())
    backbone = load_backbone(tiny_llama(tmp_path / "llama", [r["sentence"] for r in records]))
    batcher = Batcher(backbone, 512, 50)
    ctx = Context(model=backbone.model, backbone=backbone, tasks=ctx.tasks, data=ctx.data,
                  profile=ctx.profile, seed=0, batcher=batcher)
    method.setup(ctx)
    train_stage(ctx, method, batcher, 0)
    assert_fisher(method.fishers[0], ctx, batcher, method.params, 20)


def test_ewc_penalty_is_zero_at_the_anchor_and_follows_its_formula(synthetic_dir):
    ctx, method, batcher = make_context(synthetic_dir, "ewc", n_train=8, settings={"fisher_samples": 4})
    method.setup(ctx)
    train_stage(ctx, method, batcher, 0)
    ctx.stage = 1
    method.before_task(ctx)
    assert method.penalty(ctx, None, None).item() == 0.0
    name, param = next(iter(method.params.items()))
    with torch.no_grad():
        param.add_(0.01)
    half_lambda, fisher = 0.5 * method.config["lambda"], method.fishers[0][name]
    expected = half_lambda * (fisher * 0.01 ** 2).sum()
    # p - anchor is 0.01 up to the shift's rounding, eps |p|, so its square is 0.01^2 up to
    # 0.02 eps |p|; then the sum over the tensor's entries
    scale = half_lambda * (fisher * 0.01 * (0.01 + param.detach().abs())).sum()
    assert_close(method.penalty(ctx, None, None).detach(), expected, ops=2 + param.numel(),
                 scale=scale)


def test_distillation_term_formula():
    student = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]]])
    teacher = torch.tensor([[[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]]])
    mask = torch.tensor([[1.0, 0.0]])
    p_t, log_p_s = F.softmax(teacher[0, 0] / 2, -1), F.log_softmax(student[0, 0] / 2, -1)
    expected = 4 * (p_t * (p_t.log() - log_p_s)).sum()
    # two 3-term log-softmaxes, the 3-term KL sum, the mask's 2-term mean: of T^2 |log p|
    assert_close(distillation_term(student, teacher, mask, 2.0), expected, ops=3 + 3 + 3 + 2,
                 scale=4 * magnitude(log_p_s, p_t.log()))
    # the same log-softmax of the same logits on both sides: every term is exactly zero
    assert distillation_term(teacher, teacher, torch.ones(1, 2), 2.0).item() == 0.0


def test_lwf_term_zero_when_agreeing_and_teacher_never_changes(synthetic_dir):
    ctx, method, batcher = at_second_stage(synthetic_dir, "lwf")
    batch = batcher.train_batch(list(ctx.task_data.train["source"][:4]),
                                list(ctx.task_data.train["target"][:4]))
    # the teacher is a copy running the same forward on the same batch in this process: bitwise
    # equal logits, so every KL term is exactly zero
    assert method.penalty(ctx, batch, ctx.model(**batch)).item() == 0.0
    teacher = {n: p.clone() for n, p in method.teacher.state_dict().items()}
    from harness.trainer import FitSettings, fit

    fit(ctx, method, batcher, FitSettings(batch_size=8, seed=1, progress=False))
    assert all(torch.equal(teacher[n], p) for n, p in method.teacher.state_dict().items())
    assert method.penalty(ctx, batch, ctx.model(**batch)).item() > 0  # the student moved
