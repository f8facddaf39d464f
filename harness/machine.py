"""What this process may use of the machine."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, which a Slurm allocation, `taskset` or
    a container's cpuset narrows, not the machine's count (`os.cpu_count()`: all 128 cores of a
    node whose job was given 4, and as many processes or threads as that would oversubscribe it)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # no affinity call on this platform (macOS, Windows)
        return os.cpu_count() or 1


def cores_each(processes: int) -> int:
    """The threads each of `processes` processes sharing this process's cores gets (at least 1)."""
    return max(1, usable_cores() // max(1, processes))
