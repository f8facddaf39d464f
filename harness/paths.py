"""Where the project keeps its definition files and its generated artefacts."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from filelock import FileLock

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BENCHMARK_DIR = PROJECT_ROOT / "CL_Benchmark"


def is_development_clone(root: Path = PROJECT_ROOT) -> bool:
    """Whether the harness runs from a clone of its repository (an editable install), the only
    place where a command may write beside its code."""
    return (root / "pyproject.toml").is_file() and (root / "methods" / "base.py").is_file()


def cache_dir() -> Path:
    """Generated, reusable artefacts (synthetic data, tokenizers, embedded backbones).

    `HARNESS_CACHE_DIR` overrides. In a development clone the default sits inside it, so a clone
    is self-contained; an installed harness uses the user's cache folder, never its own tree.
    """
    if "HARNESS_CACHE_DIR" in os.environ:
        return Path(os.environ["HARNESS_CACHE_DIR"])
    if is_development_clone():
        return PROJECT_ROOT / ".cache"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cl-harness"


def synthetic_data_dir() -> Path:
    default = BENCHMARK_DIR / "synthetic" if is_development_clone() else cache_dir() / "synthetic"
    return Path(os.environ.get("HARNESS_SYNTHETIC_DIR", default))


def cached_folder(target: Path, build: Callable[[Path], None]) -> Path:
    """`target`, built once by `build(folder)` into a temporary folder beside it and renamed into
    place, so a killed build leaves nothing that looks complete. Builders take a lock: a second
    process (a sweep job, a test worker) waits for the first instead of building again, and the
    lock holder removes what killed builds left."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.parent / f".{target.name}.lock"):
        if (target / "config.json").exists():
            return target
        for stale in [target, *target.parent.glob(f".build-{target.name}-*")]:  # damaged, killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".build-{target.name}-"))
        try:
            build(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
