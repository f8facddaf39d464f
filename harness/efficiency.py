"""How much of the device's arithmetic a run uses: FLOPs per training step, counted once per batch
shape with `torch.utils.flop_counter`, over the stage's training time, against the device's peak.

The peak is, in order: the `HARNESS_PEAK_TFLOPS` environment variable (the machine's figure, in
TFLOP/s); on a GPU named in `PEAK_BF16_TFLOPS`, its data-sheet dense bf16 figure; otherwise a
matrix product measured once per process (bf16 on a GPU, fp32 on the CPU, the dtype the CPU trains
in), which is what the device can do on dense work with the threads the run has.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from harness.errors import HarnessError

PEAK_ENV = "HARNESS_PEAK_TFLOPS"
# Dense bf16 tensor-core TFLOP/s from the vendors' data sheets (SXM parts where there are two),
# matched as a substring of torch.cuda.get_device_name() (`sheet_peak`).
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "GH200": 989.4, "A100": 312.0, "L40S": 362.1,
                    "A10G": 70.0, "A10": 125.0, "L4": 121.0, "A6000": 154.8, "RTX 4090": 165.2,
                    "RTX 3090": 71.0, "MI300X": 1307.4, "MI250X": 383.0}


# What a run records of its efficiency: measurements of the machine and the run's course (FLOPs
# count only the steps a process ran, after a resume too), never results.
RECORDED = frozenset({"flops", "achieved_flops", "peak_flops", "peak_source", "share_of_peak",
                      "efficiency"})


@dataclass(frozen=True)
class Peak:
    flops: float     # FLOP/s
    source: str      # where the figure comes from, for the record


def peak_from_environment() -> float | None:
    """The machine's peak set by the user (FLOP/s), checked: a bad value is a clear error."""
    text = os.environ.get(PEAK_ENV, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise HarnessError(f"{PEAK_ENV}={text!r}: must be a positive number of TFLOP/s")
    return value * 1e12


_measured: dict[tuple[str, int], float] = {}


def measured_matmul(device: torch.device) -> float:
    """FLOP/s of a square matrix product on `device` (bf16 on a GPU, fp32 on the CPU): the best of
    five after a warm-up, once per process and thread count."""
    key = (str(device), torch.get_num_threads())
    if key not in _measured:
        cuda = device.type == "cuda"
        n, dtype = (8192, torch.bfloat16) if cuda else (512, torch.float32)
        generator = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
        b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
        best = float("inf")
        for k in range(6):
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            a @ b
            if cuda:
                torch.cuda.synchronize(device)
            if k:  # the first is the warm-up
                best = min(best, time.perf_counter() - start)
        _measured[key] = 2 * n ** 3 / best
    return _measured[key]


def sheet_peak(name: str) -> float | None:
    """The data-sheet dense bf16 FLOP/s of the GPU `name` (torch.cuda.get_device_name()), or None
    for one not in `PEAK_BF16_TFLOPS`; the longest matching entry wins (A10G before A10)."""
    for known in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if known in name:
            return PEAK_BF16_TFLOPS[known] * 1e12
    return None


def device_peak(device: torch.device) -> Peak:
    """The peak a run's FLOP/s is compared with (see the module's docstring)."""
    if (flops := peak_from_environment()) is not None:
        return Peak(flops, PEAK_ENV)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if (flops := sheet_peak(name)) is not None:
            return Peak(flops, f"{name}: data-sheet dense bf16")
        return Peak(measured_matmul(device), f"{name}: measured bf16 matmul")
    return Peak(measured_matmul(device), "CPU: measured fp32 matmul")


def batch_shape(batches) -> tuple:
    """What fixes a step's FLOPs: the shapes of every tensor its micro-batches hold."""
    return tuple(tuple((k, tuple(v.shape)) for k, v in sorted(batch.items())
                       if isinstance(v, torch.Tensor)) for batch in batches)


# FLOPs counted in this process, by (computation, batch shape): a job process that runs many
# runs counts each shape of each computation once.
_counted: dict[tuple, float] = {}
_counting = False  # a step is being counted now


def counting() -> bool:
    """Whether this process is counting a step now: its operations run under a dispatch mode,
    which torch.compile does not trace (and a frame it declined once stays uncompiled)."""
    return _counting


def computation_key(method_name: str, model: torch.nn.Module, trainable) -> tuple:
    """What, beside the batch shape, fixes a step's FLOPs: the method, the model's class and size
    (a LoRA branch or prompt added at a stage changes it) and how much of it trains."""
    return (method_name, type(model).__name__, sum(p.numel() for p in model.parameters()),
            sum(p.numel() for p in trainable))


class FlopCount(TorchDispatchMode):
    """The FLOPs of the operations run under it, by `torch.utils.flop_counter`'s formulas, each
    operation run as it is. The library's `FlopCounterMode` runs an operation it has no formula
    for through its decomposition, whose rounding is not the kernel's (GainLoRA's SiLU gradient:
    a counted step trained other weights than a plain one), and gives each count to the modules
    it ran in (a hook on every module's call and output), which made a counted step of the
    embedded default 4.5 times a plain one, against 2.5 times here. The same totals on the
    harness's models (tests/test_efficiency.py)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


class FlopMeter:
    """A stage's training FLOPs: the first step of each batch shape runs under a FLOP counter
    (forward, backward and what the method adds to the step: its penalty, its extra pass), and
    every later step of that computation and shape counts what it counted. Counting observes the
    operations and changes none of them; it costs that one step a few times its time on a small
    model, so the counts are kept for the process (`_counted`)."""

    def __init__(self, computation: tuple):
        self.computation = computation
        self.total = 0.0

    @contextmanager
    def step(self, shape: tuple):
        key = (self.computation, shape)
        if key in _counted:
            yield
            self.total += _counted[key]
            return
        global _counting
        _counting = True
        try:
            with FlopCount() as counter:
                yield
        finally:
            _counting = False
        _counted[key] = float(counter.total)
        self.total += _counted[key]


def stage_efficiency(flops: float, seconds: float, peak: Peak) -> dict[str, float | str]:
    """What a stage's record and the trackers show: its FLOPs, achieved FLOP/s and share of peak."""
    achieved = flops / seconds if seconds > 0 else 0.0
    return {"flops": flops, "achieved_flops": achieved, "peak_flops": peak.flops,
            "peak_source": peak.source, "share_of_peak": achieved / peak.flops}
