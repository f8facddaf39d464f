"""`harness generate`: the synthetic benchmark written to a folder."""

from __future__ import annotations

from pathlib import Path

from harness.cli.common import positive


def add_arguments(sub) -> None:
    gen = sub.add_parser("generate", help="write the synthetic benchmark")
    gen.add_argument("--out", type=Path, help="output folder (default: CL_Benchmark/synthetic)")
    gen.add_argument("--train", type=positive, default=1000, help="train records per task")
    gen.add_argument("--test", type=positive, default=200, help="test records per task")
    gen.add_argument("--seed", type=int, default=0)


def handle(args) -> None:
    from harness.paths import synthetic_data_dir
    from harness.synthetic import generate

    out = generate(args.out or synthetic_data_dir(), n_train=args.train, n_test=args.test,
                   seed=args.seed)
    print(f"synthetic benchmark written to {out}")
