"""The harness on a real pretrained causal LM against bare Hugging Face code, side by side.

    python benchmarks/causal.py --data-dir /path/to/CL_Benchmark [--model smollm2-135m]
        [--task dbpedia] [--steps 8] [--test 48] [--device cpu|cuda] [--bf16] [--out FILE]

Rows (same model, same examples, same batches, one process):
7. training tokens/s: the harness's `fit` (seqlora; the LM head only at the label positions,
   batches grouped by length) against a bare loop of transformers forward (whole-row logits and
   loss), backward, clipping and AdamW over the very same micro-batches, right-padded as a user
   would; the harness with the whole-row head, which isolates the loop's own cost; and the
   harness padding-free (`train.padding_free`: each step's rows packed into one, no padding);
8. evaluation examples/s: `evaluate_task` (greedy, length-sorted batches, the task's shared prompt
   prefix computed once and its key/value cache reused) against plain `generate` on the same
   prompts and batches; the predictions of the two are compared one by one.

Timings are the best of `--repeats` alternating repetitions. On a GPU the rows also report the
share of the device's bf16 peak, from a FLOP count of the same step (torch's FlopCounterMode).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.backbone import load_backbone  # noqa: E402
from harness.benchmark import load_benchmark  # noqa: E402
from harness.data import load_instructions, load_task  # noqa: E402
from harness.efficiency import sheet_peak  # noqa: E402
from harness.evaluator import evaluate_task, normalize  # noqa: E402
from harness.models import resolve_model  # noqa: E402
from harness.profiles import load_profile  # noqa: E402
from harness.runner import seed_everything  # noqa: E402
from harness.textio import Batcher  # noqa: E402
from harness.trainer import FitSettings, epoch_steps, fit  # noqa: E402
from harness_methods import registry  # noqa: E402
from harness_methods.base import Context  # noqa: E402

SEED = 0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class CausalBench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        overrides = [f"train.bf16={'true' if args.bf16 else 'false'}"]
        self.profile = load_profile("smollm2", overrides)
        self.path = resolve_model(args.model)
        task = load_benchmark().sequence([args.task])[0]
        self.task = task
        self.data = load_task(args.data_dir, task, load_instructions(args.data_dir),
                              train_per_task=args.steps * self.profile.batch_size,
                              test_per_task=args.test, seed=self.profile.data_seed)
        self.rows: list[tuple[str, ...]] = []

    def context(self, head_at_labels: bool = True):
        seed_everything(SEED)
        backbone = load_backbone(self.path)
        backbone.model.to(self.device)
        method = registry.create("seqlora", "smollm2")
        batcher = Batcher(backbone, self.profile.max_source_length, self.profile.max_target_length,
                          device=self.device, head_at_labels=head_at_labels)
        ctx = Context(model=backbone.model, backbone=backbone, tasks=(self.task,),
                      data={self.task.name: self.data}, profile=self.profile,
                      seed=SEED, batcher=batcher, device=self.device)
        method.setup(ctx)
        method.before_task(ctx)
        return ctx, method, batcher

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.args.bf16 \
            else contextlib.nullcontext()

    # -- row 7 --------------------------------------------------------------------------------
    def harness_fit(self, head_at_labels: bool, padding_free: bool = False) -> float:
        ctx, method, batcher = self.context(head_at_labels)
        sync(self.device)
        start = time.perf_counter()
        fit(ctx, method, batcher, FitSettings(batch_size=self.profile.batch_size, seed=SEED,
                                              group_by_length=self.profile.group_by_length,
                                              padding_free=padding_free, progress=False))
        sync(self.device)
        return time.perf_counter() - start

    def step_plan(self, batcher: Batcher) -> list[list[int]]:
        """The harness's batches of this epoch (the same seed and grouping as `fit`)."""
        sources = list(self.data.train["source"])
        generator = torch.Generator().manual_seed(SEED)
        perm = torch.randperm(len(sources), generator=generator).tolist()
        lengths = batcher.source_lengths(sources) if self.profile.group_by_length else None
        return epoch_steps(perm, self.profile.batch_size, lengths, generator)

    def bare_fit(self) -> float:
        """transformers as a user calls it: right-padded batch, whole-row logits, its own loss."""
        ctx, method, batcher = self.context()
        model, tok = ctx.model, ctx.backbone.tokenizer
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=float(method.config["lr"]), eps=1e-8,
                                      weight_decay=0.0, fused=self.device.type == "cuda" or None)
        sources, targets = list(self.data.train["source"]), list(self.data.train["target"])
        tok.padding_side = "right"

        def batch(ids):  # tokenised per batch, as a hand-written loop does
            prompts = [tok(sources[i], add_special_tokens=False).input_ids for i in ids]
            full = [tok(sources[i] + " " + targets[i], add_special_tokens=False).input_ids
                    for i in ids]
            rows = [[tok.bos_token_id] + f + [tok.eos_token_id] for f in full]
            width = max(map(len, rows))
            input_ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            labels = torch.tensor([[-100] * (1 + len(p)) + r[1 + len(p):] + [-100] * (width - len(r))
                                   for p, r in zip(prompts, rows)])
            return input_ids.to(self.device), mask.to(self.device), labels.to(self.device)

        plan = self.step_plan(batcher)
        model.train()
        sync(self.device)
        start = time.perf_counter()
        for ids in plan:
            input_ids, mask, labels = batch(ids)
            with self.autocast():
                loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync(self.device)
        return time.perf_counter() - start

    def row7(self):
        _, _, batcher = self.context()
        plan = self.step_plan(batcher)
        lengths = batcher.source_lengths(list(self.data.train["source"]))
        tokens = sum(len(s) * max(lengths[i] for i in s) for s in plan)  # padded, as computed
        times = {"bare": [], "whole": [], "harness": [], "packed": []}
        for _ in range(self.args.repeats):
            times["bare"].append(self.bare_fit())
            times["whole"].append(self.harness_fit(head_at_labels=False))
            times["harness"].append(self.harness_fit(head_at_labels=True))
            times["packed"].append(self.harness_fit(head_at_labels=True, padding_free=True))
        bare, whole, ours, packed = (min(times[k]) for k in ("bare", "whole", "harness", "packed"))
        self.add("7", "train: harness (whole-row head) vs bare HF loop", f"{tokens / whole:.0f} tok/s",
                 f"{tokens / bare:.0f} tok/s", f"{whole / bare:.3f}x time", "target <= 1.05x")
        self.add("7", "train: harness (head at label positions) vs bare", f"{tokens / ours:.0f} tok/s",
                 f"{tokens / bare:.0f} tok/s", f"{ours / bare:.3f}x time", "faster")
        self.add("7", "train: harness padding-free vs bare", f"{tokens / packed:.0f} tok/s",
                 f"{tokens / bare:.0f} tok/s", f"{bare / packed:.2f}x faster", "target >= 1.3x")
        self.add("7", "train: harness padding-free vs padded", f"{tokens / packed:.0f} tok/s",
                 f"{tokens / ours:.0f} tok/s", f"{ours / packed:.2f}x faster", "")
        ungrouped = epoch_steps(list(range(len(lengths))), self.profile.batch_size)
        padded = sum(len(s) * max(lengths[i] for i in s) for s in ungrouped)
        self.add("7", "padded prompt tokens per epoch: grouped vs not", f"{tokens}", f"{padded}",
                 f"{tokens / padded:.2f}x", "")
        self.flops_row("7", "train step", ours / len(plan), self.one_step_flops(plan[0]))

    def one_step_flops(self, ids: list[int]) -> float | None:
        if self.device.type != "cuda":
            return None
        from torch.utils.flop_counter import FlopCounterMode

        ctx, _, batcher = self.context()
        batch = batcher.train_batch([self.data.train["source"][i] for i in ids],
                                    [self.data.train["target"][i] for i in ids])
        with FlopCounterMode(display=False) as counter, self.autocast():
            ctx.model(**batch).loss.backward()
        return counter.get_total_flops()

    def flops_row(self, row: str, what: str, seconds: float, flops: float | None):
        if flops is None:
            return
        name = torch.cuda.get_device_name()
        peak = sheet_peak(name)
        share = f"{100 * flops / seconds / peak:.1f}% of bf16 peak" if peak else "peak unknown"
        self.add(row, f"{what}: achieved FLOP/s ({name})", f"{flops / seconds / 1e12:.2f} TFLOP/s",
                 "", share)

    # -- row 8 --------------------------------------------------------------------------------
    def row8(self):
        ctx, _, batcher = self.context()
        model, tok = ctx.model, ctx.backbone.tokenizer
        size, new = self.profile.eval_batch_size, self.profile.max_new_tokens
        bf16 = self.args.bf16

        def ours():
            sync(self.device)
            start = time.perf_counter()
            _, records = evaluate_task(model, batcher, self.data, batch_size=size,
                                       max_new_tokens=new, bf16=bf16)
            sync(self.device)
            return time.perf_counter() - start, {r["index"]: r["prediction"] for r in records}

        def plain():
            """generate on each length-sorted batch, left-padded by the tokenizer itself."""
            tok.padding_side = "left"
            sources, index = list(self.data.test["source"]), list(self.data.test["index"])
            order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
            out = {}
            sync(self.device)
            start = time.perf_counter()
            with torch.inference_mode():
                for k in range(0, len(order), size):
                    chunk = order[k:k + size]
                    enc = tok([tok.bos_token + sources[i] for i in chunk], add_special_tokens=False,
                              padding=True, return_tensors="pt").to(self.device)
                    with self.autocast():
                        gen = model.generate(**enc, max_new_tokens=new, do_sample=False,
                                             pad_token_id=tok.pad_token_id)
                    for i, ids in zip(chunk, gen[:, enc.input_ids.shape[1]:]):
                        out[index[i]] = tok.decode(ids, skip_special_tokens=True).strip()
            sync(self.device)
            return time.perf_counter() - start, out

        runs = [(ours(), plain()) for _ in range(self.args.repeats)]
        t_ours = min(r[0][0] for r in runs)
        t_plain = min(r[1][0] for r in runs)
        p_ours, p_plain = runs[0][0][1], runs[0][1][1]
        same = sum(normalize(p_ours[i]) == normalize(p_plain[i]) for i in p_plain)
        n = len(p_plain)
        self.add("8", f"eval examples/s vs plain generate ({same}/{n} identical)",
                 f"{n / t_ours:.2f}/s", f"{n / t_plain:.2f}/s", f"{t_plain / t_ours:.2f}x", "")

    def add(self, row, what, ours, theirs, ratio, target=""):
        self.rows.append((row, what, ours, theirs, ratio + (f" ({target})" if target else "")))
        print(f"  {row:2s} {what:52s} {ours:>14s} {theirs:>14s} {ratio:>14s} {target}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="the CL_Benchmark folder")
    parser.add_argument("--model", default="smollm2-135m", help="as run --model")
    parser.add_argument("--task", default="dbpedia")
    parser.add_argument("--steps", type=int, default=8, help="training steps (batches of the profile)")
    parser.add_argument("--test", type=int, default=48, help="test examples")
    parser.add_argument("--rows", default="7,8")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--out", type=Path, help="write the table as Markdown to this file")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    bench = CausalBench(args)
    from benchmarks.run import machine, measure_rows

    where = torch.cuda.get_device_name() if bench.device.type == "cuda" else machine()
    print(f"machine: {where}", flush=True)
    start = time.perf_counter()
    table = measure_rows(bench, args.rows)
    if args.out:
        args.out.write_text(
            f"# A real causal LM ({args.model}), measured side by side\n\n"
            f"`python benchmarks/causal.py {' '.join(sys.argv[1:])}` on {where}, "
            f"{time.strftime('%Y-%m-%d')}; task {args.task}, {args.steps} steps of batch "
            f"{bench.profile.batch_size}, {args.test} test examples, best of {args.repeats}; "
            f"{time.perf_counter() - start:.0f} s in all.\n\n{table}\n")


if __name__ == "__main__":
    main()
