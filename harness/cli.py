"""Command line: `python -m harness {run,tune,import,list,table,generate,prepare,new-method,check-method}`.

Any bad input ends with exit code 2 and one line that names the argument or file and the problem.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

from harness.errors import HarnessError

log = logging.getLogger("harness")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2
        raise HarnessError(f"{self.prog}: {message}")


def _int_list(text: str) -> list[int]:
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


def _shard(text: str) -> tuple[int, int]:
    """'i/N' with 0 <= i < N: this process runs every N-th run of the sweep, starting at i."""
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected i/N (e.g. 0/4), got {text!r}")
    if count < 1 or not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"expected 0 <= i < N in i/N, got {text!r}")
    return index, count


def _jobs(text: str) -> int | str:
    return "auto" if text == "auto" else _positive(text)


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _setup_arguments(parser: argparse.ArgumentParser) -> None:
    """What `run` and `tune` share: the profile, data, model, budget and overrides."""
    parser.add_argument("--profile", default="default", help="profile (see `list profiles`)")
    parser.add_argument("--data-dir", type=Path, help="data in the O-LoRA layout (default: "
                        "synthetic; or $HARNESS_DATA_DIR)")
    parser.add_argument("--model", help="local checkpoint folder (default: the profile's model)")
    parser.add_argument("--train-per-task", type=_positive, help="training examples per task")
    parser.add_argument("--test-per-task", type=_positive, help="test examples per task")
    parser.add_argument("--drop-unlabelled", action="store_true", help="drop records whose label "
                        "is not in labels.json (default: keep, scored wrong)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a profile setting (train.batch_size=8, lora.r=16) or the "
                        "method's (method.lr=1e-4); repeatable, recorded in each run's config.json")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _bounds(text: str, form: str, example: str, equal: bool) -> tuple[float, float]:
    """LOW,HIGH as two positive floats, LOW < HIGH (or LOW <= HIGH with `equal`); `text` is the
    whole argument, for the message."""
    try:
        low, high = (float(x) for x in text.rpartition("=")[2].split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {form} (e.g. {example}), got {text!r}")
    if not (0 < low <= high if equal else 0 < low < high):
        raise argparse.ArgumentTypeError(f"expected 0 < LOW {'<=' if equal else '<'} HIGH, got {text!r}")
    return low, high


def _key_range(text: str) -> tuple[str, tuple[float, float]]:
    key, sep, _ = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=LOW,HIGH (e.g. lambda1=1e-5,1e-1), got {text!r}")
    return key, _bounds(text, "KEY=LOW,HIGH", "lambda1=1e-5,1e-1", equal=True)


def _lr_range(text: str) -> tuple[float, float]:
    return _bounds(text, "LOW,HIGH", "1e-5,1e-2", equal=False)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="harness", description="Continual-learning benchmark harness")
    # The DeepSpeed launcher passes --local_rank before the subcommand; the rank comes from the
    # environment it sets, so the value itself is not needed.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="train and evaluate methods on task sequences")
    what = run.add_mutually_exclusive_group()
    what.add_argument("--method", help="one method (see `list methods`)")
    what.add_argument("--all", action="store_true", help="every method x order x seed of the sweep")
    run.add_argument("--methods", type=_str_list, help="with --all: methods (default: all registered)")
    seq = run.add_mutually_exclusive_group()
    seq.add_argument("--order", type=int, help="task order 1-6")
    seq.add_argument("--tasks", type=_str_list, help="custom task sequence, e.g. dbpedia,amazon")
    run.add_argument("--orders", type=_int_list, help="with --all: orders, e.g. 1-3 or 1,4 (default: 1-6)")
    run.add_argument("--seed", type=int, help="seed (default 0)")
    run.add_argument("--seeds", type=_int_list, help="with --all: seeds, e.g. 0-2 (default: 0)")
    run.add_argument("--results", type=Path, default=Path("results"), help="results root")
    _setup_arguments(run)
    run.add_argument("--report-to", metavar="TRACKERS",
                     help="log live training curves, stage rows and results to these trackers: "
                     "tensorboard (into each run's folder; `tensorboard --logdir RESULTS`), mlflow "
                     "(RESULTS/mlflow.db, or --mlflow-uri), wandb (offline unless WANDB_MODE is "
                     "set), a comma-separated list, or none (default: the profile's [tracking] "
                     "report_to, else none)")
    run.add_argument("--mlflow-uri", metavar="URI", help="with --report-to mlflow: the tracking "
                     "server or store (default: sqlite:///RESULTS/mlflow.db)")
    run.add_argument("--tuned", type=Path, metavar="FILE", help="apply the settings `harness tune` "
                     "chose (its tuned.json) to every method; the tables mark such runs")
    run.add_argument("--shard", type=_shard, help="with --all: run the share i/N of the sweep "
                     "(0 <= i < N; e.g. a Slurm array task id), a deterministic round-robin split")
    run.add_argument("--force", action="store_true", help="re-run complete runs from scratch")
    run.add_argument("--eval-scope", choices=["all", "seen+next"], default="all",
                     help="after each stage evaluate every task (default; the whole accuracy "
                     "matrix) or only the tasks seen so far and the next one (what AA, LA, BWT, "
                     "forgetting and FWT need; the base and last rows stay whole)")
    run.add_argument("--eval-split", choices=["test", "heldout"], default="test",
                     help="score on the test split (default), or on records of train.json that the "
                     "training sub-sample left out (stratified, seeded): the split to choose "
                     "learning rates and other settings on, never the test set")
    run.add_argument("--jobs", type=_jobs, default="auto", help="run J runs at once, one process "
                     "each, with the CPU threads divided between them; auto (default): one per "
                     "core on a machine without a GPU (a small model keeps one core busy better "
                     "than two), else 1")
    run.add_argument("--executor", choices=["slurm", "local"], help="with --all: submit the sweep "
                     "as a job array through submitit, one run per array task (slurm: from a login "
                     "node; local: the same jobs as local processes), then return (or --wait)")
    run.add_argument("--slurm", metavar="KEY=VALUE,...", help="with --executor: job settings, e.g. "
                     "partition=gpu,gpus_per_node=8,cpus_per_task=8,mem=64G,time=24:00:00,"
                     "array_parallelism=16; other keys become #SBATCH --key=value (default: the "
                     "profile's [slurm] section; time 24:00:00)")
    run.add_argument("--wait", action="store_true", help="with --executor: wait for the array, then "
                     "print the leaderboard")
    run.add_argument("--launcher", choices=["none", "deepspeed"], default="none",
                     help="deepspeed: train every run data-parallel through the DeepSpeed engine")
    run.add_argument("--num-gpus", type=_positive, help="with --launcher deepspeed: ranks on this "
                     "machine (default: every visible GPU; CPU ranks when there is none)")
    run.add_argument("--deepspeed-config", metavar="NAME|FILE", help="zero0, zero1, zero2 (shipped; "
                     "default: the profile's) or a DeepSpeed JSON file; \"auto\" values are filled "
                     "from the profile")

    tune = sub.add_parser("tune", help="choose each method's learning rate and coefficient on a "
                          "held-out split of train.json, with the same budget for every method")
    tune.add_argument("--methods", type=_str_list, required=True, help="e.g. seqlora,olora,ewc")
    seq = tune.add_mutually_exclusive_group()
    seq.add_argument("--orders", type=_int_list, default=[1], help="orders to score each trial "
                     "on (default 1; AA averaged over them)")
    seq.add_argument("--tasks", type=_str_list, help="a custom task sequence instead")
    tune.add_argument("--trials", type=_positive, default=8, help="trials per method (default 8)")
    tune.add_argument("--seed", type=int, default=0, help="the runs' seed and the sampler's")
    tune.add_argument("--lr-range", type=_lr_range, default=(1e-5, 1e-2), metavar="LOW,HIGH",
                      help="the learning rate's range, log-uniform, the same for every method")
    tune.add_argument("--range", dest="ranges", type=_key_range, action="append", default=[],
                      metavar="KEY=LOW,HIGH", help="another range for one searched setting "
                      "(lambda1=1e-5,1e-1; lr=3e-4,3e-4 pins it); repeatable")
    tune.add_argument("--out", type=Path, default=Path("results/tune"),
                      help="where the trials' runs, the study and tuned.json go")
    tune.add_argument("--storage", help="an Optuna storage URL that several processes or "
                      "machines share (default: sqlite:///OUT/study.db)")
    _setup_arguments(tune)

    imp = sub.add_parser("import", help="read another codebase's outputs into the results store")
    imp.add_argument("kind", choices=["olora"], help="olora: O-LoRA, N-LoRA or GORP output folder")
    imp.add_argument("source", type=Path, metavar="DIR", help="folder of <stage>-<task> sub-folders")
    imp.add_argument("--method", required=True, help="method name to file the run under")
    imp.add_argument("--order", type=int, required=True, help="task order 1-6 of the run")
    imp.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    imp.add_argument("--profile", default="default", help="profile (see `list profiles`)")
    imp.add_argument("--results", type=Path, default=Path("results"), help="results root")
    imp.add_argument("--model", help="backbone label, as given to `run --model` (to share its tables)")
    imp.add_argument("--data-dir", type=Path, help="the real data the run used (or $HARNESS_DATA_DIR)")
    imp.add_argument("--force", action="store_true", help="replace a run already in the target folder")

    lst = sub.add_parser("list", help="print tasks, orders, methods or profiles")
    lst.add_argument("what", choices=["tasks", "orders", "methods", "profiles"])

    table = sub.add_parser("table", help="leaderboards (paper layout, full, vs published) and plots")
    table.add_argument("--results", type=Path, default=Path("results"))
    table.add_argument("--profile", help="only this profile")
    table.add_argument("--format", choices=["github", "latex", "csv"], default="github")
    table.add_argument("--layout", choices=["paper", "full", "all"], default="all",
                       help="paper: methods x orders; full: every metric and significance")
    table.add_argument("--reference", help="also test every method against this one, e.g. olora")
    table.add_argument("--compare-published", action="store_true",
                       help="add our AA beside the published numbers in baselines/")
    table.add_argument("--published-backbone", default="t5-large",
                       help="backbone of the published numbers to compare with (default t5-large)")
    table.add_argument("--out", type=Path,
                       help="write every table as .md, .tex and .csv, and the plots, into this folder")

    status = sub.add_parser("status", help="where every run of a sweep stands: complete, running, "
                            "failed, k of T stages, or not started (and its Slurm state)")
    status.add_argument("--results", type=Path, default=Path("results"))
    status.add_argument("--json", action="store_true", help="one JSON object per run")

    report = sub.add_parser("report", help="one self-contained HTML page: tables, published "
                            "numbers, every plot and each run's provenance")
    report.add_argument("--results", type=Path, default=Path("results"))
    report.add_argument("--out", type=Path, help="folder for index.html (default: RESULTS/report)")
    report.add_argument("--profile", help="only this profile")
    report.add_argument("--reference", help="also test every method against this one, e.g. olora")
    report.add_argument("--published-backbone", default="t5-large",
                        help="backbone of the published numbers to compare with (default t5-large)")

    new = sub.add_parser("new-method", help="write a method plugin package: method, config, test")
    new.add_argument("name")
    new.add_argument("--out", type=Path, help="a new folder for the plugin package (without it: "
                     "a built-in method, only in a development clone of the harness)")

    check = sub.add_parser("check-method", help="run the plugin contract on a registered method")
    check.add_argument("name", help="a method name (a modifier is checked on top of seqlora)")
    check.add_argument("--skip", type=_str_list, default=[],
                       help="checks to leave out, comma-separated (e.g. two_ranks)")
    check.add_argument("--keep", type=Path, help="keep the checks' runs in this folder")

    prep = sub.add_parser("prepare", help="build a profile's backbone once (the embedded default "
                          "is pretrained, a GGUF file converted) and the data it needs")
    prep.add_argument("--profile", default="default", help="profile (see `list profiles`)")
    prep.add_argument("--data-dir", type=Path, help="data in the O-LoRA layout (default: "
                      "synthetic; or $HARNESS_DATA_DIR)")
    prep.add_argument("--model", help="local checkpoint folder (default: the profile's model)")
    prep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a profile setting (embedded.pretrain_steps=800)")

    gen = sub.add_parser("generate", help="write the synthetic benchmark")
    gen.add_argument("--out", type=Path, help="output folder (default: CL_Benchmark/synthetic)")
    gen.add_argument("--train", type=_positive, default=1000, help="train records per task")
    gen.add_argument("--test", type=_positive, default=200, help="test records per task")
    gen.add_argument("--seed", type=int, default=0)
    return parser


def cmd_list(args) -> None:
    from tabulate import tabulate

    from harness.benchmark import load_benchmark
    from harness.profiles import available, load_profile
    from harness_methods import registry

    bench = load_benchmark()
    if args.what == "tasks":
        rows = [(t.name, t.category, t.folder, len(t.labels), ", ".join(t.labels))
                for t in bench.tasks.values()]
        print(tabulate(rows, headers=["task", "category", "folder", "#labels", "labels"]))
    elif args.what == "orders":
        print(tabulate([(k, len(v), "; ".join(bench.also_called(k)) or "-", " -> ".join(v))
                        for k, v in bench.orders.items()],
                       headers=["order", "#tasks", "also called", "sequence"]))
    elif args.what == "methods":
        rows = []
        for name, ep in registry.available().items():
            cls = registry.method_class(name)
            doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
            rows.append((name, ep.value, doc[0] if doc else ""))
        print(tabulate(rows, headers=["method", "plugin", "description"]))
    else:
        print(tabulate([(n, load_profile(n).description) for n in available()],
                       headers=["profile", "description"]))


def _check_run_flags(args) -> None:
    """Combinations of `run` arguments that cannot mean anything."""
    from harness.distributed import launched

    for seed in (args.seeds or []) + ([args.seed] if args.seed is not None else []):
        if not 0 <= seed < 2**63:
            raise HarnessError(f"run: --seed {seed} is out of range (0 <= seed < 2**63)")
    if not args.executor and (args.slurm or args.wait):
        raise HarnessError("run: --slurm and --wait only apply with --executor")
    if args.executor and (args.shard or args.jobs not in ("auto", 1)):
        raise HarnessError("run: --executor runs each run as an array task; it takes no --shard "
                           "or --jobs")
    if args.slurm:
        from harness.executor import executor_parameters, parse_slurm

        executor_parameters(parse_slurm(args.slurm), "--slurm")
    if args.executor == "slurm" and shutil.which("sbatch") is None:
        raise HarnessError("run: --executor slurm needs Slurm's sbatch on the PATH (run it on a "
                           "login node of the cluster)")
    if not args.all:
        extra = [f"--{n}" for n in ("methods", "orders", "seeds", "shard", "executor")
                 if getattr(args, n)]
        extra += ["--jobs"] if args.jobs not in ("auto", 1) else []
        if extra:
            raise HarnessError(f"run: {', '.join(extra)} only apply with --all")
        if not args.method:
            raise HarnessError("run: give --method NAME or --all")
        if args.order is None and not args.tasks:
            raise HarnessError("run: give --order K or --tasks a,b,c")
    if args.tasks and args.orders:
        raise HarnessError("run: give --orders or --tasks, not both")
    if args.launcher != "deepspeed" and not launched():
        for name in ("num_gpus", "deepspeed_config"):
            if getattr(args, name) is not None:
                raise HarnessError(f"run: --{name.replace('_', '-')} only applies with "
                                   "--launcher deepspeed")
    if args.jobs not in ("auto", 1) and (args.launcher == "deepspeed" or launched()):
        raise HarnessError("run: --jobs runs single-process runs side by side; with --launcher "
                           "deepspeed every run already uses all ranks")
    if args.results.exists() and not args.results.is_dir():
        raise HarnessError(f"--results {args.results}: not a directory")


def _trackers(args) -> dict:
    """`--report-to` and `--mlflow-uri`, else the profile's [tracking] settings."""
    from harness.tracking import parse_report_to, profile_tracking

    settings = profile_tracking(args.profile,
                                [o for o in args.overrides if not o.startswith("method.")])
    report_to = settings.report_to if args.report_to is None else parse_report_to(args.report_to)
    if args.mlflow_uri and "mlflow" not in report_to:
        raise HarnessError("run: --mlflow-uri only applies with --report-to mlflow")
    return {"report_to": report_to, "mlflow_uri": args.mlflow_uri or settings.mlflow_uri}


