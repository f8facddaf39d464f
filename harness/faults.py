"""Fault injection for the resume tests: `HARNESS_KILL_AT=<point>:<n>` makes the process SIGKILL
itself the n-th time it passes `<point>` (1-based), so a test can kill a run at an exact place
(mid-stage, mid-write, during evaluation) instead of racing a timer; `<point>:<n>:<SIGNAL>` sends
that signal instead (TERM, USR2: what Slurm sends before it stops a job). Unset, a point costs one
dictionary lookup.

Points: train_step (after an optimizer step), eval_batch (after a generated batch),
stage_write (a stage's files written, its folder not yet renamed into place), stage_done (a stage
renamed into place, the previous checkpoint not yet dropped), summary (before summary.json),
step_checkpoint_write (a step checkpoint's tensors written, its state not yet).
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def point(name: str) -> None:
    spec = os.environ.get("HARNESS_KILL_AT")
    if not spec:
        return
    target, _, rest = spec.partition(":")
    if target != name:
        return
    nth, _, signum = rest.partition(":")
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == int(nth or 1):
        os.kill(os.getpid(), signal.Signals[f"SIG{signum or 'KILL'}"])
