"""`run --all --executor slurm|local`: a sweep as a job array, through submitit.

Array task i runs run i of the sweep's plan (harness.sweep.SweepPlan) by the function a local job
process calls, or under the DeepSpeed launcher when `--launcher deepspeed` asks for it. When Slurm is
about to stop a task (its time limit, or preemption), submitit requeues it and the run resumes at
its last complete stage; a task that Slurm requeues on its own (`scontrol requeue`, a node
failure) starts the same call again, with the same effect. Job logs go to `RESULTS/slurm/`.
`--executor local` runs the same array as local processes (submitit's local executor), for
trying a submission without a cluster.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from harness.errors import HarnessError
from harness.machine import cores_each

if TYPE_CHECKING:  # pragma: no cover
    from harness.sweep import SweepPlan

try:  # the job object is pickled for the cluster: its class must exist without submitit too
    from submitit.helpers import Checkpointable
except ImportError:  # pragma: no cover
    Checkpointable = object

# --slurm keys submitit takes as they are; any other key becomes an extra `#SBATCH --key=value`.
GENERIC = {"gpus_per_node", "cpus_per_task", "nodes", "mem_gb", "timeout_min"}  # whole numbers
SLURM_NUMBERS = {"array_parallelism", "signal_delay_s"}
SBATCH = {"partition", "account", "qos", "constraint", "gres", "exclude", "nodelist", "mem",
          "mem_per_cpu", "mem_per_gpu", "cpus_per_gpu", "gpus_per_task", "comment", "wckey",
          "mail_type", "mail_user", "exclusive"}
DEFAULT_TIME = "24:00:00"


def parse_slurm(text: str, where: str = "--slurm") -> dict[str, str]:
    """'partition=gpu,gpus_per_node=8,time=24:00:00' -> {key: value}."""
    settings = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise HarnessError(f"{where} {text}: expected key=value pairs, e.g. "
                               "partition=gpu,gpus_per_node=8,time=24:00:00")
        settings[key.strip()] = value.strip()
    return settings


def minutes(text: str, where: str) -> int:
    """A Slurm time limit (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in whole minutes, rounded up."""
    days, _, clock = text.rpartition("-")
    parts = clock.split(":")
    if not all(p.isdigit() for p in [*parts, *([days] if days else [])]) or len(parts) > 3:
        raise HarnessError(f"{where}: time={text} is not a Slurm time limit (e.g. 24:00:00, 2-00:00)")
    numbers = [int(p) for p in parts]
    if days:
        hours, mins, secs = (numbers + [0, 0])[:3]
    else:
        hours, mins, secs = {1: (0, numbers[0], 0), 2: (0, *numbers), 3: tuple(numbers)}[len(numbers)]
    return max(1, int(days or 0) * 1440 + hours * 60 + mins + (secs > 0))


def profile_slurm(profile: str, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
    """The profile file's [slurm] section: the `--slurm` settings as TOML (partition = "gpu",
    gpus_per_node = 8, time = "24:00:00", ...), checked (a bad one names the file)."""
    from harness.profiles import profile_section

    section, where = profile_section(profile, "slurm", overrides)
    if not isinstance(section, dict) or not all(
            isinstance(v, (str, int)) and not isinstance(v, bool) for v in section.values()):
        raise HarnessError(f"{where}: [slurm] takes settings like partition = \"gpu\" and "
                           f"gpus_per_node = 8, got {section!r}")
    settings = {key: str(value) for key, value in section.items()}
    executor_parameters(settings, f"{where}: [slurm]")  # a bad value fails here, not at submission
    return settings


def executor_parameters(settings: dict[str, str], where: str) -> dict:
    """submitit's parameters for the `--slurm` settings (the time limit defaults to a day)."""
    params: dict = {"timeout_min": minutes(settings.get("time", DEFAULT_TIME), where)}
    extra = {}
    for key, value in settings.items():
        if key == "time":
            continue
        if key in GENERIC | SLURM_NUMBERS:
            if not value.isdigit():
                raise HarnessError(f"{where}: {key}={value} must be a whole number")
            params[key if key in GENERIC else f"slurm_{key}"] = int(value)
        elif key in SBATCH:
            params[f"slurm_{key}"] = value
        else:
            extra[key] = value
    if extra:
        params["slurm_additional_parameters"] = extra
    _check_meaning(params, where)
    return params


def _check_meaning(params: dict, where: str) -> None:
    """Values Slurm would accept but that cannot be what a sweep means."""
    for key in ("cpus_per_task", "slurm_array_parallelism", "nodes"):
        if params.get(key) == 0:
            raise HarnessError(f"{where}: {key.removeprefix('slurm_')}=0 would run nothing; give 1 "
                               "or more")
    delay = params.get("slurm_signal_delay_s")
    if delay is not None and delay >= params["timeout_min"] * 60:
        raise HarnessError(
            f"{where}: signal_delay_s={delay} is not below the time limit "
            f"({params['timeout_min']} min): every task would be told to stop as it starts, and "
            "requeued again and again")