def _sweep_contents(args, bench) -> tuple[list[str], list[tuple[int | None, tuple[str, ...]]], list[int]]:
    """(methods, (order, tasks) sequences, seeds) that the arguments ask for."""
    from harness_methods import registry
    from harness_methods.modifier import Modifier

    seed = 0 if args.seed is None else args.seed
    if not args.all:
        return [args.method], _sequences(bench, args.tasks, [args.order]), [seed]
    methods = args.methods or [m for m in registry.available()  # modifiers only run combined
                               if not issubclass(registry.method_class(m), Modifier)]
    return methods, _sequences(bench, args.tasks, args.orders or sorted(bench.orders)), \
        args.seeds or [seed]


def _sequences(bench, tasks: list[str] | None,
               orders: list[int]) -> list[tuple[int | None, tuple[str, ...]]]:
    """(order, tasks) of each sequence asked for, checked: the `--tasks` list (the order whose
    task list it is, if any), else each of `orders`."""
    sequences = [(bench.order_of(tasks), tuple(tasks))] if tasks else \
        [(k, bench.order(k)) for k in orders]
    for _, seq in sequences:
        bench.sequence(list(seq))
    return sequences


def _run_options(args, **fields):
    """Options from the arguments `run` and `tune` share, and `fields` besides."""
    from harness.runner import Options

    method_sets = [o for o in args.overrides if o.split("=", 1)[0].startswith("method.")]
    return Options(data_dir=args.data_dir, model=args.model,
                   train_per_task=args.train_per_task, test_per_task=args.test_per_task,
                   drop_unlabelled=args.drop_unlabelled, progress=not args.no_progress,
                   profile_overrides=tuple(o for o in args.overrides if o not in method_sets),
                   method_overrides=tuple(method_sets), **fields)


