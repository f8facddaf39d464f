"""What is evaluated after a stage (harness.runner.StageEvaluation): the scope rule of
--eval-scope, and the cells a method carries over instead of generating again."""

from types import SimpleNamespace

import torch

from harness.runner import StageEvaluation
from harness_methods.base import Method

TASKS = tuple(SimpleNamespace(name=n) for n in ("a", "b", "c", "d"))


class Frozen(Method):
    """Carries over every task except the one trained at the current stage (as PerTaskFT)."""

    def __init__(self):
        super().__init__({"lr": 1e-3})
        self.selected = []

    def evaluates_as_before(self, ctx, task):
        return task.name != ctx.task.name

    def select_for_eval(self, ctx, task):
        self.selected.append(None if task is None else task.name)


def evaluation(method, scope, row=None, n_stages=4):
    calls = []
    ctx = SimpleNamespace(tasks=TASKS, data={t.name: t.name for t in TASKS}, model=torch.nn.Module(),
                          stage=0)
    ctx.task = TASKS[0]

    def evaluate(model, data):
        calls.append(data)
        return float(len(calls)), [{"task": data, "call": len(calls)}]

    row = row or {t.name: 0.0 for t in TASKS}
    latest = {t.name: [{"task": t.name, "call": 0}] for t in TASKS}
    return StageEvaluation(evaluate, ctx, method, n_stages, scope, row, latest), ctx, calls


def test_seen_and_next_narrows_only_the_rows_between_the_first_and_the_last():
    ev, _, _ = evaluation(Method({"lr": 1e-3}), scope="seen+next")
    assert [t.name for t in ev.scope(0)] == ["a", "b", "c", "d"]  # the base row
    assert [t.name for t in ev.scope(1)] == ["a", "b"]
    assert [t.name for t in ev.scope(2)] == ["a", "b", "c"]
    assert [t.name for t in ev.scope(4)] == ["a", "b", "c", "d"]  # the last row
    whole, _, _ = evaluation(Method({"lr": 1e-3}), scope="all")
    assert all(len(whole.scope(k)) == 4 for k in range(5))
    joint, _, _ = evaluation(Method({"lr": 1e-3}), scope="seen+next", n_stages=1)  # one stage on "all"
    assert len(joint.scope(1)) == 4


def test_the_last_scope_evaluates_only_the_base_and_the_last_rows():
    ev, ctx, calls = evaluation(Frozen(), scope="last", row={"a": 50.0, "b": 60.0, "c": 70.0,
                                                              "d": 80.0})
    assert len(ev.scope(0)) == 4 and len(ev.scope(4)) == 4
    for stage in (1, 2, 3):
        ctx.task = TASKS[stage - 1]
        assert ev(stage)[:2] == ({}, []) and calls == []
    ctx.task = TASKS[3]
    accuracy, _, _ = ev(4)  # nothing to carry over from the empty rows before: every task runs
    assert calls == ["a", "b", "c", "d"] and list(accuracy) == ["a", "b", "c", "d"]


def test_cells_evaluated_as_before_are_carried_over_with_their_predictions():
    method = Frozen()
    ev, ctx, calls = evaluation(method, scope="all", row={"a": 50.0, "b": 60.0, "c": 70.0,
                                                                  "d": 80.0})
    ctx.task = TASKS[1]  # stage 2 trained task b
    accuracy, predictions, _ = ev(2)
    assert calls == ["b"] and accuracy == {"a": 50.0, "b": 1.0, "c": 70.0, "d": 80.0}
    assert [p["call"] for p in predictions] == [0, 1, 0, 0]
    assert method.selected == ["b", None]  # switched to b's weights, then back for training
    ctx.task = TASKS[2]
    accuracy, _, _ = ev(3)  # the row carried from is the one just made
    assert calls == ["b", "c"] and accuracy["b"] == 1.0 and accuracy["c"] == 2.0


def test_a_cell_missing_from_the_previous_row_is_evaluated():
    ev, ctx, calls = evaluation(Frozen(), scope="seen+next", row={"a": 50.0, "b": 60.0})
    ctx.task = TASKS[1]
    accuracy, _, _ = ev(4)  # the last row is whole: c and d were not in the previous one
    assert calls == ["b", "c", "d"] and accuracy["a"] == 50.0
