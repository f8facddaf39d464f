"""GPU rows: a T5-large-sized model with random weights on one GPU, side by side in one process.

    python benchmarks/gpu.py --data-dir path/to/CL_Benchmark [--train 1000] [--test 500]
                             [--parts train,eval,run] [--out benchmarks/RESULTS-gpu.md]

The backbone is the embedded T5 built at T5-large's shape (24+24 layers, d_model 1024, d_ff 4096,
16 heads; random weights, its tokenizer trained on the data), run with the `t5-large` profile:
batch 8, 1 epoch, LoRA r8 on q,v with dropout 0.1, sources up to 512 tokens, generation up to 50.
Rows, each measured in this run on the same data, batches and seed:

* training samples/s of the harness (seqlora and seqft), fp32 as the reference runs and bf16,
  against a bare PyTorch loop and Hugging Face's Seq2SeqTrainer doing the same work;
* the FLOPs a training step executes (counted by torch.utils.flop_counter over the whole epoch),
  hence the achieved FLOP/s as a fraction of the GPU's peak dense bf16 FLOP/s;
* evaluation samples/s (greedy generation, up to 50 new tokens) against Seq2SeqTrainer.predict,
  with the predictions compared;
* with `--parts fastpaths`: the harness's own training step (`fit`, seqlora, bf16) with the
  profile's fast paths, `train.compile` with each backend and `train.pad_to_multiple_of`
  (`--fast-paths inductor@64,...`), at each of `--fast-batches`: ms per step after a first
  epoch that compiles, and the share of peak from the FLOPs the fit counts itself;
* the published throughput of the reference implementation on T5-large for comparison (16.4
  training samples/s and 89-109 evaluation samples/s, on 2 GPUs, from its logs).

With `--model smollm2-135m` (or any causal checkpoint `run --model` takes) it measures a real
pretrained LLaMA-architecture model instead: the rows of benchmarks/causal.py on the GPU, fp32
and bf16 (training tokens/s against a bare transformers loop with the share of the bf16 peak,
evaluation against plain `generate`), then the `smollm2` profile end to end in bf16 on orders
`--orders` for `--methods`, with its wall time and AA per run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.backbone import EmbeddedSpec, embedded_backbone_dir, load_backbone  # noqa: E402
from harness.efficiency import sheet_peak  # noqa: E402
from harness.evaluator import evaluate_task  # noqa: E402
from harness.profiles import load_profile  # noqa: E402
from harness.runner import Options, Runner, seed_everything  # noqa: E402
from harness.store import RunSpec  # noqa: E402
from harness.textio import Batcher  # noqa: E402
from harness.trainer import FitSettings, fit  # noqa: E402
from harness_methods import registry  # noqa: E402
from harness_methods.base import Context  # noqa: E402

SEED = 0
T5_LARGE = EmbeddedSpec(d_model=1024, d_ff=4096, num_heads=16, d_kv=64, num_layers=24,
                        num_decoder_layers=24, vocab_size=32128, dropout_rate=0.1)
TINY = EmbeddedSpec(d_model=64, d_ff=128, num_heads=2, d_kv=32, num_layers=1, num_decoder_layers=1,
                    vocab_size=2000)
REFERENCE = "reference T5-large logs: 16.4 train / 89-109 eval samples/s on 2 GPUs"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    return sheet_peak(torch.cuda.get_device_name())


class GpuBench:
    def __init__(self, data_dir: Path, n_train: int, n_test: int, spec: EmbeddedSpec, task: str):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.options = Options(data_dir=data_dir, train_per_task=n_train, test_per_task=n_test,
                               progress=False)
        sweep = Runner(load_profile("t5-large"), self.options)
        corpus = []
        for t in sweep.benchmark.tasks.values():
            data = sweep.task_data(t)
            corpus += list(data.train["source"]) + list(data.train["target"])
        start = time.perf_counter()
        self.model_path = str(embedded_backbone_dir(corpus, spec))
        self.build_seconds = time.perf_counter() - start
        self.task = sweep.benchmark.tasks[task]
        self.data = sweep.task_data(self.task)
        self.rows: list[tuple[str, str, str, str]] = []
        self.batch_size = 8  # the profile's per-device batch

    def profile(self, bf16: bool):
        return load_profile("t5-large", [f"train.bf16={'true' if bf16 else 'false'}",
                                         f"train.batch_size={self.batch_size}"])

    def context(self, method_name: str, bf16: bool):
        seed_everything(SEED)
        profile = self.profile(bf16)
        backbone = load_backbone(self.model_path)
        backbone.model.to(self.device)
        method = registry.create(method_name, "t5-large")
        batcher = Batcher(backbone, profile.max_source_length, profile.max_target_length,
                          device=self.device)
        ctx = Context(model=backbone.model, backbone=backbone, tasks=(self.task,),
                      data={self.task.name: self.data}, profile=profile,
                      seed=SEED, batcher=batcher, device=self.device)
        method.setup(ctx)
        method.before_task(ctx)
        return ctx, method, batcher

    def add(self, what: str, ours: str, other: str = "", ratio: str = "") -> None:
        self.rows.append((what, ours, other, ratio))
        print(f"  {what:58s} {ours:>16s} {other:>16s} {ratio:>10s}", flush=True)

    # -- the three ways to train -----------------------------------------------------------------
    def harness_fit(self, ctx, method, batcher) -> float:
        p = ctx.profile
        sync()
        start = time.perf_counter()
        fit(ctx, method, batcher, FitSettings(
            batch_size=p.batch_size, max_grad_norm=p.max_grad_norm, seed=SEED,
            group_by_length=p.group_by_length, autocast=p.bf16 and ctx.device.type == "cuda"))
        sync()
        return time.perf_counter() - start

    def bare_fit(self, ctx, method) -> float:
        """The loop a user writes: tokenise each batch, forward (autocast), backward, clip, AdamW."""
        model, tok, p = ctx.model, ctx.backbone.tokenizer, ctx.profile
        params = [q for q in model.parameters() if q.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=float(method.config["lr"]), eps=1e-8,
                                      weight_decay=0.0, fused=self.device.type == "cuda" or None)
        sources, targets = list(self.data.train["source"]), list(self.data.train["target"])
        order = torch.randperm(len(sources), generator=torch.Generator().manual_seed(SEED)).tolist()
        model.train()
        sync()
        start = time.perf_counter()
        for k in range(0, len(order), p.batch_size):
            ids = order[k:k + p.batch_size]
            enc = tok([sources[i] for i in ids], max_length=p.max_source_length, truncation=True,
                      padding=True, return_tensors="pt").to(self.device)
            labels = tok(text_target=[targets[i] for i in ids], max_length=p.max_target_length,
                         truncation=True, padding=True, return_tensors="pt").input_ids
            labels[labels == tok.pad_token_id] = -100
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=p.bf16):
                loss = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                             labels=labels.to(self.device)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, p.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - start

    def trainer(self, ctx, method, out: str, **extra):
        from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

        p, tok = ctx.profile, ctx.backbone.tokenizer
        args = Seq2SeqTrainingArguments(
            output_dir=out, per_device_train_batch_size=p.batch_size,
            per_device_eval_batch_size=p.eval_batch_size, num_train_epochs=1,
            learning_rate=float(method.config["lr"]), lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=0.0, max_grad_norm=p.max_grad_norm, adam_epsilon=1e-8, bf16=p.bf16,
            logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[], seed=SEED,
            dataloader_num_workers=0, use_cpu=self.device.type == "cpu", disable_tqdm=True,
            remove_unused_columns=False, **extra)

        def encode(batch):
            enc = tok(batch["source"], max_length=p.max_source_length, truncation=True)
            enc["labels"] = tok(text_target=batch["target"], max_length=p.max_target_length,
                                truncation=True).input_ids
            return enc
        train = self.data.train.map(encode, batched=True, remove_columns=self.data.train.column_names)
        test = self.data.test.map(encode, batched=True, remove_columns=self.data.test.column_names)
        return Seq2SeqTrainer(model=ctx.model, args=args, processing_class=tok,
                              data_collator=DataCollatorForSeq2Seq(tok, model=ctx.model),
                              train_dataset=train), test

    def trainer_fit(self, ctx, method) -> float:
        with tempfile.TemporaryDirectory() as out:
            trainer, _ = self.trainer(ctx, method, out)
            sync()
            start = time.perf_counter()
            trainer.train()
            sync()
            return time.perf_counter() - start

    def counted_flops(self, ctx, batcher, batches: int = 4) -> float:
        """FLOPs of one epoch's forward and backward passes, as executed (frozen weights get no
        weight gradients): PyTorch's FlopCounterMode counts the first `batches` batches (it
        dispatches every op through Python, far slower than training), scaled to the epoch."""
        from torch.utils.flop_counter import FlopCounterMode

        p, model = ctx.profile, ctx.model
        sources, targets = list(self.data.train["source"]), list(self.data.train["target"])
        counted = min(len(sources), batches * p.batch_size)
        counter = FlopCounterMode(display=False)
        with counter:
            for k in range(0, counted, p.batch_size):
                batch = batcher.train_batch(sources[k:k + p.batch_size], targets[k:k + p.batch_size])
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=p.bf16):
                    loss = model(**batch).loss
                loss.backward()
        model.zero_grad(set_to_none=True)
        return float(counter.get_total_flops()) * len(sources) / counted

    # -- rows ---------------------------------------------------------------------------------------
    def train_rows(self, method_name: str, bf16: bool, with_trainer: bool) -> None:
        n = len(self.data.train)
        precision = ("bf16" if bf16 else "fp32") + f", batch {self.batch_size}"
        timings: dict[str, float] = {}
        # A first pass warms up CUDA (kernels, allocator, cuBLAS handles) for everyone after it.
        ctx, method, batcher = self.context(method_name, bf16)
        self.bare_fit(ctx, method)
        del ctx, method, batcher
        for way in ("harness", "bare", "trainer") if with_trainer else ("harness", "bare"):
            ctx, method, batcher = self.context(method_name, bf16)
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            timings[way] = {"harness": lambda: self.harness_fit(ctx, method, batcher),
                            "bare": lambda: self.bare_fit(ctx, method),
                            "trainer": lambda: self.trainer_fit(ctx, method)}[way]()
            print(f"    {method_name} {precision} {way}: {timings[way]:.1f} s", flush=True)
            if way == "harness":
                memory = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0
                flops = self.counted_flops(ctx, batcher)
            del ctx, method, batcher
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        ours = timings["harness"]
        self.add(f"{method_name} {precision}: harness train samples/s vs bare PyTorch",
                 f"{n / ours:.1f}/s", f"{n / timings['bare']:.1f}/s",
                 f"{ours / timings['bare']:.3f}x time")
        if with_trainer:
            self.add(f"{method_name} {precision}: harness train samples/s vs Seq2SeqTrainer",
                     f"{n / ours:.1f}/s", f"{n / timings['trainer']:.1f}/s",
                     f"{timings['trainer'] / ours:.2f}x")
        peak = peak_flops()
        share = f"{100 * flops / ours / peak:.1f}% of bf16 peak" if peak else ""
        self.add(f"{method_name} {precision}: achieved FLOP/s ({flops / n / 1e9:.0f} GFLOP/sample), "
                 f"peak memory {memory:.1f} GiB", f"{flops / ours / 1e12:.1f} TFLOP/s", "", share)

    def fastpath_rows(self, variants: list[str]) -> None:
        """The harness's own step (`fit`: seqlora, bf16 autocast on a GPU, the profile's clipping)
        with the profile's fast paths: each variant is `BACKEND@N`, `train.compile = BACKEND`
        ("" or "plain": none) with `train.pad_to_multiple_of = N`. A variant trains the epoch
        twice and the second is timed (the first compiles); its FLOPs are the fit's own count
        (harness.efficiency), so the share of peak is what a run's summary would say."""
        peak = peak_flops()
        for variant in variants:
            backend, _, multiple = variant.partition("@")
            backend, multiple = ("" if backend == "plain" else backend), int(multiple or 0)
            ctx, method, batcher = self.context("seqlora", bf16=True)
            batcher.pad_to_multiple_of = multiple
            settings = FitSettings(batch_size=self.batch_size, max_grad_norm=ctx.profile.max_grad_norm,
                                   seed=SEED, autocast=self.device.type == "cuda",
                                   compile_backend=backend, progress=False)
            start = time.perf_counter()
            fit(ctx, method, batcher, settings)
            sync()
            warm_up = time.perf_counter() - start
            result = fit(ctx, method, batcher, settings)
            sync()
            achieved = result.flops / result.seconds
            share = f", {100 * achieved / peak:.1f}% of bf16 peak" if peak else ""
            precision = "bf16" if settings.autocast else "fp32"
            self.add(f"seqlora {precision}, batch {self.batch_size}, {backend or 'plain'}, pad to "
                     f"{multiple or 'longest'}: ms/step (first epoch {warm_up:.0f} s)",
                     f"{1000 * result.seconds / result.steps:.1f} ms", "",
                     f"{achieved / 1e12:.2f} TFLOP/s{share}")
            del ctx, method, batcher
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def eval_rows(self, bf16: bool) -> None:
        from harness.evaluator import normalize

        ctx, method, batcher = self.context("seqlora", bf16)
        self.harness_fit(ctx, method, batcher)  # one epoch, so the model answers like a trained one
        p, tok = ctx.profile, ctx.backbone.tokenizer
        precision = "bf16" if bf16 else "fp32"

        def ours():
            sync()
            start = time.perf_counter()
            acc, records = evaluate_task(ctx.model, batcher, self.data, batch_size=p.eval_batch_size,
                                         max_new_tokens=p.max_new_tokens, bf16=bf16)
            sync()
            return time.perf_counter() - start, [r["prediction"] for r in records], acc

        def theirs():
            with tempfile.TemporaryDirectory() as out:
                trainer, test = self.trainer(ctx, method, out, predict_with_generate=True,
                                             generation_max_length=p.max_new_tokens,
                                             generation_num_beams=1)
                sync()
                start = time.perf_counter()
                ids = trainer.predict(test).predictions
                sync()
                seconds = time.perf_counter() - start
            ids = np.where(ids != -100, ids, tok.pad_token_id)
            return seconds, tok.batch_decode(ids, skip_special_tokens=True)
        ours()  # warm-up
        t_ours, p_ours, acc = min(ours() for _ in range(2))
        t_theirs, p_theirs = min(theirs() for _ in range(2))
        # generation_max_length=50 is max_length, which counts the decoder's start token: the
        # Trainer stops one token earlier than max_new_tokens=50, so an answer it cut off must
        # be the start of ours.
        cap = p.max_new_tokens - 1
        same = sum(normalize(a) == normalize(b) or (
            len(tok(b, add_special_tokens=False).input_ids) >= cap
            and normalize(a).startswith(normalize(b))) for a, b in zip(p_ours, p_theirs))
        n = len(p_ours)
        lengths = [len(tok(x).input_ids) for x in p_ours]
        self.add(f"eval {precision} vs Trainer.predict ({same}/{n} identical; acc {acc:.1f}%, "
                 f"{np.mean(lengths):.1f} tokens/answer)", f"{n / t_ours:.1f}/s",
                 f"{n / t_theirs:.1f}/s", f"{t_theirs / t_ours:.2f}x")

    def run_row(self, bf16: bool, results: Path) -> None:
        """The whole runner on the GPU: seqlora over two tasks (train, evaluate, checkpoint)."""
        profile = self.profile(bf16)
        runner = Runner(profile, Options(data_dir=self.options.data_dir, model=self.model_path,
                                         train_per_task=self.options.train_per_task,
                                         test_per_task=self.options.test_per_task,
                                         results=results, progress=False))
        start = time.perf_counter()
        summary = runner.run(RunSpec(method="seqlora", tasks=(self.task.name, "SST-2"), seed=SEED,
                                     profile="t5-large"))
        seconds = time.perf_counter() - start
        final = summary.metrics.get("AA", float("nan"))
        self.add(f"harness run seqlora {self.task.name} -> SST-2 ({'bf16' if bf16 else 'fp32'}), "
                 f"AA {final:.1f}", f"{seconds:.1f} s", "", "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="the CL_Benchmark folder")
    parser.add_argument("--train", type=int, default=1000, help="training examples")
    parser.add_argument("--test", type=int, default=500, help="test examples")
    parser.add_argument("--task", default="agnews")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (to try the script on CPU)")
    parser.add_argument("--parts", default="train,eval,run",
                        help="of train, batch64, fastpaths, eval, run")
    parser.add_argument("--fast-paths", default="plain@0,inductor@64,cudagraphs@64",
                        help="fastpaths part: BACKEND@N variants (train.compile, pad_to_multiple_of)")
    parser.add_argument("--fast-batches", default="64,8", help="fastpaths part: batch sizes")
    parser.add_argument("--out", type=Path, help="write the table as Markdown to this file")
    parser.add_argument("--watchdog", type=float, default=0,
                        help="print every thread's stack every this many seconds (to see a hang)")
    parser.add_argument("--model", help="a pretrained causal model instead of the T5-large shape "
                        "(e.g. smollm2-135m)")
    parser.add_argument("--orders", default="1-3", help="with --model: orders of the end-to-end run")
    parser.add_argument("--methods", default="seqlora,inclora,olora,nlora,replay,lwf",
                        help="with --model: methods of the end-to-end run")
    args = parser.parse_args()
    if args.model:
        return causal_model_rows(args)
    if args.watchdog:
        import faulthandler

        faulthandler.dump_traceback_later(args.watchdog, repeat=True)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    start = time.perf_counter()
    bench = GpuBench(args.data_dir, args.train, args.test, TINY if args.tiny else T5_LARGE, args.task)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    params = sum(p.numel() for p in load_backbone(bench.model_path).model.parameters())
    print(f"device: {device}; model {params / 1e6:.0f}M parameters, built in "
          f"{bench.build_seconds:.0f} s; {REFERENCE}", flush=True)
    parts = args.parts.split(",")
    if "train" in parts:
        bench.train_rows("seqlora", bf16=False, with_trainer=True)
        bench.train_rows("seqlora", bf16=True, with_trainer=True)
        bench.train_rows("seqft", bf16=True, with_trainer=False)
    if "batch64" in parts:  # the paper's global batch on one GPU: how far a bigger batch goes
        bench.batch_size = 64
        bench.train_rows("seqlora", bf16=True, with_trainer=False)
        bench.batch_size = 8
    if "fastpaths" in parts:
        for batch in map(int, args.fast_batches.split(",")):
            bench.batch_size = batch
            bench.fastpath_rows(args.fast_paths.split(","))
        bench.batch_size = 8
    if "eval" in parts:
        bench.eval_rows(bf16=False)
        bench.eval_rows(bf16=True)
    if "run" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            bench.run_row(bf16=True, results=Path(tmp))
    from tabulate import tabulate

    table = tabulate(bench.rows, headers=["what", "harness", "baseline", "ratio"], tablefmt="github")
    print("\n" + table)
    if args.out:
        args.out.write_text(
            f"# GPU rows\n\n`python benchmarks/gpu.py {' '.join(sys.argv[1:])}` on "
            f"{device}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; "
            f"{'a tiny' if args.tiny else 'the T5-large'} shape, "
            f"{params / 1e6:.0f}M parameters, random weights; {args.task} from CL_Benchmark; "
            f"{time.perf_counter() - start:.0f} s in all. {REFERENCE}.\n\n{table}\n")


def causal_model_rows(args) -> None:
    """benchmarks/causal.py's rows on the GPU (fp32, bf16), then the profile end to end."""
    import json
    import subprocess
    from types import SimpleNamespace

    from benchmarks.causal import CausalBench

    rows = []
    for bf16 in (False, True):
        bench = CausalBench(SimpleNamespace(
            data_dir=args.data_dir, model=args.model, task=args.task, steps=32, test=args.test,
            repeats=2, device="cuda", bf16=bf16))
        bench.row7()
        bench.row8()
        rows += [(f"{r[1]} ({'bf16' if bf16 else 'fp32'})", *r[2:]) for r in bench.rows]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "harness", "run", "--all", "--profile", "smollm2",
                        "--model", args.model, "--data-dir", str(args.data_dir), "--orders",
                        args.orders, "--methods", args.methods, "--set", "train.bf16=true",
                        "--results", tmp, "--no-progress"], check=True, cwd=ROOT)
        seconds = time.perf_counter() - start
        for path in sorted(Path(tmp).rglob("summary.json")):
            summary = json.loads(path.read_text())
            rows.append((f"run: {summary['method']} {summary['sequence']} (bf16)",
                         f"AA {summary['metrics']['AA']:.1f}",
                         f"{summary['train_seconds']:.0f} s train", f"{summary['eval_seconds']:.0f} s eval"))
    rows.append((f"run --all --orders {args.orders} --methods {args.methods}",
                 f"{seconds / 60:.1f} min", "", ""))
    from tabulate import tabulate

    table = tabulate(rows, headers=["what", "harness", "baseline", "ratio"], tablefmt="github")
    print("\n" + table)
    if args.out:
        args.out.write_text(f"# GPU rows, {args.model}\n\n`python benchmarks/gpu.py --model "
                            f"{args.model}` on {torch.cuda.get_device_name()}, torch "
                            f"{torch.__version__}, {time.strftime('%Y-%m-%d')}.\n\n{table}\n")


if __name__ == "__main__":
    main()
