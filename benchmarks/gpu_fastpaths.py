"""Fast paths for LoRA training on a GPU, measured side by side in one process.

    python benchmarks/gpu_fastpaths.py [--shape t5-large|tiny] [--source-len 128] [--budget 480]
                                       [--out benchmarks/RESULTS-gpu-fastpaths.md]

A T5 of the t5-large shape (random weights, built on the device: no checkpoint, no data) with
LoRA r8 on q,v (dropout 0.1) trains on fixed-shape batches of random tokens (sources of
`--source-len` tokens, targets of 8: the shape a length bucket gives). Every variant runs the same
step as the harness's plain loop (forward, backward, clip at 1.0, fused AdamW) and is timed over
the same number of steps after its warm-up (which includes any compilation):

* eager, fp32 weights: the plain path, fp32 and under bf16 autocast;
* eager, frozen weights in bf16 (LoRA factors stay fp32): autocast no longer casts every weight
  at every step;
* SDPA attention instead of the eager softmax(QK^T)V;
* the whole step captured in one CUDA graph (`torch.cuda.graph`, capturable fused AdamW): the
  fixed-shape case, no host work per step;
* `torch.compile` of the model, default mode and "reduce-overhead" (CUDA graphs of the compiled
  forward and backward).

FLOPs per step are counted once per shape with `torch.utils.flop_counter.FlopCounterMode`; the
share of peak is against the data-sheet dense bf16 figure and against a bf16 matmul measured in
this run. A profiler pass over the eager step says how many kernels a step launches and how busy
the GPU is, which is what bounds a small batch. Variants run in order of priority until
`--budget` seconds have passed; each row is written as soon as it is measured. With
`--shape tiny` it runs on a CPU (its test, `--only eager`: a few seconds; the compiled variants take
minutes there, compiling C++).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness.efficiency import measured_matmul, sheet_peak  # noqa: E402 (torch only)

SHAPES = {
    "t5-large": dict(d_model=1024, d_ff=4096, num_heads=16, d_kv=64, num_layers=24,
                     num_decoder_layers=24, vocab_size=32128),
    "tiny": dict(d_model=64, d_ff=128, num_heads=2, d_kv=32, num_layers=2, num_decoder_layers=2,
                 vocab_size=512),
}
# Causal shapes (Llama family): SmolLM2-135M's configuration, and a tiny one for the CPU test.
CAUSAL_SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         tie_word_embeddings=True, max_position_embeddings=2048),
    "tiny-causal": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, vocab_size=512,
                        tie_word_embeddings=True),
}
TARGET_LEN = 8


@dataclass(frozen=True)
class Variant:
    name: str
    batch: int
    amp: bool = True            # bf16 autocast
    bf16_base: bool = False     # frozen weights stored in bf16
    attn: str = "eager"         # "eager" or "sdpa"
    mode: str = "eager"         # "eager", "graph", "compile", "reduce-overhead"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(shape: str, variant: Variant, device: torch.device):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    if shape in CAUSAL_SHAPES:
        config = LlamaConfig(**CAUSAL_SHAPES[shape], pad_token_id=0, eos_token_id=1)
        with device:
            model = LlamaForCausalLM._from_config(config, attn_implementation=variant.attn)
        lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1,
                          target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    else:
        config = T5Config(**SHAPES[shape], dropout_rate=0.1, feed_forward_proj="relu",
                          decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        with device:
            model = T5ForConditionalGeneration._from_config(config,
                                                            attn_implementation=variant.attn)
        lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=["q", "v"],
                          task_type="SEQ_2_SEQ_LM")
    model = get_peft_model(model, lora)
    if variant.bf16_base:
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    model.train()
    return model


def batches(shape: str, batch: int, source_len: int, device, count: int = 4):
    """Fixed-shape batches; a causal model reads prompt and target in one sequence and is scored
    on the target's positions only."""
    g = torch.Generator().manual_seed(1)
    causal = shape in CAUSAL_SHAPES
    vocab = (CAUSAL_SHAPES if causal else SHAPES)[shape]["vocab_size"]
    out = []
    for _ in range(count):
        ids = torch.randint(2, vocab, (batch, source_len), generator=g)
        labels = torch.randint(2, vocab, (batch, TARGET_LEN), generator=g)
        if causal:
            ids = torch.cat([ids, labels], dim=1)
            labels = ids.clone()
            labels[:, :source_len] = -100
        out.append(dict(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                        labels=labels.to(device)))
    return out


