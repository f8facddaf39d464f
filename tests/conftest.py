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

    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    torch.set_num_threads(_THREADS)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(_THREADS)


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    from harness.synthetic import generate

    return generate(tmp_path_factory.mktemp("synthetic"), n_train=120, n_test=40)


def write_task(root: Path, category: str, name: str, labels, train, test):
    """A hand-made task folder in the O-LoRA layout."""
    import json

    folder = root / category / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels.json").write_text(json.dumps(labels))
    for split, records in (("train", train), ("dev", test), ("test", test)):
        (folder / f"{split}.json").write_text(json.dumps(records))
    return folder
