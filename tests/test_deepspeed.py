"""Two CPU ranks through DeepSpeed compute bitwise what one process computes with the same global
batch, for every built-in method: among them LoRA growth, regularisers, replay, full fine-tuning
and plain LoRA under ZeRO-2, gradient projection (gorp) and the gradient-memory methods (agem, with
its extra pass on a memory batch, and ogd), LFPT5 (its pseudo-examples generated on every rank,
rank 0's kept), the modifiers (two passes per step), GainLoRA (its gate corrected after each
step), OSFT (its singular subspaces) and MIGU (its output magnitudes summed over the ranks, so
every rank masks the same rows) under ZeRO-0, soft prompts (progprompt, and l2p's per-example
selection) under ZeRO-2.

One process with batch 16 x accumulation 2 and two ranks with batch 16 x accumulation 1 both average
the gradient over the same two micro-batches of every step (rank r takes micro-batch r, with the
same content, padding and shapes), the last, smaller step of an epoch included (40 examples:
32 + 8, so rank 1 runs a zero-weighted pass there). In fp32 the two are the same arithmetic: the
halving is exact, a two-rank all-reduce is one addition, and the clipping norm is computed the same
way from any split of the gradient (harness.grad_norm). The step checkpoints of two ranks resume
bitwise too.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("deepspeed")
# One worker runs this module: its runs share the fixtures, and two ranks already fill two cores.
pytestmark = pytest.mark.xdist_group("deepspeed")

TASKS = "agnews,SST-2"
TEST_PER_TASK = 32
EPOCHS = 2  # pinned, so the step counts and kill points below do not follow the profile
TWO_RANKS = ("--launcher", "deepspeed", "--num-gpus", "2")
# One built-in method of each kind, at the highest ZeRO stage it declares: one adapter (seqlora),
# full fine-tuning (seqft), growing branches with state (olora), a regulariser's state (ewc), a
# memory of data (replay), gradient memory (agem), full-rank projection (gorp), prompts (progprompt,
# lfpt5 with its generation), statistics (inflora), mixed tasks (mtl), a modifier, a gate rewritten
# after each step (gainlora), per-matrix singular subspaces (osft) and row masks from output
# magnitudes summed over the ranks (migu). The methods
# left out (inclora, nlora, lwf, pertask, ogd, l2p, seqlora+sam) share these kinds' code paths;
# `harness check-method NAME` runs the same two-rank check for any of them.
ZERO = {"olora": 2, "ewc": 2, "replay": 2, "seqft": 2, "seqlora": 2, "gorp": 0, "agem": 0,
        "lfpt5": 0, "progprompt": 2, "mtl": 2, "inflora": 2, "seqlora+rwp": 0, "gainlora": 0,
        "osft": 0, "migu": 0}


def harness(data_dir, results, *args, kill_at=None):
    """`harness run` on the two-example-task sequence; its launcher, ranks and all are killed if
    it outlives the timeout (a hang then fails this test alone, with the run's last output)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("HARNESS_KILL_AT", None)
    if kill_at:
        env["HARNESS_KILL_AT"] = kill_at
    process = subprocess.Popen(
        [sys.executable, "-m", "harness", "run", "--tasks", TASKS, "--data-dir", str(data_dir),
         "--results", str(results), "--train-per-task", "40", "--test-per-task",
         str(TEST_PER_TASK), "--set", f"train.epochs={EPOCHS}", "--no-progress", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"harness run {' '.join(args)} did not end in 300 s:\n{stdout[-2000:]}\n"
                    f"{stderr[-2000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def shared_memory_buffers() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")}


def summary(results, method):
    path = results / "default" / method / "tasks-agnews+SST-2" / "seed0"
    return json.loads((path / "summary.json").read_text()), path


@pytest.fixture(scope="module")
def two_ranks(synthetic_dir, tmp_path_factory):
    """The uninterrupted two-rank runs (their results folder): one launch per ZeRO stage."""
    results = tmp_path_factory.mktemp("two")
    before = shared_memory_buffers()
    for stage in sorted(set(ZERO.values())):
        methods = ",".join(m for m, z in ZERO.items() if z == stage)
        two = harness(synthetic_dir, results, "--all", "--methods", methods, *TWO_RANKS,
                      "--deepspeed-config", f"zero{stage}")
        assert two.returncode == 0, two.stderr[-3000:]
        assert "2 DeepSpeed rank(s)" in two.stdout
        # DeepSpeed's shared-memory all-reduce (inference only) is neither compiled nor mapped:
        # it left 66 MB per rank in /dev/shm at every launch.
        assert "shm_comm_op built" not in two.stdout
    assert shared_memory_buffers() <= before
    return results


@pytest.fixture(scope="module")
def one_process(synthetic_dir, tmp_path_factory):
    results = tmp_path_factory.mktemp("one")
    one = harness(synthetic_dir, results, "--all", "--jobs", "1", "--methods", ",".join(ZERO),
                  "--set", "train.grad_accum=2")
    assert one.returncode == 0, one.stderr[-3000:]
    return results


@pytest.mark.parametrize("method", list(ZERO))
def test_two_cpu_ranks_compute_what_one_process_computes(two_ranks, one_process, method):
    single, one_dir = summary(one_process, method)
    ranks, run_dir = summary(two_ranks, method)
    assert ranks["accuracy_matrix"] == single["accuracy_matrix"]
    final = [d for d in sorted(run_dir.glob("stage_*")) if (d / "model.safetensors").exists()]
    tensors = load_file(str(final[-1] / "model.safetensors"))
    expected = load_file(str(one_dir / final[-1].name / "model.safetensors"))
    assert tensors.keys() == expected.keys()
    assert all(torch.equal(tensors[k], expected[k]) for k in tensors)
    # The run is recorded as what it was: two ranks, its ZeRO stage, the same global batch of 32.
    config = json.loads((run_dir / "config.json").read_text())
    assert config["deepspeed"]["ranks"] == 2
    assert config["deepspeed"]["config"]["zero_optimization"]["stage"] == ZERO[method]
    assert config["deepspeed"]["config"]["train_batch_size"] == 32
    # Rank 0 gathered every rank's predictions, once each, and was the only writer.
    for stage in sorted(run_dir.glob("stage_*")):
        lines = (stage / "predictions.jsonl").read_text().splitlines()
        keys = [(r["task"], r["index"]) for r in map(json.loads, lines)]
        assert len(keys) == len(set(keys)) == 2 * TEST_PER_TASK
    first = sorted(run_dir.glob("stage_*"))[1]
    metrics = json.loads((first / "metrics.json").read_text())
    assert metrics["train"]["ranks"] == 2
    examples = 80 if first.name.endswith("-all") else 40  # MTL's one stage trains on both tasks
    assert metrics["train"]["steps"] == EPOCHS * -(-examples // 32)  # epochs x (32 + 8 examples)


def test_two_ranks_stopped_inside_a_stage_resume_bitwise(synthetic_dir, tmp_path, two_ranks):
    """SIGTERM reaches both ranks at step 3 of stage 1 (of 4: EPOCHS x 2 steps), after the
    periodic checkpoint of step 2: both write their part of one step checkpoint (each its ZeRO-2
    optimizer partition and fp32 master copy) in its place, and the resumed run goes on after step
    3 and ends bitwise as the uninterrupted one. (A SIGKILL after a periodic checkpoint resumes
    through the same files; it is tested in one process, test_step_checkpoints.py: a two-rank
    launch costs 38 s of CPU.)"""
    from tests.test_step_checkpoints import assert_same, outcome

    every = ("--set", "train.checkpoint_every=2")
    zero2 = ("--method", "seqlora", *TWO_RANKS, "--deepspeed-config", "zero2")
    stopped = harness(synthetic_dir, tmp_path, *zero2, *every, kill_at="train_step:3:TERM")
    assert stopped.returncode != 0
    (checkpoint,) = (tmp_path / "default" / "seqlora" / "tasks-agnews+SST-2" / "seed0" /
                     "checkpoints").iterdir()
    assert checkpoint.name.endswith("-step000003")
    assert {f.name for f in checkpoint.iterdir()} >= {
        "optimizer.rank0.safetensors", "optimizer.rank1.safetensors", "tensors.safetensors"}
    resumed = harness(synthetic_dir, tmp_path, *zero2, *every)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming stage 1 after step 3" in resumed.stderr
    assert_same(outcome(tmp_path, "seqlora"), outcome(two_ranks, "seqlora"))


def test_the_contracts_two_rank_check_asks_for_these_launches_and_compares_their_results(
        two_ranks, one_process, tmp_path, monkeypatch):
    """`harness check-method NAME` (check_two_ranks) for a plugin: the same two launches as this
    module's (two ranks at the method's highest ZeRO stage up to 2, one process with accumulation
    2, one thread each), compared on the accuracy matrix and the final tensors; given this module's
    runs instead of launching again, it passes, and fails where the one process's run differs."""
    from harness.store import RunDir
    from harness.testing import contract

    asked, one_method = [], ["seqlora"]

    def launch(names, results, data_dir, tasks, train, extra, env):
        asked.append((names, tasks, train, extra, env))
        two = "--launcher" in extra
        return [RunDir(summary(two_ranks if two else one_process, names[0] if two else
                               one_method[0])[1])]
    monkeypatch.setattr(contract, "launch", launch)
    trial = contract.Trial("seqlora", tmp_path, tmp_path / "unused")
    assert contract.check_two_ranks(trial) == "ZeRO-2: same accuracy matrix and bitwise the same tensors"
    tasks, one_thread = ("agnews", "SST-2"), {"OMP_NUM_THREADS": "1"}
    assert asked == [
        (["seqlora"], tasks, 40, (*TWO_RANKS, "--deepspeed-config", "zero2"), one_thread),
        (["seqlora"], tasks, 40, ("--set", "train.grad_accum=2"), one_thread)]
    one_method[0] = "replay"  # another method's result in place of the one process's
    with pytest.raises(contract.ContractError, match="two ranks under ZeRO-2"):
        contract.check_two_ranks(trial)