def _quiet_transformers(args) -> None:
    if args.no_progress:  # transformers draws its own bar while loading weights
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _runner(args, options):
    """The world this process is part of and its runner; the DeepSpeed config is read (and
    refused if bad) here, before any rank starts."""
    from harness.distributed import SINGLE, init_world, launched, load_config
    from harness.runner import runner_for

    world = init_world() if launched() else SINGLE
    runner = runner_for(args.profile, options, world)
    if world is SINGLE and args.launcher == "deepspeed":  # the ZeRO stage is checked per method
        runner.engine_config = load_config(args.deepspeed_config or runner.profile.deepspeed_config,
                                           runner.profile, 1)
    return world, runner


def cmd_run(args) -> int:
    from harness import sweep
    from harness.benchmark import load_benchmark
    from harness.distributed import SINGLE, launch_command

    _check_run_flags(args)
    bench = load_benchmark()
    methods, sequences, seeds = _sweep_contents(args, bench)
    tuned = None
    if args.tuned:
        from harness.tune import tuned_settings

        tuned = tuned_settings(args.tuned, args.profile, methods)
    options = _run_options(args, results=args.results, deepspeed_config=args.deepspeed_config,
                           eval_scope=args.eval_scope, eval_split=args.eval_split, tuned=tuned,
                           **_trackers(args))
    _quiet_transformers(args)
    world, runner = _runner(args, options)
    for name in methods:
        runner.create_method(name)  # unknown names, bad settings and combinations fail first
    if "mlflow" in options.report_to and world.main:
        from harness.tracking import prepare_mlflow

        prepare_mlflow(args.results, options.mlflow_uri)
    everything = sweep.expand(methods, sequences, seeds, args.profile)
    if args.executor and world.main:
        return _submit(args, runner, everything)
    if world is SINGLE and args.launcher == "deepspeed":
        import subprocess

        import torch

        ranks = args.num_gpus or max(1, torch.cuda.device_count())
        return subprocess.call(launch_command(args.argv, ranks))
    if args.all and world.main:  # so that `harness status` lists the runs not started yet
        from harness.status import record_sweep

        record_sweep(args.results, [runner.run_dir(s).path for s in everything], args.argv)
    specs = sweep.expand(methods, sequences, seeds, args.profile, args.shard)
    jobs = args.jobs if args.jobs != "auto" else sweep.auto_jobs(len(specs), world)
    if world.main:
        ranks = f"; {world.size} DeepSpeed rank(s)" if world.engine else ""
        split = f" ({jobs} jobs x {sweep.threads_per_job(jobs)} thread(s))" if jobs > 1 else ""
        print(f"benchmark: {runner.data_kind} ({runner.data_dir}); profile: {args.profile}{ranks}; "
              f"{len(specs)} run(s){split} -> {args.results}", flush=True)
    if jobs > 1:
        code = sweep.run_in_jobs(args.profile, options, specs, jobs, force=args.force,
                                 progress=not args.no_progress)
    else:
        code = sweep.run_here(runner, specs, force=args.force, progress=not args.no_progress,
                              world=world)
    if code == 0 and args.all and world.main and args.shard is None:
        _print_leaderboard(args.results, args.profile)
    return code


