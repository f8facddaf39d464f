"""Data parallelism through DeepSpeed: the launcher, the world of ranks, and the engine's step.

`python -m harness run ... --launcher deepspeed --num-gpus N` starts itself again under the
DeepSpeed launcher (`deepspeed --num_gpus N --module harness run ...`); each rank then finds its
place in the environment the launcher sets (RANK, WORLD_SIZE, LOCAL_RANK), which is also how the
same entry point works when a user starts it with `deepspeed` directly. Without GPUs the ranks run
on CPU and talk over gloo.

What every rank does: train on its share of each global batch through the engine, run the methods'
consolidation passes (Fisher, projection statistics, memories) on the whole task data (so every
rank holds the same state without extra collectives), generate on its share of the evaluation
batches. Rank 0 gathers the predictions and is the only one that writes results.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness.errors import HarnessError
from harness.machine import cores_each

SHIPPED_CONFIGS = Path(__file__).resolve().parent / "ds_configs"


@dataclass(frozen=True)
class World:
    """This process's place among the ranks; the default is a single process without DeepSpeed."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    engine: bool = False              # train through the DeepSpeed engine

    @property
    def main(self) -> bool:
        return self.rank == 0

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.size if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag: bool) -> bool:
        """Whether `flag` holds on any rank (every rank gets the answer)."""
        if self.size == 1:
            return flag
        import torch.distributed as dist

        box = torch.tensor([int(flag)], device=device_for(self))
        dist.all_reduce(box, op=dist.ReduceOp.MAX)
        return bool(box.item())

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()


SINGLE = World()


def launched() -> bool:
    """True inside a process started by the DeepSpeed (or torch) launcher."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_world() -> World:
    """Join the process group the launcher set up (gloo on CPU, nccl on GPU)."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    _without_shared_memory_all_reduce()
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    else:  # ranks on one machine share its cores; more threads than cores only slows every rank
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 0)) or
                         dist.get_world_size())
        torch.set_num_threads(cores_each(local_size))
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local_rank,
                 engine=True)


def _without_shared_memory_all_reduce() -> None:
    """Keep DeepSpeed's CPU backend from building its shared-memory all-reduce. That op serves
    tensor-parallel inference only (training's collectives go through gloo either way), yet the
    backend compiles it on first use (C++, minutes on a busy machine, while every rank waits on
    the build lock) and maps 66 MB per rank in /dev/shm that it never unlinks: each launch would
    leave them behind, in memory, until the machine restarts."""
    # (the package's attribute `torch` is the torch library, not this module: import by name)
    backend = importlib.import_module("deepspeed.comm.torch")
    backend.build_shm_op = lambda: None


