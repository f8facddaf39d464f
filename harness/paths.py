"""Where the project keeps its definition files and its generated artefacts."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BENCHMARK_DIR = PROJECT_ROOT / "CL_Benchmark"


def cache_dir() -> Path:
    """Generated, reusable artefacts (synthetic data, tokenizers, embedded backbones).

    `HARNESS_CACHE_DIR` overrides; the default sits inside the project so a clone is self-contained.
    """
    return Path(os.environ.get("HARNESS_CACHE_DIR", PROJECT_ROOT / ".cache"))


def synthetic_data_dir() -> Path:
    return Path(os.environ.get("HARNESS_SYNTHETIC_DIR", BENCHMARK_DIR / "synthetic"))


def cached_folder(target: Path, build: Callable[[Path], None]) -> Path:
    """`target`, built once by `build(folder)` into a temporary folder beside it and renamed into
    place, so a killed build leaves nothing that looks complete; when another process renamed its
    own first, theirs is kept."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".build-"))
    try:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
