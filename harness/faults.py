"""Fault injection for the resume tests: `HARNESS_KILL_AT=<point>:<n>` makes the process SIGKILL
itself the n-th time it passes `<point>` (1-based), so a test can kill a run at an exact place
(mid-stage, mid-write, during evaluation) instead of racing a timer; `<point>:<n>:<SIGNAL>` sends
that signal instead (TERM, USR2: what Slurm sends before it stops a job), and `<point>:<n>:RAISE`
raises `Killed` there instead, so that a run in this process stops as a killed one would (nothing
of the harness catches it; the contract checks resume such runs). Unset, a point costs one
dictionary lookup. `HARNESS_KILL_ONCE=<file>` makes it a single kill among all processes (see
`_first_time`).

Points: train_step (after an optimizer step), eval_batch (after a generated batch),
stage_write (a stage's files written, its folder not yet renamed into place), stage_done (a stage
renamed into place, the previous checkpoint not yet dropped), summary (before summary.json),
step_checkpoint_write (a step checkpoint's tensors written, its state not yet).
"""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager

_counts: dict[str, int] = {}


class Killed(BaseException):
    """A kill simulated in this process (`RAISE`): a BaseException, so no `except Exception` of the
    harness records it as a failure; only what a killed process would leave stays behind."""


@contextmanager
def kill_at(spec: str):
    """`HARNESS_KILL_AT=spec` while inside, counted from zero."""
    previous = os.environ.get("HARNESS_KILL_AT")
    os.environ["HARNESS_KILL_AT"] = spec
    _counts.clear()
    try:
        yield
    finally:
        _counts.clear()
        if previous is None:
            os.environ.pop("HARNESS_KILL_AT", None)
        else:
            os.environ["HARNESS_KILL_AT"] = previous


def point(name: str) -> None:
    spec = os.environ.get("HARNESS_KILL_AT")
    if not spec:
        return
    target, _, rest = spec.partition(":")
    if target != name:
        return
    nth, _, signum = rest.partition(":")
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == int(nth or 1) and _first_time():
        if signum == "RAISE":
            raise Killed(spec)
        os.kill(os.getpid(), signal.Signals[f"SIG{signum or 'KILL'}"])


def _first_time() -> bool:
    """With `HARNESS_KILL_ONCE=<file>`, only the first process of all to reach the point is
    killed (it creates the file, holding its Slurm array task id): a requeued job runs on."""
    marker = os.environ.get("HARNESS_KILL_ONCE")
    if not marker:
        return True
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, os.environ.get("SLURM_ARRAY_TASK_ID", "").encode())
    os.close(fd)
    return True