class SweepTask(Checkpointable):
    """One array task: run `index` of the sweep plan (harness.sweep), in this process by the same
    function a local job process calls, or, under `--launcher deepspeed`, on the ranks the
    DeepSpeed launcher starts with the plan's command line and this task's shard. Requeued by
    submitit (Checkpointable: the same call again) when Slurm is about to stop it."""

    def __init__(self, plan: "SweepPlan", threads: int):
        self.plan, self.threads = plan, threads

    def __call__(self, index: int, count: int) -> str:
        from harness import sweep

        sweep.start_job_process(self.threads)
        if self.plan.ranks_argv is None:
            line = sweep.run_one(self.plan, index)
            print(line, flush=True)
            return line
        import torch

        from harness.distributed import launch_command

        ranks = self.plan.num_gpus or max(1, torch.cuda.device_count())
        argv = [*self.plan.ranks_argv, "--shard", f"{index}/{count}", "--jobs", "1", "--no-progress"]
        code = subprocess.call(launch_command(argv, ranks))
        if code:
            raise RuntimeError(f"run {index} of {count}: its DeepSpeed ranks exited with code {code} "
                               "(their log: this job's .out and .err files)")
        return f"run {index} of {count} done on {ranks} rank(s)"


def submit(kind: str, plan: "SweepPlan", params: dict, results: Path, where: str):
    """Submit the plan's runs as one job array, task i running run i; `params` are submitit's
    (`slurm_parameters`). Returns the submitit jobs."""
    import submitit

    runs = len(plan.specs)
    if kind == "slurm":  # a task's CPU threads: the CPUs Slurm gives it
        threads = params.get("cpus_per_task", 1)
    else:  # the cores divided between the tasks that run at once
        at_once = min(runs, params.get("slurm_array_parallelism", runs))
        threads = cores_each(at_once)
    executor = submitit.AutoExecutor(folder=Path(results).resolve() / "slurm" / "%j", cluster=kind)
    executor.update_parameters(name="harness", **params)
    try:
        return executor.map_array(SweepTask(plan, threads), range(runs), [runs] * runs)
    except (subprocess.CalledProcessError, OSError, RuntimeError) as exc:
        raise HarnessError(f"{where}: submitting the job array failed ({str(exc).strip()})") from exc


def slurm_parameters(profile: str, overrides, text: str | None, num_gpus: int | None = None) -> dict:
    """submitit's parameters for a submission: the profile's [slurm] section, then `--slurm`
    (`text`) over it, checked once; with `num_gpus` (DeepSpeed ranks per run) the GPUs a task
    needs."""
    settings = {**profile_slurm(profile, overrides), **parse_slurm(text or "")}
    if num_gpus:
        settings.setdefault("gpus_per_node", str(num_gpus))
        if settings["gpus_per_node"].isdigit() and int(settings["gpus_per_node"]) < num_gpus:
            raise HarnessError(f"--slurm gpus_per_node={settings['gpus_per_node']}: each task "
                               f"starts --num-gpus {num_gpus} ranks; give at least as many GPUs")
    return executor_parameters(settings, "--slurm")


ENDED = {"completed", "failed", "cancelled", "timeout", "node_fail", "out_of_memory", "boot_fail",
         "deadline", "preempted"}
ACTIVE = {"pending", "configuring", "running", "completing", "suspended", "requeued", "resizing"}


def slurm_states(job_id: str, tasks: int) -> dict[int, str]:
    """Each of the `tasks` array tasks' state (lower case) while Slurm remembers it: `squeue -t
    all` (finished tasks too, for MinJobAge), then, for the tasks it no longer lists, `sacct`
    where accounting is on."""
    states: dict[int, str] = {}
    for command in (["squeue", "--noheader", "--array", "-t", "all", "-j", job_id, "-o", "%i %T"],
                    ["sacct", "--noheader", "-X", "-P", "-j", job_id, "-o", "JobID,State"]):
        if len(states) >= tasks:
            break
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        for line in out.splitlines():
            task, _, state = line.replace("|", " ").partition(" ")
            index = task.rpartition("_")[2]
            if index.isdigit() and state.split():
                states.setdefault(int(index), state.split()[0].lower())
    return states


def array_states(record: dict) -> dict[str, str]:
    """Each run's Slurm state, for a submission `harness status` found recorded."""
    if record.get("executor") != "slurm":
        return {}
    tasks = record["tasks"]
    return {tasks[i]: state for i, state in slurm_states(record["job_id"], len(tasks)).items()
            if i < len(tasks)}


def wait(kind: str, jobs: list, poll: float = 2.0) -> list[str | None]:
    """Wait for every task of the array; each one's error, or None. A task that Slurm ended
    without a result (cancelled, failed on its node) counts as ended: submitit alone would wait
    for it forever on a cluster without accounting. A task whose result is written counts once
    Slurm no longer lists it as active, so that `harness status` after the wait reads it ended."""
    errors: dict[int, str | None] = {}
    job_id = str(jobs[0].job_id).split("_")[0]
    while len(errors) < len(jobs):
        states = slurm_states(job_id, len(jobs)) if kind == "slurm" else {}
        for index, job in enumerate(jobs):
            if index in errors:
                continue
            if job.done() and states.get(index) not in ACTIVE:
                error = job.exception()
                errors[index] = None if error is None else str(error).strip().splitlines()[-1]
            elif states.get(index) in ENDED:
                errors[index] = f"Slurm ended the task: {states[index]}"
        if len(errors) < len(jobs):
            time.sleep(poll)
    return [errors[i] for i in range(len(jobs))]
