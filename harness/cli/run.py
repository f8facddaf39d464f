"""`harness run`: train and evaluate methods on task sequences, here, in side-by-side jobs, under the
DeepSpeed launcher, or as a job array."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from harness.cli.common import (int_list, jobs_arg, positive, quiet_transformers, run_options,
                                setup_arguments, shard_arg, str_list, task_sequences)
from harness.errors import HarnessError
from harness.machine import cores_each


def add_arguments(sub) -> None:
    run = sub.add_parser("run", help="train and evaluate methods on task sequences")
    _what_arguments(run)
    setup_arguments(run)
    _output_arguments(run)
    _where_arguments(run)


def _what_arguments(run) -> None:
    """Which runs: methods, sequences, seeds, and how each is evaluated."""
    what = run.add_mutually_exclusive_group()
    what.add_argument("--method", help="one method (see `list methods`)")
    what.add_argument("--all", action="store_true", help="every method x order x seed of the sweep")
    run.add_argument("--methods", type=str_list, help="with --all: methods (default: all registered)")
    seq = run.add_mutually_exclusive_group()
    seq.add_argument("--order", type=int, help="task order 1-6")
    seq.add_argument("--tasks", type=str_list, help="custom task sequence, e.g. dbpedia,amazon")
    run.add_argument("--orders", type=int_list, help="with --all: orders, e.g. 1-3 or 1,4 (default: 1-6)")
    run.add_argument("--seed", type=int, help="seed (default 0)")
    run.add_argument("--seeds", type=int_list, help="with --all: seeds, e.g. 0-2 (default: 0)")
    run.add_argument("--tuned", type=Path, metavar="FILE", help="apply the settings `harness tune` "
                     "chose (its tuned.json) to every method; the tables mark such runs")
    run.add_argument("--eval-scope", choices=["all", "seen+next"], default="all",
                     help="after each stage evaluate every task (default; the whole accuracy "
                     "matrix) or only the tasks seen so far and the next one (what AA, LA, BWT, "
                     "forgetting and FWT need; the base and last rows stay whole)")
    run.add_argument("--eval-split", choices=["test", "heldout"], default="test",
                     help="score on the test split (default), or on records of train.json that the "
                     "training sub-sample left out (stratified, seeded): the split to choose "
                     "learning rates and other settings on, never the test set")


def _output_arguments(run) -> None:
    """Where results and live curves go."""
    run.add_argument("--results", type=Path, default=Path("results"), help="results root")
    run.add_argument("--force", action="store_true", help="re-run complete runs from scratch")
    run.add_argument("--report-to", metavar="TRACKERS",
                     help="log live training curves, stage rows and results to these trackers: "
                     "tensorboard (into each run's folder; `tensorboard --logdir RESULTS`), mlflow "
                     "(RESULTS/mlflow.db, or --mlflow-uri), wandb (offline unless WANDB_MODE is "
                     "set), a comma-separated list, or none (default: the profile's [tracking] "
                     "report_to, else none)")
    run.add_argument("--mlflow-uri", metavar="URI", help="with --report-to mlflow: the tracking "
                     "server or store (default: sqlite:///RESULTS/mlflow.db)")


def _where_arguments(run) -> None:
    """Where and how the runs are carried out: shards, side-by-side jobs, a job array, ranks."""
    run.add_argument("--shard", type=shard_arg, help="with --all: run the share i/N of the sweep "
                     "(0 <= i < N; e.g. a Slurm array task id), a deterministic round-robin split")
    run.add_argument("--jobs", type=jobs_arg, default="auto", help="run J runs at once, one process "
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
    run.add_argument("--num-gpus", type=positive, help="with --launcher deepspeed: ranks on this "
                     "machine (default: every visible GPU; CPU ranks when there is none)")
    run.add_argument("--deepspeed-config", metavar="NAME|FILE", help="zero0, zero1, zero2 (shipped; "
                     "default: the profile's) or a DeepSpeed JSON file; \"auto\" values are filled "
                     "from the profile")


def handle(args) -> int:
    from harness import sweep
    from harness.benchmark import load_benchmark
    from harness.distributed import SINGLE, launch_command

    _check_run_flags(args)
    methods, sequences, seeds = _sweep_contents(args, load_benchmark())
    options = _checked_options(args, methods)
    slurm = _slurm_parameters(args) if args.executor else None  # checked before anything is written
    world, runner = _runner(args, options)
    for name in methods:
        runner.create_method(name)  # unknown names, bad settings and combinations fail first
    if "mlflow" in options.report_to and world.main:
        from harness.tracking import prepare_mlflow

        prepare_mlflow(args.results, options.mlflow_uri)
    everything = sweep.expand(methods, sequences, seeds, args.profile)
    if args.executor and world.main:
        return _submit(args, runner, _plan(args, options, everything), slurm)
    if world is SINGLE and args.launcher == "deepspeed":
        import subprocess

        import torch

        ranks = args.num_gpus or max(1, torch.cuda.device_count())
        return subprocess.call(launch_command(args.argv, ranks))
    if args.all and world.main:  # so that `harness status` lists the runs not started yet
        from harness.status import record_sweep

        record_sweep(args.results, [runner.run_dir(s).path for s in everything], args.argv)
    specs = sweep.expand(methods, sequences, seeds, args.profile, args.shard)
    code = _carry_out(args, runner, _plan(args, options, specs), world)
    if code == 0 and args.all and world.main and args.shard is None:
        _print_leaderboard(args.results, args.profile)
    return code


def _checked_options(args, methods: list[str]):
    """The run options, with `--tuned` read and checked for the methods, and the trackers'."""
    tuned = None
    if args.tuned:
        from harness.tune import tuned_settings

        tuned = tuned_settings(args.tuned, args.profile, methods)
    options = run_options(args, results=args.results, deepspeed_config=args.deepspeed_config,
                          eval_scope=args.eval_scope, eval_split=args.eval_split, tuned=tuned,
                          **_trackers(args))
    quiet_transformers(args)
    return options


