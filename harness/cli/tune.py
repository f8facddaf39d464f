"""`harness tune`: each method's learning rate and coefficient, chosen on a held-out split of
train.json with the same budget for every method."""

from __future__ import annotations

from pathlib import Path

from harness.cli.common import (int_list, key_range, lr_range, positive, quiet_transformers,
                                run_options, setup_arguments, str_list, task_sequences)
from harness.errors import HarnessError


def add_arguments(sub) -> None:
    tune = sub.add_parser("tune", help="choose each method's learning rate and coefficient on a "
                          "held-out split of train.json, with the same budget for every method")
    tune.add_argument("--methods", type=str_list, required=True, help="e.g. seqlora,olora,ewc")
    seq = tune.add_mutually_exclusive_group()
    seq.add_argument("--orders", type=int_list, default=[1], help="orders to score each trial "
                     "on (default 1; AA averaged over them)")
    seq.add_argument("--tasks", type=str_list, help="a custom task sequence instead")
    tune.add_argument("--trials", type=positive, default=8, help="trials per method (default 8)")
    tune.add_argument("--seed", type=int, default=0, help="the runs' seed and the sampler's")
    tune.add_argument("--lr-range", type=lr_range, default=(1e-5, 1e-2), metavar="LOW,HIGH",
                      help="the learning rate's range, log-uniform, the same for every method")
    tune.add_argument("--range", dest="ranges", type=key_range, action="append", default=[],
                      metavar="KEY=LOW,HIGH", help="another range for one searched setting "
                      "(lambda1=1e-5,1e-1; lr=3e-4,3e-4 pins it); repeatable")
    tune.add_argument("--out", type=Path, default=Path("results/tune"),
                      help="where the trials' runs (and per method a CSV of them), the study, "
                      "tuned.json and its table tuned.md go")
    tune.add_argument("--storage", help="an Optuna storage URL that several processes or "
                      "machines share (default: sqlite:///OUT/study.db)")
    setup_arguments(tune)


def handle(args) -> None:
    from harness import tune
    from harness.benchmark import load_benchmark
    from harness.distributed import SINGLE
    from harness.runner import runner_for

    bench = load_benchmark()
    sequences = task_sequences(bench, args.tasks, args.orders)
    if args.out.exists() and not args.out.is_dir():
        raise HarnessError(f"--out {args.out}: not a directory")
    quiet_transformers(args)
    # A trial is scored by its AA alone: only the last row is evaluated after the base row.
    options = run_options(args, eval_split="heldout", eval_scope="last")
    runner = runner_for(args.profile, options, SINGLE)
    for name in args.methods:
        runner.create_method(name)  # unknown names and bad settings fail first
        tune.search_space(name, args.profile, args.lr_range, dict(args.ranges))
    setup = tuning_setup(args, runner, sequences)
    storage = tune.open_storage(args.storage) if args.storage else None
    args.out.mkdir(parents=True, exist_ok=True)
    storage = storage or tune.open_storage(f"sqlite:///{(args.out / 'study.db').resolve()}")
    path = args.out / tune.TUNED_FILE
    print(f"tuning {len(args.methods)} method(s) x {args.trials} trial(s) on the held-out split of "
          f"{runner.data_kind} data ({runner.data_dir}); study: {storage.url}", flush=True)
    for name in args.methods:
        result = tune.tune_method(runner, name, sequences, setup, storage, args.out)
        tune.write_tuned(path, setup, name, result)
        chosen = "  ".join(f"{k} {v:.3g}" for k, v in result["settings"].items())
        print(f"{name}: {chosen}  (held-out AA {result['heldout_AA']:.2f}, trial "
              f"{tune.chosen_trial(result)})", flush=True)
    print(f"tuned settings -> {path} (a table of them: {args.out / tune.CHOICES_FILE}); apply "
          f"them with `harness run ... --tuned {path}`")


def tuning_setup(args, runner, sequences) -> dict:
    """What a study records and only continues: budget, search, data (its digest: the folder may
    lie elsewhere on another machine sharing the study), model and settings."""
    tasks = tuple(sorted({t for _, seq in sequences for t in seq}))
    return {"profile": args.profile, "sequences": [list(seq) for _, seq in sequences],
            "seed": args.seed, "trials": args.trials, "lr_range": list(args.lr_range),
            **({"ranges": {k: list(v) for k, v in args.ranges}} if args.ranges else {}),
            "train_per_task": args.train_per_task or runner.profile.train_per_task,
            "test_per_task": args.test_per_task or runner.profile.test_per_task,
            "data_dir": str(runner.data_dir), "data": runner.data_identity(tasks),
            "model": args.model or runner.profile.model,
            "overrides": list(args.overrides), "split": "heldout"}
