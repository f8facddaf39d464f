"""`harness prepare`: a profile's backbone built once (and the data it needs)."""

from __future__ import annotations

import time
from pathlib import Path


def add_arguments(sub) -> None:
    prep = sub.add_parser("prepare", help="build a profile's backbone once (the embedded default "
                          "is pretrained, a GGUF file converted) and the data it needs")
    prep.add_argument("--profile", default="default", help="profile (see `list profiles`)")
    prep.add_argument("--data-dir", type=Path, help="data in the O-LoRA layout (default: "
                      "synthetic; or $HARNESS_DATA_DIR)")
    prep.add_argument("--model", help="local checkpoint folder (default: the profile's model)")
    prep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a profile setting (embedded.pretrain_steps=800)")


def handle(args) -> None:
    from harness.runner import Options, runner_for

    start = time.perf_counter()
    runner = runner_for(args.profile, Options(data_dir=args.data_dir, model=args.model,
                                              profile_overrides=tuple(args.overrides)))
    path = runner.model_path()
    print(f"profile {args.profile}: backbone {path}; data {runner.data_dir} "
          f"({time.perf_counter() - start:.0f}s)")