def _submit(args, runner, specs) -> int:
    """`--executor`: the sweep as one job array (one run per task), recorded for `harness status`."""
    from harness import executor
    from harness.status import record_sweep
    from harness.sweep import without

    settings = {**executor.profile_slurm(runner.profile.name, runner.profile.overrides),
                **executor.parse_slurm(args.slurm or "")}
    if args.launcher == "deepspeed" and args.num_gpus:
        settings.setdefault("gpus_per_node", str(args.num_gpus))
        if settings["gpus_per_node"].isdigit() and int(settings["gpus_per_node"]) < args.num_gpus:
            raise HarnessError(f"--slurm gpus_per_node={settings['gpus_per_node']}: each task "
                               f"starts --num-gpus {args.num_gpus} ranks; give at least as many GPUs")
    argv = without(args.argv, ("--executor", "--slurm", "--jobs", "--shard"), flags=("--wait",))
    jobs = executor.submit(args.executor, main, argv, len(specs), settings, args.results, "--slurm")
    job_id = str(jobs[0].job_id).split("_")[0]
    folders = [runner.run_dir(s).path for s in specs]
    runs = [str(folder.relative_to(args.results)) for folder in folders]  # task i runs runs[i]
    record_sweep(args.results, folders, args.argv,
                 slurm={"executor": args.executor, "job_id": job_id, "tasks": runs})
    print(f"submitted {len(specs)} run(s) as job array {job_id} ({args.executor}); logs in "
          f"{args.results / 'slurm'}; watch: python -m harness status --results {args.results}",
          flush=True)
    if not args.wait:
        return 0
    failed = [(run, error) for run, error in zip(runs, executor.wait(args.executor, jobs)) if error]
    for run, error in failed:
        print(f"failed: {run}: {error}", file=sys.stderr)
    print(f"done: {len(specs) - len(failed)} of {len(specs)} run(s) complete", flush=True)
    if failed:
        return 1
    _print_leaderboard(args.results, args.profile)
    return 0


