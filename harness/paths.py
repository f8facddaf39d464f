"""Where the project keeps its definition files and its generated artefacts."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BENCHMARK_DIR = PROJECT_ROOT / "CL_Benchmark"


def cache_dir() -> Path:
    """Generated, reusable artefacts (synthetic data, tokenizers, embedded backbones).

    `HARNESS_CACHE_DIR` overrides; the default sits inside the project so a clone is self-contained.
    """
    return Path(os.environ.get("HARNESS_CACHE_DIR", PROJECT_ROOT / ".cache"))


def synthetic_data_dir() -> Path:
    return Path(os.environ.get("HARNESS_SYNTHETIC_DIR", BENCHMARK_DIR / "synthetic"))
