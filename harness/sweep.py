"""The sweep: which runs one `run` command makes (methods x sequences x seeds, or a shard of them),
and how they are carried out: one after another in this process, or in J processes side by side
that take them from one queue, under one progress bar."""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from typing import TYPE_CHECKING

from harness.store import RunSpec

if TYPE_CHECKING:  # pragma: no cover
    from harness.runner import Options
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


def longest_first(specs: list[RunSpec]) -> list[RunSpec]:
    """The runs in the order side-by-side jobs take them: the longest task sequences first (a run's
    time grows with its stages), so that the sweep ends on short runs and no job waits long for
    another's last one; the sweep's order otherwise."""
    return sorted(specs, key=lambda spec: -len(spec.tasks))


def run_in_jobs(profile: str, options: "Options", specs: list[RunSpec], jobs: int, *, force: bool,
                progress: bool) -> int:
    """`--jobs J`: J processes with cores/J threads each, which take the runs one at a time from
    one queue (`longest_first`), so a job that finishes early takes the next run instead of
    waiting on a fixed share. Each result line is printed here, under one progress bar. A run that
    fails is reported and the others go on (exit code 1 at the end); a job process that dies (a
    kill, out of memory) takes the pool with it, so the runs not finished go to a new pool, where
    the one that was running resumes from its last complete stage (at most `RESTARTS` times)."""
    from tqdm.auto import tqdm

    threads = threads_per_job(jobs)
    options = replace(options, progress=False)  # one bar, here
    start, left, failed = time.perf_counter(), longest_first(specs), 0
    bar = tqdm(total=len(specs), desc="runs", unit="run", disable=not progress)
    for attempt in range(RESTARTS + 1):
        left, errors = _pool_pass(profile, options, left, jobs, threads, force, bar,
                                  last=attempt == RESTARTS)
        failed += errors
        if not left:
            break
    bar.close()
    print(f"done: {len(specs)} run(s) in {time.perf_counter() - start:.1f}s, {jobs} jobs x {threads} "
          f"thread(s){f', {failed} failed' if failed else ''}", flush=True)
    return 1 if failed else 0


RESTARTS = 2


def _pool_pass(profile: str, options: "Options", specs: list[RunSpec], jobs: int, threads: int,
               force: bool, bar, last: bool) -> tuple[list[RunSpec], int]:
    """The runs in one process pool: (those a dying job process left unfinished, the failures)."""
    from tqdm.auto import tqdm

    left, failed = [], 0
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_start_job, initargs=(threads,)) as pool:
        try:
            pending = {pool.submit(run_one, profile, options, spec, force): spec for spec in specs}
            for done in as_completed(pending):
                spec = pending[done]
                try:
                    tqdm.write(done.result())
                except BrokenProcessPool as exc:
                    if not last:
                        left.append(spec)
                        continue
                    failed += 1
                    tqdm.write(f"failed: {spec.method} {spec.sequence_name} seed{spec.seed}: {exc}",
                               file=sys.stderr)
                except Exception as exc:  # noqa: BLE001 - reported; the other runs go on
                    failed += 1
                    tqdm.write(f"failed: {spec.method} {spec.sequence_name} seed{spec.seed}: {exc}",
                               file=sys.stderr)
                bar.update(1)
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return [spec for spec in specs if spec in left], failed


def _start_job(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()  # the parent draws the one bar


_runner = None  # a job process's runner (it serves one sweep), built at its first run


def run_one(profile: str, options: "Options", spec: RunSpec, force: bool) -> str:
    """One run in a job process; its result line (or why it was skipped)."""
    global _runner
    from harness.runner import RunBusy, runner_for

    if _runner is None:
        _runner = runner_for(profile, options)
    try:
        summary = _runner.run(spec, force=force)
    except RunBusy as exc:
        return f"skipped: {exc}"
    return result_line(spec, summary)
