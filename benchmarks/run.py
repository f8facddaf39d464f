"""The harness's speed against what a user would otherwise run, side by side in one process.

    python benchmarks/run.py [--rows 1,2,3,4,5,6] [--steps-data 256] [--out benchmarks/RESULTS.md]

Every row is a ratio of two timings taken in this same run, on the same model, data, batch size,
steps and seed (the embedded default backbone, the synthetic benchmark):

1. the harness's training loop (hooks, progress bar) against a bare PyTorch loop doing the same
   forward, backward, clipping and AdamW step (seqlora and seqft);
2. harness training samples/s against Hugging Face's Seq2SeqTrainer on the same work;
3. the harness's evaluator against Seq2SeqTrainer.predict(predict_with_generate, generation length
   50), with the two predictions compared;
4. each method's time per training step against seqlora's, and the per-task consolidation cost
   (prepare + consolidate) as a share of that task's training time;
5. how run time grows with the number of tasks and examples per task (fitted exponents), and what
   --eval-scope seen+next saves;
6. the wall time of `python -m harness run --all` (only with --rows 6: it runs the whole sweep);
7. the training loop logging every step to TensorBoard, MLflow or W&B (`--report-to`) against the
   same loop without tracking.

Timings are the best of `--repeats` alternating repetitions (the minimum is the least disturbed by
other processes on the machine).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.backbone import load_backbone  # noqa: E402
from harness.benchmark import load_benchmark  # noqa: E402
from harness.evaluator import evaluate_task  # noqa: E402
from harness.runner import Options, Runner, seed_everything  # noqa: E402
from harness.store import RunSpec  # noqa: E402
from harness.profiles import load_profile  # noqa: E402
from harness.textio import Batcher  # noqa: E402
from harness.trainer import FitSettings, fit  # noqa: E402
from harness_methods import registry  # noqa: E402
from harness_methods.base import Context  # noqa: E402

SEED = 0


class Bench:
    def __init__(self, n_train: int, n_test: int, repeats: int):
        self.profile = load_profile("default")
        self.runner = Runner(self.profile, Options(train_per_task=n_train, test_per_task=n_test,
                                                   progress=False))
        self.model_path = self.runner.model_path()
        self.task = load_benchmark().sequence(["agnews"])[0]
        self.data = self.runner.task_data(self.task)
        self.repeats = repeats
        self.rows: list[tuple[str, str, str, str, str]] = []

    # -- pieces -------------------------------------------------------------------------------
    def context(self, method_name: str):
        """A fresh backbone prepared by the method for its first stage."""
        seed_everything(SEED)
        backbone = load_backbone(self.model_path)
        method = registry.create(method_name, "default")
        batcher = Batcher(backbone, self.profile.max_source_length, self.profile.max_target_length)
        ctx = Context(model=backbone.model, backbone=backbone, tasks=(self.task,),
                      data={self.task.name: self.data}, profile=self.profile,
                      seed=SEED, batcher=batcher)
        method.setup(ctx)
        method.before_task(ctx)
        return ctx, method, batcher

    def harness_fit(self, method_name: str, progress: bool = True,
                    on_step=None) -> tuple[float, Context]:
        ctx, method, batcher = self.context(method_name)
        start = time.perf_counter()
        fit(ctx, method, batcher, FitSettings.of_profile(self.profile, seed=SEED, progress=progress,
                                                         on_step=on_step))
        return time.perf_counter() - start, ctx

    def bare_fit(self, method_name: str) -> float:
        """What a user writes by hand: tokenise each batch, forward, backward, clip, AdamW."""
        ctx, method, _ = self.context(method_name)
        model, tok = ctx.model, ctx.backbone.tokenizer
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=float(method.config["lr"]), eps=1e-8,
                                      weight_decay=0.0)
        sources, targets = list(self.data.train["source"]), list(self.data.train["target"])
        b = self.profile.batch_size
        generator = torch.Generator().manual_seed(SEED)
        model.train()
        start = time.perf_counter()
        for _ in range(self.profile.epochs):
            perm = torch.randperm(len(sources), generator=generator).tolist()
            for k in range(0, len(perm), b):
                ids = perm[k:k + b]
                enc = tok([sources[i] for i in ids], max_length=512, truncation=True, padding=True,
                          return_tensors="pt")
                labels = tok(text_target=[targets[i] for i in ids], max_length=50, truncation=True,
                             padding=True, return_tensors="pt").input_ids
                labels[labels == tok.pad_token_id] = -100
                loss = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                             labels=labels).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    def tokenized(self, split, tok):
        def encode(batch):
            enc = tok(batch["source"], max_length=512, truncation=True)
            enc["labels"] = tok(text_target=batch["target"], max_length=50, truncation=True).input_ids
            return enc
        return split.map(encode, batched=True, remove_columns=split.column_names)

    def trainer(self, ctx, method, out: str, **extra):
        from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

        args = Seq2SeqTrainingArguments(
            output_dir=out, per_device_train_batch_size=self.profile.batch_size,
            per_device_eval_batch_size=self.profile.eval_batch_size,
            num_train_epochs=self.profile.epochs, learning_rate=float(method.config["lr"]),
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            adam_epsilon=1e-8, logging_strategy="no", save_strategy="no", eval_strategy="no",
            report_to=[], seed=SEED, dataloader_num_workers=0, use_cpu=True, disable_tqdm=False,
            remove_unused_columns=False, **extra)
        tok = ctx.backbone.tokenizer
        return Seq2SeqTrainer(model=ctx.model, args=args, processing_class=tok,
                              data_collator=DataCollatorForSeq2Seq(tok, model=ctx.model),
                              train_dataset=self.tokenized(self.data.train, tok))

    def best(self, fn, *args):
        return min(fn(*args) for _ in range(self.repeats))

    def add(self, row: str, what: str, ours: str, theirs: str, ratio: str, target: str = ""):
        self.rows.append((row, what, ours, theirs, ratio + (f" ({target})" if target else "")))
        print(f"  {row:3s} {what:46s} {ours:>14s} {theirs:>14s} {ratio:>10s} {target}", flush=True)

    # -- rows ---------------------------------------------------------------------------------------
    def row1(self):
        for name in ("seqlora", "seqft"):
            times = {"harness": [], "bare": []}
            for _ in range(self.repeats):  # alternate, so drift hits both alike
                times["bare"].append(self.bare_fit(name))
                times["harness"].append(self.harness_fit(name)[0])
            ours, bare = min(times["harness"]), min(times["bare"])
            self.add("1", f"train loop vs bare PyTorch ({name})", f"{ours:.2f} s", f"{bare:.2f} s",
                     f"{ours / bare:.3f}x", "target <= 1.10x")

    def row2(self):
        ours = self.best(lambda: self.harness_fit("seqlora")[0])
        n = len(self.data.train) * self.profile.epochs

        def hf() -> float:
            ctx, method, _ = self.context("seqlora")
            with tempfile.TemporaryDirectory() as out:
                trainer = self.trainer(ctx, method, out)
                start = time.perf_counter()
                trainer.train()
                return time.perf_counter() - start
        theirs = self.best(hf)
        self.add("2", "train samples/s vs Seq2SeqTrainer (seqlora)", f"{n / ours:.1f}/s",
                 f"{n / theirs:.1f}/s", f"{theirs / ours:.2f}x", "target >= 1.2x")

    def row3(self):
        _, ctx = self.harness_fit("seqlora", progress=False)  # a trained model answers with labels
        model, batcher = ctx.model, ctx.batcher

        def ours() -> tuple[float, list[str]]:
            start = time.perf_counter()
            _, records = evaluate_task(model, batcher, self.data, batch_size=self.profile.eval_batch_size,
                                       max_new_tokens=50)
            return time.perf_counter() - start, [r["prediction"] for r in records]

        method = registry.create("seqlora", "default")
        tok = ctx.backbone.tokenizer
        test = self.tokenized(self.data.test, tok)

        def theirs() -> tuple[float, list[str]]:
            with tempfile.TemporaryDirectory() as out:
                trainer = self.trainer(ctx, method, out, predict_with_generate=True,
                                       generation_max_length=50, generation_num_beams=1)
                start = time.perf_counter()
                out_ids = trainer.predict(test).predictions
                seconds = time.perf_counter() - start
            out_ids = np.where(out_ids != -100, out_ids, tok.pad_token_id)
            return seconds, tok.batch_decode(out_ids, skip_special_tokens=True)
        runs_ours = [ours() for _ in range(self.repeats)]
        runs_theirs = [theirs() for _ in range(self.repeats)]
        t_ours, p_ours = min(runs_ours)
        t_theirs, p_theirs = min(runs_theirs)
        same = sum(a.strip() == b.strip() for a, b in zip(p_ours, p_theirs))
        n = len(p_ours)
        self.add("3", f"eval vs Trainer.predict ({same}/{n} identical)", f"{n / t_ours:.1f}/s",
                 f"{n / t_theirs:.1f}/s", f"{t_theirs / t_ours:.2f}x", "target >= 2x")

    def sequence_runs(self, methods, tasks, results: Path, **options):
        runner = Runner(self.profile, Options(results=results, progress=False, **{
            "train_per_task": self.runner.options.train_per_task,
            "test_per_task": self.runner.options.test_per_task, **options}))
        out = {}
        for name in methods:
            start = time.perf_counter()
            summary = runner.run(RunSpec(method=name, tasks=tuple(tasks), seed=SEED, profile="default"))
            out[name] = (time.perf_counter() - start, summary)
        return out

    def row4(self):
        import harness_methods.gorp as gorp

        refresh = {"seconds": 0.0}
        real = gorp.galore_projector

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                refresh["seconds"] += time.perf_counter() - start
        gorp.galore_projector = timed
        names = ["seqlora", "inclora", "olora", "nlora", "seqlora+sam", "seqlora+rwp", "ewc", "lwf",
                 "replay", "inflora", "gorp"]
        per_step: dict[str, float] = {}
        share: dict[str, tuple[float, float]] = {}
        for _ in range(self.repeats):  # the least disturbed of the repetitions, per quantity
            with tempfile.TemporaryDirectory() as tmp:
                self.sequence_runs(names, ["agnews", "SST-2"], Path(tmp))
                for name in names:
                    folder = Path(tmp) / "default" / name / "tasks-agnews+SST-2" / "seed0"
                    train = json.loads((folder / "stage_02-SST-2" / "metrics.json").read_text())["train"]
                    per_step[name] = min(per_step.get(name, math.inf), train["seconds"] / train["steps"])
                    cost = train.get("prepare_seconds", 0.0) + train.get("consolidate_seconds", 0.0)
                    if name not in share or cost / train["seconds"] < share[name][0] / share[name][1]:
                        share[name] = (cost, train["seconds"])
        gorp.galore_projector = real
        base = per_step["seqlora"]
        for name in names[1:]:
            target = "target <= 1.15x" if name in ("olora", "nlora") else ""
            self.add("4", f"{name} time per step vs seqlora", f"{1000 * per_step[name]:.1f} ms",
                     f"{1000 * base:.1f} ms", f"{per_step[name] / base:.2f}x", target)
        for name in ("olora", "nlora"):  # their own terms, apart from the growth IncLoRA shares
            self.add("4", f"{name} time per step vs inclora (the same growth)",
                     f"{1000 * per_step[name]:.1f} ms", f"{1000 * per_step['inclora']:.1f} ms",
                     f"{per_step[name] / per_step['inclora']:.2f}x")
        for name in ("ewc", "inflora", "gorp", "replay", "lwf"):
            cost, seconds = share[name]
            self.add("4", f"{name} consolidation / task training", f"{cost:.2f} s",
                     f"{seconds:.2f} s", f"{100 * cost / seconds:.0f}%", "target <= 20%")
        self.add("4", "gorp projector refresh (SVD), whole run", f"{refresh['seconds']:.2f} s", "", "")

    def row5(self):
        bench = load_benchmark()
        with tempfile.TemporaryDirectory() as tmp:
            by_order = {}
            for order in (1, 4):
                by_order[order] = self.sequence_runs(["seqlora"], bench.order(order),
                                                     Path(tmp) / f"o{order}")["seqlora"][0]
            T1, T4 = len(bench.order(1)), len(bench.order(4))
            slope = math.log(by_order[4] / by_order[1]) / math.log(T4 / T1)
            self.add("5", f"seqlora run time: {T1} vs {T4} tasks (order 1 vs 4)",
                     f"{by_order[1]:.1f} s", f"{by_order[4]:.1f} s", f"T^{slope:.2f}")
            full = self.sequence_runs(["seqlora"], bench.order(4), Path(tmp) / "all")["seqlora"]
            scope = self.sequence_runs(["seqlora"], bench.order(4), Path(tmp) / "scope",
                                       eval_scope="seen+next")["seqlora"]
            cells = [sum(v is not None for row in s.accuracy_matrix for v in row)
                     for s in (scope[1], full[1])]
            evals = [s.eval_seconds for s in (scope[1], full[1])]
            self.add("5", "order 4 --eval-scope seen+next vs all: cells evaluated",
                     str(cells[0]), str(cells[1]), f"{100 * (1 - cells[0] / cells[1]):.0f}% fewer")
            self.add("5", "order 4 --eval-scope seen+next vs all: evaluation time",
                     f"{evals[0]:.1f} s", f"{evals[1]:.1f} s",
                     f"{100 * (1 - evals[0] / evals[1]):.0f}% saved")
            self.add("5", "order 4 --eval-scope seen+next vs all: run time", f"{scope[0]:.1f} s",
                     f"{full[0]:.1f} s", f"{100 * (1 - scope[0] / full[0]):.0f}% saved")
        sizes, times = [], []
        n0 = self.runner.options.train_per_task
        for factor in (1, 2, 4):
            with tempfile.TemporaryDirectory() as tmp:
                runner = Runner(self.profile, Options(results=Path(tmp), progress=False,
                                                      train_per_task=n0 * factor,
                                                      test_per_task=self.runner.options.test_per_task))
                start = time.perf_counter()
                runner.run(RunSpec(method="seqlora", tasks=tuple(bench.order(1)), seed=SEED,
                                   profile="default"))
                times.append(time.perf_counter() - start)
                sizes.append(n0 * factor)
        slope = np.polyfit(np.log(sizes), np.log(times), 1)[0]
        self.add("5", f"seqlora order 1: N={sizes[0]},{sizes[1]},{sizes[2]} per task",
                 " / ".join(f"{t:.1f}" for t in times) + " s", "", f"N^{slope:.2f}")

    def row7(self):
        """Tracking every optimizer step (TensorBoard, MLflow, W&B offline) against none on the
        same stage: the wall time (the variants alternate, each in turn going first) and the
        share of it spent inside the tracking calls."""
        from harness.tracking import open_tracking

        trackers = ("tensorboard", "mlflow", "wandb")
        times = {name: [] for name in ("none", *trackers)}
        inside = {name: [] for name in trackers}
        variants = ("none", *trackers)
        for repeat in range(self.repeats):
            order = variants[repeat % len(variants):] + variants[:repeat % len(variants)]
            for name in order:
                if name == "none":
                    times[name].append(self.harness_fit("seqlora", progress=False)[0])
                    continue
                with tempfile.TemporaryDirectory() as tmp:
                    tracking = open_tracking((name,), Path(tmp), 0, results=Path(tmp), run_name="r")
                    spent = [0.0]

                    def log(k, values, tracking=tracking, spent=spent):
                        start = time.perf_counter()
                        tracking.scalars("train", values, k)
                        spent[0] += time.perf_counter() - start

                    times[name].append(self.harness_fit("seqlora", progress=False, on_step=log)[0])
                    tracking.close()
                    inside[name].append(spent[0] / times[name][-1])
        plain = min(times["none"])
        for name in trackers:
            ours = min(times[name])
            self.add("7", f"train loop with --report-to {name} (in its calls: "
                     f"{100 * min(inside[name]):.2f}%)", f"{ours:.2f} s", f"{plain:.2f} s",
                     f"{ours / plain:.3f}x", "target <= 1.02x")

    def row6(self):
        """The whole default sweep, as a user runs it (default --jobs), then AA and BWT per method
        (mean over the orders) to show the methods apart."""
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "harness", "run", "--all", "--results", tmp,
                            "--no-progress"], check=True, cwd=ROOT)
            seconds = time.perf_counter() - start
            by_method: dict[str, list[dict]] = {}
            for path in Path(tmp).rglob("summary.json"):
                summary = json.loads(path.read_text())
                by_method.setdefault(summary["method"], []).append(summary["metrics"])
        runs = sum(map(len, by_method.values()))
        self.add("6", f"python -m harness run --all (embedded default, {runs} runs)",
                 f"{seconds / 60:.1f} min", "", "", "target < 10 min")
        for method, rows in sorted(by_method.items(), key=lambda kv: -np.mean([r["AA"] for r in kv[1]])):
            bwt = [r["BWT"] for r in rows if r.get("BWT") is not None]
            self.add("6", f"{method}: AA / BWT, mean over {len(rows)} orders",
                     f"{np.mean([r['AA'] for r in rows]):.1f}",
                     f"{np.mean(bwt):.1f}" if bwt else "", "")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def measure_rows(bench, rows: str) -> str:
    """Measure the rows named in `rows` ("1,3") with `bench`'s row<N> methods; their table,
    printed and returned as Markdown."""
    from tabulate import tabulate

    for row in rows.split(","):
        getattr(bench, f"row{row.strip()}")()
    table = tabulate(bench.rows, headers=["row", "what", "harness", "baseline", "ratio"],
                     tablefmt="github")
    print("\n" + table)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,3,4,5", help="rows to run (6: the whole sweep)")
    parser.add_argument("--train", type=int, help="training examples per task (default: the "
                        "default profile's)")
    parser.add_argument("--test", type=int, help="test examples per task (default: the profile's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the table as Markdown to this file")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    profile = load_profile("default")
    args.train = args.train or profile.train_per_task
    args.test = args.test or profile.test_per_task
    bench = Bench(args.train, args.test, args.repeats)
    print(f"machine: {machine()}", flush=True)
    start = time.perf_counter()
    table = measure_rows(bench, args.rows)
    if args.out:
        args.out.write_text(
            f"# Speed, measured side by side\n\n`python benchmarks/run.py --rows {args.rows}` on "
            f"{machine()}, {time.strftime('%Y-%m-%d')}; {args.train} train / {args.test} test "
            f"examples per task, batch {bench.profile.batch_size}, {bench.profile.epochs} epochs, "
            f"best of {args.repeats}; {time.perf_counter() - start:.0f} s in all.\n\n{table}\n")


if __name__ == "__main__":
    main()