def _print_leaderboard(results: Path, profile: str) -> None:
    """The end of a sweep: the paper-layout table of what the results folder now holds, and the
    report page of it."""
    from harness import table
    from harness.report import write_report

    runs = table.load_summaries(results, profile) if results.is_dir() else None
    if runs is None or runs.empty:
        return
    text = table.paper_table(runs)
    if text:
        print(f"\n{text}\n", flush=True)
    page = write_report(results, results / "report", profile=profile)
    print(f"report (every table, plot and run): {page}\n(tables as .md, .tex and .csv: "
          f"python -m harness table --results {results} --out DIR)", flush=True)


def cmd_tune(args) -> None:
    from harness import tune
    from harness.benchmark import load_benchmark
    from harness.distributed import SINGLE
    from harness.runner import runner_for

    bench = load_benchmark()
    sequences = _sequences(bench, args.tasks, args.orders)
    if args.out.exists() and not args.out.is_dir():
        raise HarnessError(f"--out {args.out}: not a directory")
    _quiet_transformers(args)
    runner = runner_for(args.profile, _run_options(args, eval_split="heldout"), SINGLE)
    for name in args.methods:
        runner.create_method(name)  # unknown names and bad settings fail first
        tune.search_space(name, args.profile, args.lr_range, dict(args.ranges))
    setup = {"profile": args.profile, "sequences": [list(seq) for _, seq in sequences],
             "seed": args.seed, "trials": args.trials, "lr_range": list(args.lr_range),
             **({"ranges": {k: list(v) for k, v in args.ranges}} if args.ranges else {}),
             "train_per_task": args.train_per_task or runner.profile.train_per_task,
             "test_per_task": args.test_per_task or runner.profile.test_per_task,
             "data_dir": str(runner.data_dir), "model": args.model or runner.profile.model,
             "overrides": list(args.overrides), "split": "heldout"}
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
              f"{result['trial'] + 1})", flush=True)
    print(f"tuned settings -> {path}; apply them with `harness run ... --tuned {path}`")


