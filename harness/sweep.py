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
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from harness.machine import cores_each, usable_cores
from harness.store import RunSpec

if TYPE_CHECKING:  # pragma: no cover
    from harness.runner import Options
    from harness.summary import Summary


@dataclass(frozen=True)
class SweepPlan:
    """What a `run` command hands to whoever carries out its runs (job processes here, array
    tasks on a cluster), picklable: the runs, the profile and the run options. `ranks_argv` is set
    under `--launcher deepspeed`: the command line each rank runs (a shard of it), since the
    DeepSpeed launcher starts the ranks as new processes."""

    profile: str
    options: "Options"
    specs: tuple[RunSpec, ...]
    force: bool = False
    ranks_argv: tuple[str, ...] | None = None
    num_gpus: int | None = None  # with ranks_argv: ranks per run (None: every visible GPU)


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
    return max(1, min(usable_cores(), runs, int(free // (1.5 * 2**30))))


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


def longest_first(indices: list[int], plan: SweepPlan) -> list[int]:
    """The plan's runs in the order side-by-side jobs take them: the longest task sequences first
    (a run's time grows with its stages), so that the sweep ends on short runs and no job waits
    long for another's last one; the sweep's order otherwise."""
    return sorted(indices, key=lambda i: -len(plan.specs[i].tasks))


def run_in_jobs(plan: SweepPlan, jobs: int, *, progress: bool) -> int:
    """`--jobs J`: J processes with cores/J threads each, which take the runs one at a time from
    one queue (`longest_first`), so a job that finishes early takes the next run instead of
    waiting on a fixed share. Each result line is printed here, under one progress bar. A run that
    fails is reported and the others go on (exit code 1 at the end); a job process that dies (a
    kill, out of memory) takes the pool with it, so the runs not finished go to a new pool, where
    the one that was running resumes from its last complete stage (at most `RESTARTS` times)."""
    from tqdm.auto import tqdm

    threads = cores_each(jobs)
    plan = replace(plan, options=replace(plan.options, progress=False))  # one bar, here
    start, left, failed = time.perf_counter(), longest_first(list(range(len(plan.specs))), plan), 0
    bar = tqdm(total=len(plan.specs), desc="runs", unit="run", disable=not progress)
    for attempt in range(RESTARTS + 1):
        left, errors = _pool_pass(plan, left, jobs, threads, bar, last=attempt == RESTARTS)
        failed += errors
        if not left:
            break
    bar.close()
    print(f"done: {len(plan.specs)} run(s) in {time.perf_counter() - start:.1f}s, {jobs} jobs x "
          f"{threads} thread(s){f', {failed} failed' if failed else ''}", flush=True)
    return 1 if failed else 0


RESTARTS = 2


def _pool_pass(plan: SweepPlan, indices: list[int], jobs: int, threads: int, bar,
               last: bool) -> tuple[list[int], int]:
    """The plan's runs `indices` in one process pool: (those a dying job process left unfinished,
    the failures)."""
    from tqdm.auto import tqdm

    left, failed = [], 0
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=start_job_process, initargs=(threads,)) as pool:
        try:
            pending = {pool.submit(run_one, plan, i): i for i in indices}
            for done in as_completed(pending):
                spec = plan.specs[pending[done]]
                try:
                    tqdm.write(done.result())
                except Exception as exc:  # noqa: BLE001 - reported; the other runs go on
                    if isinstance(exc, BrokenProcessPool) and not last:
                        left.append(pending[done])  # to the next pool
                        continue
                    failed += 1
                    tqdm.write(f"failed: {spec.method} {spec.sequence_name} seed{spec.seed}: {exc}",
                               file=sys.stderr)
                bar.update(1)
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return [i for i in indices if i in left], failed


def start_job_process(threads: int) -> None:
    """A process that carries out runs of a plan (a job process, an array task): its threads
    (which DeepSpeed ranks it starts inherit), its logging, no progress bars of its own."""
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    import torch
    from transformers.utils import logging as hf_logging

    from harness.runlog import configure_process_logging

    torch.set_num_threads(threads)
    configure_process_logging()
    hf_logging.disable_progress_bar()
    end_with_parent()


def end_with_parent(poll_seconds: float = 1.0) -> None:
    """A job process whose sweep process is gone (killed, terminated: its pool can no longer
    hand out runs or read results) ends as a preempted process does, by SIGTERM to itself: a
    stage being trained writes its step checkpoint first, and the run resumes from it later."""
    import signal
    import threading

    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="end-with-parent", daemon=True).start()


_runner = None  # a job process's runner (it serves one sweep), built at its first run


def run_one(plan: SweepPlan, index: int) -> str:
    """Run `index` of the plan in this process (a job process, an array task); its result line
    (or why it was skipped)."""
    global _runner
    from harness.runner import RunBusy, runner_for

    if _runner is None:
        _runner = runner_for(plan.profile, plan.options)
    spec = plan.specs[index]
    try:
        summary = _runner.run(spec, force=plan.force)
    except RunBusy as exc:
        return f"skipped: {exc}"
    return result_line(spec, summary)
