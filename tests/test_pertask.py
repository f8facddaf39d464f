"""PerTaskFT: every task is scored by its own adapter, trained from the base model alone."""

import torch

from tests.helpers import assert_lora_output, make_context, train_stage


def layer_output(ctx, x):
    layer = next(m for n, m in ctx.model.named_modules()
                 if n.endswith("SelfAttention.q") and hasattr(m, "lora_A"))
    return layer, layer(x)


def test_each_task_uses_its_own_adapter_and_unseen_tasks_the_base(synthetic_dir):
    ctx, method, batcher = make_context(synthetic_dir, "pertask", tasks=("agnews", "yahoo", "CB"))
    method.setup(ctx)
    train_stage(ctx, method, batcher, 0)
    first = {n: p.detach().clone() for n, p in ctx.model.named_parameters() if ".task1." in n}
    ctx.model.eval()
    x = torch.randn(3, 32)
    method.select_for_eval(ctx, ctx.tasks[0])
    layer, before = layer_output(ctx, x)
    method.select_for_eval(ctx, None)
    train_stage(ctx, method, batcher, 1)
    ctx.model.eval()
    # Adapter 2 started from the base model (B = 0), not from adapter 1, and adapter 1 is unchanged.
    assert all(torch.equal(first[n], p) for n, p in ctx.model.named_parameters() if n in first)
    method.select_for_eval(ctx, ctx.tasks[0])
    assert layer.active_adapters == ["task1"]
    # task 1 scored by adapter 1 only: the same computation as before, so bitwise equal
    assert torch.equal(layer_output(ctx, x)[1], before)
    method.select_for_eval(ctx, ctx.tasks[1])
    assert layer.active_adapters == ["task2"]
    assert_lora_output(layer, x, ["task2"])
    method.select_for_eval(ctx, ctx.tasks[2])                      # not trained yet: base model
    assert torch.equal(layer_output(ctx, x)[1], layer.base_layer(x))  # adapters off: W0 x itself
    method.select_for_eval(ctx, None)                              # training view restored
    assert layer.active_adapters == ["task2"] and not layer.disable_adapters


def test_frozen_adapters_are_carried_over_not_generated_again(synthetic_dir, tmp_path, monkeypatch):
    """After each stage only the task just trained is generated again; every carried-over cell and
    its predictions equal what generating them again gives."""
    import harness.runner
    from harness.cli import main
    from harness_methods.pertask import PerTaskFT

    real_evaluate, calls = harness.runner.evaluate_task, []

    def counting_evaluate(*args, **kwargs):
        calls.append(kwargs["data"].task.name)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(harness.runner, "evaluate_task", counting_evaluate)
    tasks = "agnews,SST-2,CB"

    def run(results):
        assert main(["run", "--method", "pertask", "--tasks", tasks, "--data-dir", str(synthetic_dir),
                     "--results", str(results), "--train-per-task", "32", "--test-per-task", "8",
                     "--no-progress"]) == 0
        folder = results / "default" / "pertask" / "tasks-agnews+SST-2+CB" / "seed0"
        return ((folder / "accuracy_matrix.csv").read_text(),
                [(d / "predictions.jsonl").read_text() for d in sorted(folder.glob("stage_*"))])

    carried = run(tmp_path / "carried")
    assert calls == ["agnews", "SST-2", "CB", "agnews", "SST-2", "CB"]  # base row, then the diagonal
    calls.clear()
    monkeypatch.setattr(PerTaskFT, "evaluates_as_before", lambda self, ctx, task: False)
    generated = run(tmp_path / "generated")
    assert len(calls) == 3 + 3 * 3
    assert carried == generated