def _metric(value: float | None) -> str:
    return "missing" if value is None else f"{value:.2f}"


def cmd_import(args) -> None:
    from harness.importer import import_olora

    summary = import_olora(args.source, method=args.method, order=args.order, seed=args.seed,
                           profile=args.profile, results=args.results, force=args.force,
                           model=args.model, data_dir=args.data_dir)
    m = summary.metrics
    print(f"{summary.method:10s} {summary.sequence:12s} seed{summary.seed}  "
          f"AA {_metric(m['AA'])}  BWT {_metric(m.get('BWT'))}  (imported)", flush=True)


def cmd_table(args) -> None:
    from harness.table import leaderboard

    layouts = ("paper", "full") if args.layout == "all" else (args.layout,)
    layouts += ("compare",) if args.compare_published else ()
    options = dict(profile=args.profile, layouts=layouts, reference=args.reference,
                   backbone=args.published_backbone)
    if not args.out:
        print("\n\n".join(leaderboard(args.results, fmt=args.format, **options).values()))
        return
    from harness.plots import write_all
    from harness.store import write_atomic

    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HarnessError(f"--out {args.out}: cannot create it ({exc.strerror or exc})") from exc
    for fmt, suffix in (("github", "md"), ("latex", "tex"), ("csv", "csv")):
        for name, text in leaderboard(args.results, fmt=fmt, **options).items():
            write_atomic(args.out / f"{name}.{suffix}", text + "\n")
            if fmt == "github":
                print(text + "\n")
    plots = write_all(args.results, args.out / "plots", profile=args.profile)
    print(f"tables (.md, .tex, .csv) and {len(plots)} plot files written to {args.out}")