def _plan(args, options, specs):
    """The sweep plan: the runs, profile and options (and, to submit under `--launcher deepspeed`,
    the command line each task's ranks run)."""
    from dataclasses import replace

    from harness.sweep import SweepPlan, without

    ranks_argv = None
    if args.executor:
        options = replace(options, progress=False)  # an array task's log takes no bars
        if args.launcher == "deepspeed":
            ranks_argv = tuple(without(args.argv, ("--executor", "--slurm", "--jobs", "--shard"),
                                       flags=("--wait",)))
    return SweepPlan(args.profile, options, tuple(specs), force=args.force, ranks_argv=ranks_argv,
                     num_gpus=args.num_gpus)


def _carry_out(args, runner, plan, world) -> int:
    """The runs here, one after another, or in side-by-side job processes (`--jobs`)."""
    from harness import sweep

    specs = list(plan.specs)
    jobs = args.jobs if args.jobs != "auto" else sweep.auto_jobs(len(specs), world)
    if world.main:
        ranks = f"; {world.size} DeepSpeed rank(s)" if world.engine else ""
        split = f" ({jobs} jobs x {cores_each(jobs)} thread(s))" if jobs > 1 else ""
        print(f"benchmark: {runner.data_kind} ({runner.data_dir}); profile: {args.profile}{ranks}; "
              f"{len(specs)} run(s){split} -> {args.results}", flush=True)
    if jobs > 1:
        return sweep.run_in_jobs(plan, jobs, progress=not args.no_progress)
    return sweep.run_here(runner, specs, force=args.force, progress=not args.no_progress,
                          world=world)


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
        return [args.method], task_sequences(bench, args.tasks, [args.order]), [seed]
    methods = args.methods or [m for m in registry.available()  # modifiers only run combined
                               if not issubclass(registry.method_class(m), Modifier)]
    return methods, task_sequences(bench, args.tasks, args.orders or sorted(bench.orders)), \
        args.seeds or [seed]


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


def _slurm_parameters(args) -> dict:
    """The job array's settings: the profile's [slurm] section and `--slurm`, parsed once."""
    from harness.executor import slurm_parameters

    overrides = [o for o in args.overrides if not o.startswith("method.")]
    return slurm_parameters(args.profile, overrides, args.slurm,
                            args.num_gpus if args.launcher == "deepspeed" else None)


def _submit(args, runner, plan, slurm: dict) -> int:
    """`--executor`: the sweep as one job array (one run per task), recorded for `harness status`."""
    from harness import executor
    from harness.status import record_sweep

    specs = plan.specs
    jobs = executor.submit(args.executor, plan, slurm, args.results, "--slurm")
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
