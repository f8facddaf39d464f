"""`harness status`: where every run of a sweep stands."""

from __future__ import annotations

import json
from pathlib import Path


def add_arguments(sub) -> None:
    status = sub.add_parser("status", help="where every run of a sweep stands: complete, running, "
                            "failed, k of T stages, or not started (and its Slurm state)")
    status.add_argument("--results", type=Path, default=Path("results"))
    status.add_argument("--json", action="store_true", help="one JSON object per run")


def handle(args) -> None:
    from harness.status import format_status, sweep_status

    statuses = sweep_status(args.results)
    print(json.dumps([vars(s) for s in statuses], indent=1) if args.json else format_status(statuses))