def cmd_status(args) -> None:
    from harness.status import format_status, sweep_status

    statuses = sweep_status(args.results)
    print(json.dumps([vars(s) for s in statuses], indent=1) if args.json else format_status(statuses))


def cmd_report(args) -> None:
    from harness.report import write_report

    page = write_report(args.results, args.out or args.results / "report", profile=args.profile,
                        reference=args.reference, backbone=args.published_backbone)
    print(f"report: {page}")


def cmd_prepare(args) -> None:
    from harness.runner import Options, runner_for

    start = time.perf_counter()
    runner = runner_for(args.profile, Options(data_dir=args.data_dir, model=args.model,
                                              profile_overrides=tuple(args.overrides)))
    path = runner.model_path()
    print(f"profile {args.profile}: backbone {path}; data {runner.data_dir} "
          f"({time.perf_counter() - start:.0f}s)")


def cmd_generate(args) -> None:
    from harness.paths import synthetic_data_dir
    from harness.synthetic import generate

    out = generate(args.out or synthetic_data_dir(), n_train=args.train, n_test=args.test,
                   seed=args.seed)
    print(f"synthetic benchmark written to {out}")


def cmd_new_method(args) -> None:
    from harness import scaffold

    if args.out is None:
        written = scaffold.new_builtin_method(args.name)
        print(f"no --out: wrote a built-in method into the development clone {scaffold.PROJECT_ROOT}")
        install, tests = scaffold.PROJECT_ROOT, f"tests/test_method_{args.name}.py"
    else:
        written = scaffold.new_plugin_package(args.name, args.out)
        install, tests = args.out, args.out
    for path in written:
        print(f"wrote {path}")
    print(f"next: pip install -e {install} (registers the entry point), then pytest {tests}, "
          f"harness check-method {args.name} and harness run --method {args.name} --order 1")


