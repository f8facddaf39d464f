"""The sweep: which runs one `run` command makes (methods x sequences x seeds, or a shard of them),
and how they are carried out: one after another in this process, or in J processes side by side
whose per-run lines are relayed under one progress bar."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING

from harness.store import RunSpec

if TYPE_CHECKING:  # pragma: no cover
    from harness.summary import Summary


def expand(methods: list[str], sequences: list[tuple[int | None, tuple[str, ...]]], seeds: list[int],
           profile: str, shard: tuple[int, int] | None = None) -> list[RunSpec]:
    """Every run, sequence-major; `shard` (i, N) keeps every N-th from the i-th, so the shards
    get similar mixes of methods and sequences."""
    specs = [RunSpec(method=m, tasks=tuple(seq), seed=s, profile=profile, order=k)
             for (k, seq) in sequences for m in methods for s in seeds]
    if shard:
        index, count = shard
        specs = specs[index::count]
    return specs


def threads_per_job(jobs: int) -> int:
    return max(1, (os.cpu_count() or 1) // jobs)


def auto_jobs(runs: int, world) -> int:
    """--jobs auto: one process per core for a sweep on a machine without a GPU (each with one
    thread: the small embedded model does not keep two cores busy, two processes do; measured
    1.23x on 2 cores), at most one per 1.5 GiB of free memory; 1 otherwise."""
    import torch

    if runs < 2 or world.size > 1 or torch.cuda.is_available():
        return 1
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        free = 1 << 62
    return max(1, min(os.cpu_count() or 1, runs, int(free // (1.5 * 2**30))))


def without(argv: list[str], options: tuple[str, ...], flags: tuple[str, ...] = ()) -> list[str]:
    """`argv` less the given options (with their values, `--opt v` or `--opt=v`) and flags."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        name = token.split("=", 1)[0]
        if name in options:
            skip = "=" not in token
            continue
        if token in flags:
            continue
        out.append(token)
    return out


def result_line(spec: RunSpec, summary: "Summary") -> str:
    m = summary.metrics
    bwt = m.get("BWT") if m.get("BWT") is None else round(m["BWT"], 2)
    return (f"{spec.method:10s} {spec.sequence_name:12s} seed{spec.seed}  AA {m['AA']:.2f}  "
            f"BWT {bwt}  ({summary.train_eval_seconds:.1f}s)")


RUN_LINE = re.compile(r"^(skipped: |\S+ +\S+ +seed\d+  AA )")


def ends_a_run(line: str) -> bool:
    """Whether a line a job printed is the one that ends a run (`result_line`, or a skip)."""
    return RUN_LINE.match(line) is not None


def run_here(runner, specs: list[RunSpec], *, force: bool, progress: bool, world) -> int:
    """The runs one after another in this process (on every rank under DeepSpeed; rank 0 prints)."""
    from tqdm.auto import tqdm

    from harness.runner import RunBusy

    start = time.perf_counter()
    for spec in tqdm(specs, desc="runs", unit="run",
                     disable=not progress or len(specs) == 1 or not world.main):
        try:
            summary = runner.run(spec, force=force)
        except RunBusy as exc:
            if world.main:
                tqdm.write(f"skipped: {exc}")
            continue
        if world.main:
            tqdm.write(result_line(spec, summary))
    if world.main:
        print(f"done: {len(specs)} run(s) in {time.perf_counter() - start:.1f}s", flush=True)
    return 0


def run_in_jobs(argv: list[str], jobs: int, shard: tuple[int, int] | None, total: int,
                progress: bool) -> int:
    """`--jobs J`: J processes, each running a round-robin share of the sweep (nested inside any
    --shard i/N, so job j of shard i takes share i + j*N of N*J), each with cores/J threads. Their
    per-run lines are relayed under one progress bar over the whole share."""
    from tqdm.auto import tqdm

    index, shards = shard or (0, 1)
    threads = threads_per_job(jobs)
    base = without(argv, ("--jobs", "--shard"), flags=("--no-progress",))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "harness", *base, "--no-progress",
                               "--jobs", "1", "--shard", f"{index + j * shards}/{shards * jobs}"],
                              env=env, stdout=subprocess.PIPE, text=True, bufsize=1)
             for j in range(jobs)]
    bar = tqdm(total=total, desc="runs", unit="run", disable=not progress)
    lock = threading.Lock()

    def relay(proc) -> None:
        for line in proc.stdout:
            if line.startswith(("benchmark:", "done:")):  # the parent says these once
                continue
            with lock:
                tqdm.write(line.rstrip("\n"))
                if ends_a_run(line):  # not a warning or any other line a job prints
                    bar.update(1)

    readers = [threading.Thread(target=relay, args=(p,), daemon=True) for p in procs]
    for reader in readers:
        reader.start()
    codes = [p.wait() for p in procs]
    for reader in readers:
        reader.join()
    bar.close()
    print(f"done: {total} run(s) in {time.perf_counter() - start:.1f}s, {jobs} jobs x {threads} "
          f"thread(s) (exit codes {codes})", flush=True)
    return next((c for c in codes if c), 0)