class Stepper:
    """One training step as the harness's plain loop takes it, in the variant's execution mode."""

    def __init__(self, model, variant: Variant, device):
        self.model, self.variant, self.device = model, variant, device
        self.params = [p for p in model.parameters() if p.requires_grad]
        cuda = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, fused=cuda or None,
                                           capturable=variant.mode == "graph" and cuda)
        self.forward = model
        if variant.mode in ("compile", "reduce-overhead"):
            self.forward = torch.compile(model, mode=None if variant.mode == "compile"
                                         else "reduce-overhead")
        self.graph = None

    def _step(self, batch, cache=True):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.variant.amp,
                            cache_enabled=cache):
            loss = self.forward(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        return loss

    def eager(self, batch):
        loss = self._step(batch)
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def capture(self, batch):
        """Warm up on a side stream, then capture forward, backward, clip and AdamW in one graph
        (PyTorch's whole-network capture); replays read the static batch."""
        self.static = {k: v.clone() for k, v in batch.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.optimizer.zero_grad(set_to_none=True)
                self._step(self.static, cache=False)
        torch.cuda.current_stream().wait_stream(side)
        self.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_loss = self._step(self.static, cache=False)

    def __call__(self, batch):
        if self.variant.mode != "graph" or self.device.type != "cuda":
            return self.eager(batch)
        if self.graph is None:
            self.capture(batch)
        for k, v in batch.items():
            self.static[k].copy_(v)
        self.graph.replay()
        return self.static_loss.detach()


def step_flops(model, batch, amp: bool, device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = model(**batch).loss
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def profile_step(stepper: Stepper, data, device, steps: int = 3) -> dict:
    """Kernels launched per step, GPU busy time against wall time, and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            stepper(data[i % len(data)])
        sync(device)
    wall = (time.perf_counter() - start) / steps
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time for e in kernels) / 1e6 / steps
    table = prof.key_averages().table(sort_by="cuda_time_total" if device.type == "cuda"
                                      else "cpu_time_total", row_limit=12)
    return dict(kernels_per_step=len(kernels) / steps, gpu_busy_s=busy, wall_s=wall, table=table)


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.start = time.perf_counter()
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.flops: dict[int, float] = {}
        self.profile_table = ""  # the profiler table of `--profile-variant`, once measured
        name = torch.cuda.get_device_name() if self.device.type == "cuda" else "CPU"
        self.device_name = name
        self.sheet_peak = sheet_peak(name)
        self.measured_peak = measured_matmul(self.device)  # bf16 on a GPU, fp32 on a CPU
        self.notes.append(f"matmul measured: {self.measured_peak / 1e12:.1f} TFLOP/s")

    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - self.start)

    def measure(self, v: Variant) -> None:
        a, device = self.args, self.device
        started = time.perf_counter()
        model = build(a.shape, v, device)
        data = batches(a.shape, v.batch, a.source_len, device)
        if v.batch not in self.flops:
            self.flops[v.batch] = step_flops(model, data[0], v.amp, device)
        stepper = Stepper(model, v, device)
        for i in range(a.warmup):
            stepper(data[i % len(data)])
        sync(device)
        warm = time.perf_counter() - started
        t0 = time.perf_counter()
        for i in range(a.steps):
            loss = stepper(data[i % len(data)])
        sync(device)
        seconds = (time.perf_counter() - t0) / a.steps
        flops = self.flops[v.batch] / seconds
        row = dict(variant=v.name, batch=v.batch, ms_per_step=1e3 * seconds,
                   samples_per_s=v.batch / seconds, tflops=flops / 1e12,
                   share_sheet=flops / self.sheet_peak if self.sheet_peak else None,
                   share_measured=flops / self.measured_peak,
                   warmup_s=warm, loss=float(loss),
                   peak_mem_gib=(torch.cuda.max_memory_allocated() / 2 ** 30
                                 if device.type == "cuda" else None))
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        if a.profile_variant == v.name and not self.profile_table:
            stats = profile_step(stepper, data, device)
            self.notes.append(
                f"profile of '{v.name}': {stats['kernels_per_step']:.0f} kernels a step, GPU busy "
                f"{1e3 * stats['gpu_busy_s']:.1f} ms of {1e3 * stats['wall_s']:.1f} ms wall")
            print(self.notes[-1] + "\n" + stats["table"], flush=True)
            self.profile_table = stats["table"]
        del stepper, model, data
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def run(self, variants: list[Variant]) -> None:
        for v in variants:
            if self.left() < 0:
                self.notes.append(f"skipped '{v.name}' (batch {v.batch}): budget spent")
                continue
            try:
                self.measure(v)
            except Exception as err:  # a fast path that fails is a finding, not the end of the run
                self.notes.append(f"'{v.name}' (batch {v.batch}) failed: {type(err).__name__}: "
                                  f"{str(err).splitlines()[0][:200] if str(err) else ''}")
                print(self.notes[-1], flush=True)
            self.write()

    def write(self) -> None:
        a = self.args
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        head = (f"# GPU fast paths\n\nMeasured with `python benchmarks/gpu_fastpaths.py --shape "
                f"{a.shape} --source-len {a.source_len} --steps {a.steps}` on {self.device_name} "
                f"(torch {torch.__version__}). Model of the {a.shape} shape, random weights, LoRA r8 "
                f"on q,v; sources of {a.source_len} tokens, targets of {TARGET_LEN}. "
                f"ms/step over {a.steps} steps after {a.warmup} warm-up steps (warm-up includes "
                f"compilation). Share of peak: achieved FLOP/s (FlopCounterMode, forward and "
                f"backward) over the data-sheet dense bf16 peak and over a bf16 matmul measured "
                f"in this run.\n\n")
        lines = ["| variant | batch | ms/step | samples/s | TFLOP/s | % sheet peak | "
                 "% measured peak | warm-up s | peak GiB |", "|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            sheet = f"{100 * r['share_sheet']:.1f}" if r["share_sheet"] else ""
            mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else ""
            lines.append(f"| {r['variant']} | {r['batch']} | {r['ms_per_step']:.1f} | "
                         f"{r['samples_per_s']:.1f} | {r['tflops']:.2f} | {sheet} | "
                         f"{100 * r['share_measured']:.1f} | {r['warmup_s']:.1f} | {mem} |")
        notes = "\n".join(f"- {n}" for n in self.notes)
        prof = self.profile_table
        out.write_text(head + "\n".join(lines) + "\n\n" + notes + "\n"
                       + (f"\n```\n{prof}\n```\n" if prof else ""))
        out.with_suffix(".json").write_text(json.dumps(dict(rows=self.rows, notes=self.notes),
                                                       indent=1))


def variants(batch_small: int, batch_large: int, attn: str) -> list[Variant]:
    """In order of priority: the plain paths first, then each fast path at both batch sizes (the
    fast paths use `attn`, SDPA where the model supports it)."""
    b8, b64 = batch_small, batch_large
    fast = dict(bf16_base=True, attn=attn)
    return [
        Variant("eager fp32", b8, amp=False),
        Variant("eager autocast", b8),
        Variant("eager bf16 weights", b8, bf16_base=True),
        Variant("eager autocast", b64),
        Variant("eager bf16 weights", b64, bf16_base=True),
        Variant(f"eager bf16 weights {attn}", b8, **fast),
        Variant(f"eager bf16 weights {attn}", b64, **fast),
        Variant(f"cuda graph bf16 weights {attn}", b8, mode="graph", **fast),
        Variant(f"cuda graph bf16 weights {attn}", b64, mode="graph", **fast),
        Variant(f"compile reduce-overhead bf16 weights {attn}", b8, mode="reduce-overhead", **fast),
        Variant(f"compile bf16 weights {attn}", b64, mode="compile", **fast),
        Variant(f"compile reduce-overhead bf16 weights {attn}", b64, mode="reduce-overhead", **fast),
        Variant(f"compile bf16 weights {attn}", b8, mode="compile", **fast),
    ]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES) + sorted(CAUSAL_SHAPES),
                   default="t5-large")
    p.add_argument("--source-len", type=int, default=128)
    p.add_argument("--batch", type=int, nargs=2, default=[8, 64], metavar=("SMALL", "LARGE"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--budget", type=float, default=480.0, help="seconds; later variants skipped")
    p.add_argument("--profile-variant", default="eager bf16 weights")
    p.add_argument("--only", default="", help="run only the variants whose name contains this")
    p.add_argument("--out", default=str(Path(__file__).with_name("RESULTS-gpu-fastpaths.md")))
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import peft
    import transformers
    from transformers import LlamaForCausalLM, T5ForConditionalGeneration

    family = LlamaForCausalLM if args.shape in CAUSAL_SHAPES else T5ForConditionalGeneration
    attn = "sdpa" if getattr(family, "_supports_sdpa", False) else "eager"
    bench = Bench(args)
    bench.notes.append(f"transformers {transformers.__version__}, peft {peft.__version__}; "
                       f"fast paths use {attn} attention")
    bench.run([v for v in variants(*args.batch, attn) if args.only in v.name])


if __name__ == "__main__":
    sys.exit(main())
