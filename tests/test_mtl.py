"""MTL: one stage on the union of every task; R has one row, and only AA is defined."""

import json

from harness.cli import main
from tests.helpers import DEFAULT, make_context


def test_mtl_trains_once_on_the_union(synthetic_dir, tmp_path):
    ctx, method, _ = make_context(synthetic_dir, "mtl", tasks=("agnews", "SST-2"))
    data = method.training_data(ctx)
    parts = [ctx.data[t].train for t in ("agnews", "SST-2")]
    assert len(data) == sum(len(p) for p in parts)
    assert set(data["source"]) == set(parts[0]["source"]) | set(parts[1]["source"])

    assert main(["run", "--method", "mtl", "--tasks", "agnews,SST-2", "--data-dir", str(synthetic_dir),
                 "--results", str(tmp_path), "--train-per-task", "16", "--test-per-task", "8",
                 "--no-progress"]) == 0
    run_dir = tmp_path / "default" / "mtl" / "tasks-agnews+SST-2" / "seed0"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(summary["accuracy_matrix"]) == 2 and summary["row_labels"] == ["base", "all"]
    assert summary["metrics"]["AA"] is not None
    assert all(summary["metrics"][k] is None for k in ("LA", "BWT", "FWT", "forgetting"))
    metrics = json.loads((run_dir / "stage_01-all" / "metrics.json").read_text())
    assert metrics["train"]["examples"] == 32 * DEFAULT.epochs  # both tasks, every epoch
    assert main(["table", "--results", str(tmp_path)]) == 0
