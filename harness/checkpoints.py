"""Step checkpoints: a stage's training saved between two optimizer steps, so that a run stopped in
the middle of a stage (a Slurm time limit, a preemption, a kill) resumes at the step it reached
instead of at the stage's start, with the same result bit for bit.

A step checkpoint holds what training changes from step to step: the run's saved tensors (every
trainable one and every one created since the backbone was loaded), the optimizer's state, every
RNG state, the losses so far (their count is the position in the stage's data order) and the
method's `fit_state`. What a stage sets up before its first step (a new branch, a teacher snapshot,
a Fisher matrix, a replay memory, a projection memory) is rebuilt instead: the runner resumes from
the previous stage's checkpoint and runs the stage's `before_task` again under the same seed, which
gives the same state; tensors it designs are then overwritten by the saved ones.

Layout: `<run>/checkpoints/stage<k>-step<n>/` with `tensors.safetensors` (rank 0's tensors),
`optimizer.rank<r>.safetensors` (each rank's optimizer state, its own partition under ZeRO) and
`state.json`, written last, with everything else and the SHA-256 of every file. The folder is built
under a temporary name in the run folder and renamed into place, so a folder with a final name is
whole; a damaged one fails its checksums and is passed over. Only the latest is kept. Nothing is
unpickled: nested states go through `encode`/`decode` (tensors to safetensors, the rest to JSON).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from harness import faults
from harness.distributed import SINGLE, World
from harness.store import read_tensors, sha256

log = logging.getLogger(__name__)

STATE = "state.json"
TENSORS = "tensors.safetensors"


# -- nested states without pickling ---------------------------------------------------------------
def encode(obj: Any, tensors: dict[str, torch.Tensor], key: str = "") -> Any:
    """`obj` (dicts, lists, tuples, tensors, JSON scalars) as JSON, its tensors moved to `tensors`
    under path-like keys. Containers are tagged so that tuples and non-string keys come back."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()  # one copy, off the device
        return {"tensor": key}
    if isinstance(obj, dict):
        return {"dict": [[encode(k, tensors, f"{key}/k{i}"), encode(v, tensors, f"{key}/{i}")]
                         for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        items = [encode(v, tensors, f"{key}/{i}") for i, v in enumerate(obj)]
        return {"tuple" if isinstance(obj, tuple) else "list": items}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    raise TypeError(f"{key or 'state'}: cannot store a {type(obj).__name__} in a checkpoint")


def decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    (kind, value), = node.items()
    if kind == "tensor":
        return tensors[value]
    if kind == "dict":
        return {decode(k, tensors): decode(v, tensors) for k, v in value}
    if kind in ("list", "tuple"):
        items = [decode(v, tensors) for v in value]
        return tuple(items) if kind == "tuple" else items
    return value


# -- RNG states ------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


# -- preemption signals ----------------------------------------------------------------------------
class Preemption:
    """While training, SIGTERM and SIGUSR2 (what Slurm sends on preemption and before a time limit,
    and submitit forwards) only set a flag, read at the next step boundary; once the step checkpoint
    is written, `deliver` hands the signal to the handler installed before (submitit's requeue, or
    the default action: the process ends). Outside the main thread no handler can be installed and
    signals keep their handlers. A signal that comes after the last step boundary is delivered on
    leaving, so none is lost."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR2)

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "Preemption":
        if self.enabled and threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self.previous[signum] = signal.signal(signum, self._note)
        return self

    def _note(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}
        if self.received is not None:
            self.deliver()

    def deliver(self) -> None:
        """Send the received signal again, to the handlers from before."""
        signum, self.received = self.received, None
        self.__exit__()
        os.kill(os.getpid(), signum)


# -- the checkpoints of one run --------------------------------------------------------------
@dataclass
class StepCheckpoints:
    """The step checkpoints of one run folder, for the stage being trained.

    `every`: write one every that many optimizer steps (0: only when a preemption signal arrives).
    `named_tensors`: the run's saved tensors by name (the runner's SavedTensors), read at each
    save and restored in place."""

    run_path: Path
    stage: int
    every: int = 0
    named_tensors: Callable[[], dict[str, torch.Tensor]] = dict
    world: World = SINGLE

    @property
    def folder(self) -> Path:
        return self.run_path / "checkpoints"

    def name(self, step: int) -> str:
        return f"stage{self.stage:02d}-step{step:06d}"

    # -- finding ---------------------------------------------------------------------------------
    def latest(self) -> Path | None:
        """The latest whole checkpoint of this stage, or None."""
        found = sorted(self.folder.glob(f"stage{self.stage:02d}-step*"))
        for path in reversed(found):
            if is_intact(path, self.world.size):
                return path
        return None

    def resume_point(self) -> Path | None:
        """The latest whole checkpoint of this stage, every other one removed (rank 0): earlier
        stages' that a kill left before their clean-up, damaged or older ones."""
        latest = self.latest()
        self.clear(keep=latest)
        return latest

    def clear(self, keep: Path | None = None) -> None:
        """Remove every step checkpoint (rank 0) but `keep`, and the folder when none is left."""
        if self.world.main and self.folder.exists():
            for path in self.folder.iterdir():
                if path != keep:
                    shutil.rmtree(path, ignore_errors=True)
            if keep is None:
                self.folder.rmdir()

    # -- writing ---------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, params: list[torch.nn.Parameter], optimizer_state: dict[str, Any],
             method_state: dict[str, Any], losses: list[torch.Tensor]) -> Path:
        """Write the checkpoint after `step` optimizer steps of the stage (every rank its optimizer
        state, rank 0 the rest), then drop the earlier ones."""
        final = self.folder / self.name(step)
        tmp = self.run_path / f".{final.name}.tmp"  # one name all ranks agree on
        if self.world.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.world.barrier()
        try:
            optimizer_tensors: dict[str, torch.Tensor] = {}
            plain = {"optimizer": encode(optimizer_state, optimizer_tensors, "optimizer")}
            save_file(optimizer_tensors, str(tmp / f"optimizer.rank{self.world.rank}.safetensors"))
            (tmp / f"optimizer.rank{self.world.rank}.json").write_text(json.dumps(plain))
            self.world.barrier()
            if self.world.main:
                self._write_main(tmp, final, step, params, method_state, losses)
            self.world.barrier()
        except BaseException:
            if self.world.main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.clear(keep=final)
        return final

    def _write_main(self, tmp: Path, final: Path, step: int, params, method_state, losses) -> None:
        tensors: dict[str, torch.Tensor] = {}
        named = self.named_tensors()
        in_model = {id(t) for t in named.values()}
        state = {
            "stage": self.stage, "step": step, "ranks": self.world.size,
            "model": encode(named, tensors, "model"),
            # trainable tensors outside the model (a method's own), by position
            "params": encode({i: p for i, p in enumerate(params) if id(p) not in in_model},
                             tensors, "params"),
            "method": encode(method_state, tensors, "method"),
            "rng": encode(rng_state(), tensors, "rng"),
            "losses": encode(torch.stack(losses) if losses else torch.zeros(0), tensors, "losses"),
        }
        save_file(tensors, str(tmp / TENSORS))
        faults.point("step_checkpoint_write")
        state["files"] = {f.name: sha256(f) for f in sorted(tmp.iterdir())}
        (tmp / STATE).write_text(json.dumps(state))
        tmp.chmod(0o755)
        final.parent.mkdir(exist_ok=True)
        os.replace(tmp, final)

    # -- reading ---------------------------------------------------------------------------------
    def restore(self, path: Path, params: list[torch.nn.Parameter],
                load_optimizer: Callable[[dict[str, Any]], None]
                ) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """Load `path` into the tensors, the optimizer (`load_optimizer` takes this rank's state)
        and the RNGs; returns the method's fit state and the losses so far (their count is the
        steps done)."""
        state = json.loads((path / STATE).read_text())
        tensors = read_tensors(path / TENSORS)  # the method's state among them
        if self.world.main:
            log.info("%s: resuming stage %d after step %d", self.run_path, self.stage + 1,
                     state["step"])
        with torch.no_grad():
            named = self.named_tensors()
            for name, value in decode(state["model"], tensors).items():
                named[name].copy_(value)
            for index, value in decode(state["params"], tensors).items():
                params[index].copy_(value)
        rank = self.world.rank
        plain = json.loads((path / f"optimizer.rank{rank}.json").read_text())
        load_optimizer(decode(plain["optimizer"],
                              load_file(str(path / f"optimizer.rank{rank}.safetensors"))))
        set_rng_state(decode(state["rng"], tensors))
        losses = list(decode(state["losses"], tensors).unbind())
        return decode(state["method"], tensors), losses


def is_intact(path: Path, ranks: int) -> bool:
    """The folder holds every file its state.json lists, with their checksums, for `ranks` ranks."""
    try:
        state = json.loads((path / STATE).read_text())
        files = state["files"]
        if state.get("ranks") != ranks or TENSORS not in files:
            return False
        return all((path / name).is_file() and sha256(path / name) == digest
                   for name, digest in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False