def cmd_check_method(args) -> int:
    from harness.testing.contract import check_method, runnable_name

    print(f"checking method {runnable_name(args.name)!r} against the plugin contract", flush=True)
    results = check_method(args.name, tuple(args.skip), workdir=args.keep,
                           report=lambda r: print(r.line(), flush=True))
    failed = sum(r.passed is False for r in results)
    print(f"{len(results) - failed} of {len(results)} checks passed or did not apply; "
          f"{failed} failed" if failed else f"all {len(results)} checks passed or did not apply")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "datasets", "transformers", "peft", "DeepSpeed", "fontTools", "mlflow",
                  "alembic"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # peft still calls a transformers API deprecated for v6; nothing a user can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # DeepSpeed's ZeRO calls a torch.distributed API deprecated in torch 2.x; nothing to act on.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    from harness.sweep import without

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        args.argv = without(argv, ("--local_rank", "--local-rank"))
        handler = {"run": cmd_run, "import": cmd_import, "list": cmd_list, "table": cmd_table,
                   "report": cmd_report, "status": cmd_status, "generate": cmd_generate, "prepare": cmd_prepare,
                   "new-method": cmd_new_method,
                   "check-method": cmd_check_method, "tune": cmd_tune}[args.command]
        code = handler(args) or 0
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted: complete stages are kept; run the same command again to resume",
              file=sys.stderr)
        code = 130
    from harness.distributed import launched

    if launched() and "torch.distributed" in sys.modules:
        # A rank leaves without tearing down the process group: gloo's teardown at interpreter
        # exit aborts a rank whose peer already left ("terminate called without an active
        # exception"), which the launcher would report as a failure of a finished run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code

