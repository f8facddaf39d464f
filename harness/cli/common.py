"""What the subcommands share: argument types (each refusing a bad value with one line), the
arguments `run` and `tune` share, and the run options and task sequences they build from them."""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.errors import HarnessError


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2
        raise HarnessError(f"{self.prog}: {message}")


def int_list(text: str) -> list[int]:
    """'1,2,5' or '1-3' or '0-2,7': integers and inclusive ranges, in the order given."""
    values: list[int] = []
    try:
        for part in filter(None, (x.strip() for x in text.split(","))):
            first, sep, last = part.partition("-")
            if sep and first:
                lo, hi = int(first), int(last)
                if hi < lo:
                    raise ValueError
                values.extend(range(lo, hi + 1))
            else:
                values.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers or ranges like 1-3, got {text!r}")
    return values


def shard_arg(text: str) -> tuple[int, int]:
    """'i/N' with 0 <= i < N: this process runs every N-th run of the sweep, starting at i."""
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected i/N (e.g. 0/4), got {text!r}")
    if count < 1 or not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"expected 0 <= i < N in i/N, got {text!r}")
    return index, count


def jobs_arg(text: str) -> int | str:
    return "auto" if text == "auto" else positive(text)


def str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def bounds(text: str, form: str, example: str, equal: bool) -> tuple[float, float]:
    """LOW,HIGH as two positive floats, LOW < HIGH (or LOW <= HIGH with `equal`); `text` is the
    whole argument, for the message."""
    try:
        low, high = (float(x) for x in text.rpartition("=")[2].split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {form} (e.g. {example}), got {text!r}")
    if not (0 < low <= high if equal else 0 < low < high):
        raise argparse.ArgumentTypeError(f"expected 0 < LOW {'<=' if equal else '<'} HIGH, got {text!r}")
    return low, high


def key_range(text: str) -> tuple[str, tuple[float, float]]:
    key, sep, _ = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=LOW,HIGH (e.g. lambda1=1e-5,1e-1), got {text!r}")
    return key, bounds(text, "KEY=LOW,HIGH", "lambda1=1e-5,1e-1", equal=True)


def lr_range(text: str) -> tuple[float, float]:
    return bounds(text, "LOW,HIGH", "1e-5,1e-2", equal=False)


def setup_arguments(parser: argparse.ArgumentParser) -> None:
    """What `run` and `tune` share: the profile, data, model, budget and overrides."""
    parser.add_argument("--profile", default="default", help="profile (see `list profiles`)")
    parser.add_argument("--data-dir", type=Path, help="data in the O-LoRA layout (default: "
                        "synthetic; or $HARNESS_DATA_DIR)")
    parser.add_argument("--model", help="local checkpoint folder (default: the profile's model)")
    parser.add_argument("--train-per-task", type=positive, help="training examples per task")
    parser.add_argument("--test-per-task", type=positive, help="test examples per task")
    parser.add_argument("--drop-unlabelled", action="store_true", help="drop records whose label "
                        "is not in labels.json (default: keep, scored wrong)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a profile setting (train.batch_size=8, lora.r=16) or the "
                        "method's (method.lr=1e-4); repeatable, recorded in each run's config.json")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_options(args, **fields):
    """Options from the arguments `run` and `tune` share, and `fields` besides (the machine's
    peak FLOP/s, if set in the environment, checked here: before anything is written)."""
    from harness.efficiency import peak_from_environment
    from harness.runner import Options

    peak_from_environment()

    method_sets = [o for o in args.overrides if o.split("=", 1)[0].startswith("method.")]
    return Options(data_dir=args.data_dir, model=args.model,
                   train_per_task=args.train_per_task, test_per_task=args.test_per_task,
                   drop_unlabelled=args.drop_unlabelled, progress=not args.no_progress,
                   profile_overrides=tuple(o for o in args.overrides if o not in method_sets),
                   method_overrides=tuple(method_sets), **fields)


def task_sequences(bench, tasks: list[str] | None,
               orders: list[int]) -> list[tuple[int | None, tuple[str, ...]]]:
    """(order, tasks) of each sequence asked for, checked: the `--tasks` list (the order whose
    task list it is, if any), else each of `orders`."""
    sequences = [(bench.order_of(tasks), tuple(tasks))] if tasks else \
        [(k, bench.order(k)) for k in orders]
    for _, seq in sequences:
        bench.sequence(list(seq))
    return sequences


def quiet_transformers(args) -> None:
    if args.no_progress:  # transformers draws its own bar while loading weights
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
