"""The batches of an epoch (harness.trainer.epoch_steps): plain slices of the shuffle, or grouped
by length as HF's group_by_length, with every example exactly once; and how a step's micro-batches
are shared among ranks (rank_micro_batches); each gradient in its parameter's layout before a
step (match_layouts)."""

import pytest
import torch

from harness.trainer import epoch_steps, match_layouts, rank_micro_batches
from tests.tolerance import assert_close


def test_without_lengths_the_steps_are_consecutive_slices():
    perm = [5, 3, 0, 4, 1, 2, 6]
    assert epoch_steps(perm, 3) == [[5, 3, 0], [4, 1, 2], [6]]


def test_grouped_steps_hold_every_example_once_and_pad_less():
    lengths = [int(x) for x in torch.randint(10, 500, (203,), generator=torch.Generator().manual_seed(1))]
    perm = torch.randperm(203, generator=torch.Generator().manual_seed(2)).tolist()
    steps = epoch_steps(perm, 8, lengths, torch.Generator().manual_seed(3), group=4)
    assert sorted(i for s in steps for i in s) == list(range(203))
    assert sorted(map(len, steps)) == [3] + [8] * 25  # one ragged step, as without grouping
    # Each group of 4 steps' worth of the shuffle is sorted before it is cut: within a step the
    # lengths are neighbours, so a batch pads far less than a slice of the shuffle does.
    def padded(plan):
        return sum(len(s) * max(lengths[i] for i in s) for s in plan)
    assert padded(steps) < 0.8 * padded(epoch_steps(perm, 8))
    for s in steps:
        assert {i for i in s} <= set(perm[(perm.index(s[0]) // 32) * 32:][:32])  # one group
    # The order of the steps is shuffled (not longest first), and fixed by the generator.
    firsts = [max(lengths[i] for i in s) for s in steps]
    assert firsts != sorted(firsts, reverse=True)
    assert steps == epoch_steps(perm, 8, lengths, torch.Generator().manual_seed(3), group=4)


def test_one_process_takes_every_micro_batch_of_a_step_unweighted():
    assert rank_micro_batches(list(range(10)), 4, 3) == [([0, 1, 2, 3], None), ([4, 5, 6, 7], None),
                                                         ([8, 9], None)]


def test_ranks_take_consecutive_micro_batches_weighted_to_the_mean_over_those_that_exist():
    step = list(range(32))  # batch 8, accumulation 2, 2 ranks: 4 micro-batches, 2 each
    parts = [rank_micro_batches(step, 8, 2, rank, 2, engine=True) for rank in (0, 1)]
    assert [[c for c, _ in p] for p in parts] == [[step[0:8], step[8:16]], [step[16:24], step[24:32]]]
    assert {w for p in parts for _, w in p} == {1.0}  # the engine's 1/(2 x 2) averaging is the mean


def test_a_ragged_last_step_leaves_a_rank_a_zero_weighted_pass():
    step = list(range(40, 52))  # 12 examples, batch 8: 2 micro-batches, accumulation 2, 2 ranks
    rank0 = rank_micro_batches(step, 8, 2, 0, 2, engine=True)
    rank1 = rank_micro_batches(step, 8, 2, 1, 2, engine=True)
    assert rank0 == [(step[:8], 2.0), (step[8:], 2.0)]  # 2 x 2 / 2 micro-batches that exist
    assert rank1 == [(step[:8], 0.0), (step[:8], 0.0)]  # joins the collectives, adds nothing
    # What the engine applies, (loss x weight) / grad_accum averaged over ranks, is their mean.
    losses = {tuple(step[:8]): 3.0, tuple(step[8:]): 5.0}
    applied = sum(losses[tuple(c)] * w / 2 for part in (rank0, rank1) for c, w in part) / 2
    assert applied == (3.0 + 5.0) / 2


def test_an_extra_pass_larger_than_a_step_gives_every_rank_the_same_number_of_passes():
    examples = list(range(40))  # 5 micro-batches of 8 with accumulation 1 on 2 ranks: 3 each
    rank0 = rank_micro_batches(examples, 8, 1, 0, 2, engine=True)
    rank1 = rank_micro_batches(examples, 8, 1, 1, 2, engine=True)
    assert [c for c, _ in rank0] == [examples[0:8], examples[8:16], examples[16:24]]
    assert [c for c, _ in rank1] == [examples[24:32], examples[32:40], examples[0:8]]
    assert [w for _, w in rank1] == [0.4, 0.4, 0.0]
    losses = {k: float(k) for k in range(0, 40, 8)}
    applied = sum(losses[c[0]] * w / 1 for part in (rank0, rank1) for c, w in part) / 2
    assert applied == pytest.approx(sum(losses.values()) / 5)  # the mean over the 5 that exist


def test_hooks_see_the_rows_of_each_micro_batch_with_the_columns_training_data_adds(synthetic_dir):
    """`ctx.batch_rows` holds, at every forward, the rows the batch was made of (with a column of
    the method's own), in the step and in a `closure(examples)` pass alike."""
    import datasets

    from harness.trainer import FitSettings, fit
    from tests.helpers import make_context

    ctx, method, batcher = make_context(synthetic_dir, "seqlora", n_train=24)
    method.setup(ctx)
    method.before_task(ctx)
    seen = []

    def training_data(ctx_):
        train = ctx_.task_data.train
        return datasets.Dataset.from_dict({"source": train["source"], "target": train["target"],
                                           "mark": list(range(len(train)))})

    def penalty(ctx_, batch, outputs):
        sources = batcher.tok.batch_decode(batch["input_ids"], skip_special_tokens=True)
        seen.append((ctx_.batch_rows, sources))

    def step(ctx_, closure):
        loss = closure()
        closure([("an extra pass", "World")])
        return loss

    method.training_data, method.penalty, method.step = training_data, penalty, step
    fit(ctx, method, batcher, FitSettings(batch_size=8, progress=False))
    train = ctx.task_data.train
    own = [rows for rows, _ in seen if rows[0]["source"] != "an extra pass"]
    assert sorted(r["mark"] for rows in own for r in rows) == list(range(len(train)))
    for rows, sources in seen:
        assert [batcher.tok.decode(batcher.tok(r["source"]).input_ids, skip_special_tokens=True)
                for r in rows] == sources
        assert all(train["source"][r["mark"]] == r["source"] for r in rows if "mark" in r)
    assert [rows for rows, _ in seen if "mark" not in rows[0]] == \
        [[{"source": "an extra pass", "target": "World"}]] * 3  # one per step


def test_a_gradient_written_in_another_layout_steps_its_own_entries():
    """A method may write `.grad` as a new row-major tensor for a column-major parameter (OSFT's
    SVD factors were such); the fused AdamW pairs entries by memory order, so the trainer gives
    each gradient its parameter's layout first (`match_layouts`), and the fused step then equals
    the plain one."""
    base = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    grad = torch.randn(5, 7, generator=torch.Generator().manual_seed(1))
    stepped = []
    for fused in (True, False):
        p = torch.nn.Parameter(base.T.contiguous().T)  # column-major, as LAPACK returns U
        p.grad = grad.clone()  # row-major
        match_layouts([p])
        assert p.grad.stride() == p.stride() and torch.equal(p.grad, grad)
        torch.optim.AdamW([p], lr=0.1, fused=fused).step()
        stepped.append(p.detach())
    # one AdamW update: a handful of element-wise roundings on each entry of magnitude ~|base|
    assert_close(stepped[0], stepped[1], ops=8)
