import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "CL_Benchmark"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Under pytest-xdist the workers share the cores: each gets its share of threads (as `run --jobs`
# divides them), for itself and for the runs it starts as subprocesses.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    import torch

    from harness.machine import cores_each

    _THREADS = cores_each(_WORKERS)
    torch.set_num_threads(_THREADS)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(_THREADS)


# The numeric tests: the methods' defining properties against their formulas, the metrics, the
# statistics and the plugin conformance checks. `make test` runs them a second time under another
# arithmetic path (ATEN_CPU_CAPABILITY=default: no vector kernels; one thread), so that a tolerance
# that holds on one CPU's kernels only fails here rather than on a user's machine.
NUMERIC = {"test_clipping.py", "test_deltas.py", "test_efficiency.py", "test_gainlora.py",
           "test_gorp.py", "test_gradient_memory.py", "test_growth_methods.py", "test_inflora.py",
           "test_length_buckets.py", "test_lfpt5.py", "test_methods_core.py", "test_metrics.py",
           "test_modifiers.py", "test_migu.py", "test_mtl.py", "test_osft.py", "test_padding_free.py", "test_param_metrics.py",
           "test_pertask.py", "test_plugins.py", "test_prompts.py", "test_regularisers.py",
           "test_stats.py", "test_summary.py", "test_table.py", "test_trainer_steps.py"}
# In those files but about packaging, not arithmetic (pip install, subprocesses): run once.
NOT_NUMERIC = {"test_a_plugin_package_installs_passes_its_test_and_the_contract_and_runs"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in NUMERIC and item.originalname not in NOT_NUMERIC:
            item.add_marker(pytest.mark.numeric)


# `synthetic_dir` (the synthetic benchmark, once per session) comes from the testing kit's pytest
# plugin (harness.testing.plugin), as it does for any plugin's tests.


def write_task(root: Path, category: str, name: str, labels, train, test):
    """A hand-made task folder in the O-LoRA layout."""
    import json

    folder = root / category / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels.json").write_text(json.dumps(labels))
    for split, records in (("train", train), ("dev", test), ("test", test)):
        (folder / f"{split}.json").write_text(json.dumps(records))
    return folder