def device_for(world: World) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", world.local_rank)
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(argv: list[str], num_gpus: int) -> list[str]:
    """The command that runs `python -m harness <argv>` on `num_gpus` ranks of this machine."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_gpus),
            "--master_port", str(_free_port()), "--module", "harness", *argv]


# -- the DeepSpeed config --------------------------------------------------------------------------
def resolve_config_path(name: str) -> Path:
    """A shipped config by name (zero0, zero1, zero2) or a JSON file path."""
    shipped = SHIPPED_CONFIGS / f"{name}.json"
    if shipped.exists():
        return shipped
    path = Path(name)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.json")))
        raise HarnessError(f"--deepspeed-config {name}: no such file (shipped configs: {known})")
    return path


def load_config(name: str, profile, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config with its "auto" values filled from the profile: micro-batch per rank,
    accumulation, clipping and bf16. Values the file fixes must agree with the profile (a config
    that silently trained another batch size would not be the profile's run)."""
    path = resolve_config_path(name)
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HarnessError(f"{path}: not a readable DeepSpeed JSON config: {exc}") from None
    if not isinstance(config, dict):
        raise HarnessError(f"{path}: a DeepSpeed config is a JSON object, got {type(config).__name__}")
    wanted = {
        "train_micro_batch_size_per_gpu": profile.batch_size,
        "gradient_accumulation_steps": profile.grad_accum,
        "train_batch_size": profile.batch_size * profile.grad_accum * world_size,
        "gradient_clipping": float(profile.max_grad_norm),
    }
    for key, value in wanted.items():
        given = config.get(key, "auto")
        if given == "auto":
            config[key] = value
        elif given != value:
            raise HarnessError(f"{path}: {key} is {given!r} but profile {profile.name!r} gives "
                               f"{value!r}; set it to \"auto\" or change the profile (--set)")
    bf16 = config.setdefault("bf16", {})
    if bf16.get("enabled", "auto") == "auto":
        bf16["enabled"] = bool(profile.bf16)
    if config.get("fp16", {}).get("enabled") is True:
        raise HarnessError(f"{path}: fp16 is not supported (loss scaling would change the "
                           "methods' steps); use bf16")
    stage = config.setdefault("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise HarnessError(f"{path}: zero_optimization.stage {stage!r} is not supported (0, 1 or 2; "
                           "stage 3 shards the weights the methods read and write)")
    # Methods bring their own torch optimizers (AdamW with their parameter groups); the ZeRO
    # wrapper only partitions their state, which `max_zero_stage` guards per method.
    config.setdefault("zero_allow_untested_optimizer", True)
    return config


def zero_stage(config: dict[str, Any]) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def _masters(wrapper) -> list[torch.Tensor]:
    """The fp32 master partitions of DeepSpeed's ZeRO-1/2 or bf16 optimizer wrapper (none for a
    plain optimizer, whose parameters are the model's)."""
    for name in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        if hasattr(wrapper, name):
            return list(getattr(wrapper, name))
    return []


class EngineStep:
    """One training stage through the DeepSpeed engine: the engine averages gradients across
    ranks (and micro-batches), clips and steps the method's optimizer. A fresh engine per stage,
    because each stage has its own trainable parameters and a fresh optimizer."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 config: dict[str, Any], world: World):
        import deepspeed

        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self._clip_as_one_process(float(config.get("gradient_clipping", 0.0)), world)

    def _clip_as_one_process(self, max_norm: float, world: World) -> None:
        """Clip by the norm the single-process loop computes (harness.grad_norm), to the bit: on
        ZeRO-0 in fp32 in place of the engine's clipping, on ZeRO-1/2 as the norm of the rank
        partitions that the ZeRO optimizer scales by. (A bf16 ZeRO-0 run keeps DeepSpeed's.)"""
        from harness.grad_norm import clip_, global_norm

        if not max_norm:
            return
        engine, wrapper = self.engine, self.engine.optimizer
        if hasattr(wrapper, "averaged_gradients") and hasattr(wrapper, "scaled_global_norm"):
            def partition_norm(norm_type=2):
                grads = [g for i in range(len(wrapper.bit16_groups))
                         for g in (wrapper.averaged_gradients[i] or [])
                         if not getattr(g, "_zero_padding", False)]
                return global_norm(grads, world)

            wrapper.scaled_global_norm = partition_norm
        elif not (engine.bfloat16_enabled() or engine.zero_optimization()):
            # What the optimizer steps, in its order, as the plain loop clips: a method may train
            # tensors of its own beside the model's (OSFT's factors).
            stepped = [p for group in getattr(wrapper, "optimizer", wrapper).param_groups
                       for p in group["params"]]
            engine.clip_fp32_gradients = lambda: clip_(
                [p.grad for p in stepped if p.grad is not None], max_norm)

    def forward(self, batch: dict) -> Any:
        return self.engine(**batch)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        # The engine divides by its accumulation count and reduces across ranks at the boundary,
        # i.e. after this rank's last micro-batch of the step.
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    def state_dict(self) -> dict[str, Any]:
        """This rank's optimizer state for a step checkpoint: the base optimizer's (its partition
        under ZeRO) and the fp32 master copies a ZeRO or bf16 wrapper keeps beside the weights."""
        wrapper = self.engine.optimizer
        return {"base": getattr(wrapper, "optimizer", wrapper).state_dict(),
                "masters": list(_masters(wrapper))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        wrapper = self.engine.optimizer
        with torch.no_grad():
            for master, saved in zip(_masters(wrapper), state["masters"], strict=True):
                master.copy_(saved)
        getattr(wrapper, "optimizer", wrapper).load_state_dict(state["base"])

    def close(self) -> None:
        self.engine.destroy()  # removes ZeRO's gradient hooks before consolidation passes
