"""The batches of an epoch (harness.trainer.epoch_steps): plain slices of the shuffle, or grouped
by length as HF's group_by_length, with every example exactly once."""

import torch

from harness.trainer import epoch_steps


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
