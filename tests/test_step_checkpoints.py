"""Step checkpoints: a run stopped inside a stage (a preemption signal, or a kill after a periodic
checkpoint) resumes at the step it reached, and ends bitwise as the uninterrupted run: the
accuracy matrix, every stage's training record and the final tensors; the summary but its timings.
Here with real signals, each interrupted run a process of its own, for a modifier that draws from
its own generator every step and A-GEM, whose memory batches do too; every method's step checkpoint
(the LoRA growth methods' included) is resumed in the plugin contract (tests/test_contract.py), in
one process."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from harness import efficiency
from harness.checkpoints import Preemption, decode, encode, is_intact
from tests.test_kill_resume import PER_STAGE, harness_run, run_dir, uninterrupted

# 32 examples a task: PER_STAGE optimizer steps per stage, twice that in the run. The kill steps are
# drawn once (seeded), each inside a stage (never its last step, after which nothing of the stage
# is left to resume).
METHODS = ["seqlora+rwp", "agem"]
_draw = random.Random(22)
KILLS = {m: sorted(_draw.sample([s for s in range(1, 2 * PER_STAGE) if s != PER_STAGE], 2))
         for m in METHODS}
EVERY_2 = "train.checkpoint_every=2"
# Not results: timings, and whether the base row was evaluated by this run or shared in a sweep.
TIMINGS = {"seconds", "train_seconds", "eval_seconds", "train_eval_seconds", "prepare_seconds",
           "consolidate_seconds", "reused", *efficiency.RECORDED}


def resumed_at(first: int, second: int, every: int = 2, per_stage: int = PER_STAGE) -> int | None:
    """The step (within its stage) a run killed at global step `second` resumes after: the latest
    checkpoint of that stage written before the kill (a periodic one, or the SIGTERM one at
    `first`), None if the stage has none (it starts again)."""
    stage, position = divmod(second - 1, per_stage)
    written = [k for k in range(every, position + 1, every)]
    if (first - 1) // per_stage == stage:
        written.append((first - 1) % per_stage + 1)
    return max(written, default=None)


def untimed(record):
    if isinstance(record, dict):
        return {k: untimed(v) for k, v in record.items() if k not in TIMINGS and k != "files"}
    return record


def outcome(results, method):
    """What must not depend on interruptions: summary and stage records without timings, the
    accuracy matrix file, the final checkpoint's tensors."""
    rd = run_dir(results, method)
    stages = {d.name: untimed(json.loads((d / "metrics.json").read_text()))
              for d in rd.stage_folders()}
    tensors = load_file(str(rd.stage_folders()[-1] / "model.safetensors"))
    return (untimed(json.loads(rd.summary_path.read_text())), stages,
            (rd.path / "accuracy_matrix.csv").read_text(), tensors)


def assert_same(found, expected):
    *records, tensors = found
    *expected_records, expected_tensors = expected
    assert records == expected_records
    assert tensors.keys() == expected_tensors.keys()
    assert all(torch.equal(tensors[k], expected_tensors[k]) for k in tensors)


@pytest.mark.parametrize("method", METHODS)
def test_a_run_stopped_inside_a_stage_resumes_at_its_step(synthetic_dir, tmp_path, method):
    every = ("--set", EVERY_2)
    uninterrupted(synthetic_dir, tmp_path / "whole", method, (EVERY_2,))
    first, second = KILLS[method]
    results = tmp_path / "stopped"
    # SIGTERM (Slurm's preemption): a checkpoint at the next step boundary, then the process ends.
    stopped = harness_run(synthetic_dir, results, method, f"train_step:{first}:TERM", extra=every)
    assert stopped.returncode == -15, stopped.stderr[-2000:]
    (checkpoint,) = (run_dir(results, method).path / "checkpoints").iterdir()
    stopped_step = (first - 1) % PER_STAGE + 1
    assert checkpoint.name.endswith(f"-step{stopped_step:06d}") and is_intact(checkpoint, 1)
    # SIGKILL after the resumed run passed a few more steps: back to the last periodic checkpoint.
    killed = harness_run(synthetic_dir, results, method, f"train_step:{second - first}", extra=every)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = harness_run(synthetic_dir, results, method, extra=every)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    step = resumed_at(first, second)
    assert (f"after step {step}\n" in resumed.stderr) if step else ("after step" not in resumed.stderr)
    assert_same(outcome(results, method), outcome(tmp_path / "whole", method))
    assert not (run_dir(results, method).path / "checkpoints").exists()  # gone with the stage


def test_a_damaged_step_checkpoint_is_passed_over(synthetic_dir, tmp_path):
    """A checkpoint whose files no longer match their checksums is never resumed from: the stage
    starts again (here from its start, the only other place there is)."""
    every = ("--set", EVERY_2)
    uninterrupted(synthetic_dir, tmp_path / "whole", "seqlora", (EVERY_2,))
    results = tmp_path / "damaged"
    assert harness_run(synthetic_dir, results, "seqlora", "train_step:3", extra=every).returncode == -9
    (checkpoint,) = (run_dir(results, "seqlora").path / "checkpoints").iterdir()
    data = bytearray((checkpoint / "tensors.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (checkpoint / "tensors.safetensors").write_bytes(bytes(data))
    assert not is_intact(checkpoint, 1)
    resumed = harness_run(synthetic_dir, results, "seqlora", extra=every)
    assert resumed.returncode == 0 and "after step" not in resumed.stderr
    assert_same(outcome(results, "seqlora"), outcome(tmp_path / "whole", "seqlora"))


def test_nested_states_round_trip_without_pickling():
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, 2)}, 1: {"n": 4}},
             "param_groups": [{"betas": (0.9, 0.999), "lr": 1e-3, "params": [0, 1], "name": None}]}
    tensors = {}
    plain = json.loads(json.dumps(encode(state, tensors)))
    back = decode(plain, tensors)
    assert back["param_groups"] == state["param_groups"]  # tuples and int keys come back
    assert isinstance(back["param_groups"][0]["betas"], tuple) and set(back["state"]) == {0, 1}
    assert torch.equal(back["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    with pytest.raises(TypeError, match="cannot store a object"):
        encode({"x": object()}, {})


def test_a_signal_after_the_last_step_is_not_lost():
    import os
    import signal

    seen = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))
    try:
        with Preemption() as preemption:
            os.kill(os.getpid(), signal.SIGUSR2)
            assert preemption.received == signal.SIGUSR2 and not seen  # held at the boundary
        assert seen == [signal.SIGUSR2]  # handed to the handler from before on leaving
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_the_checkpoint_interval_is_no_part_of_a_run_configuration():
    """A run started without step checkpoints may be resumed with them (and the other way)."""
    from harness.profiles import load_profile

    assert load_profile("default", ["train.checkpoint_every=5"]).as_dict() == \
        load_profile("default").as_dict()
    assert load_profile("t5-large").checkpoint_every > 0  # on for the paper profiles


def test_method_state_is_read_into_memory_of_its_own(tmp_path):
    """safetensors packs tensors at 4-byte offsets; a method's state is read into separate
    allocations, aligned as a tensor the run computed (LAPACK's result can depend on it)."""
    from safetensors.torch import save_file

    from harness.store import read_tensors

    save_file({"a": torch.ones(3), "b": torch.arange(12.0).reshape(3, 4)}, str(tmp_path / "s"))
    tensors = read_tensors(tmp_path / "s")
    assert torch.equal(tensors["b"], torch.arange(12.0).reshape(3, 4))
    assert all(t.data_ptr() % 64 == 0 and t.untyped_storage().nbytes() == t.nbytes
               for t in tensors.values())
