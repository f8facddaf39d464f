"""LFPT5: lifelong prompt tuning in which the prompt also learns to generate its tasks' examples.

Qin & Joty, ICLR 2022; reference qcwthu/Lifelong-Fewshot-Language-Learning, Classification/
(Classification.py: the task loop, pseudo-example generation and the loss; model.py
`T5forClassify`; dataset.py; utils.py `getpromptembedding`; Classification.sh: its settings).

The backbone is frozen; one soft prompt of L vectors trains through the whole sequence. A seq2seq
model takes it after the input embeddings (behind the padding), as the reference does; a causal
model in front of them, where prompt tuning puts it (behind the source it would split question
from answer). It starts as the reference's: the mean embedding of "sentence classification", of
the first task's name, of each of its labels, then embeddings of tokens drawn from the 5,000 most
frequent ones.

Every training row (x, y) of task i trains twice:
    task: x -> y                                  (L_task)
    LM:   "__<task i>__" -> "x __ans__ y"         (L_LM: the prompt learns to write task i's rows)
and a micro-batch's loss is (1 - kd_lambda) (L_task + lm_lambda L_LM) + kd_lambda KD, where KD sums
over the batch's pseudo rows, each decoder position and the vocabulary KL(p_T || p_S): p_S the
task forward's softmax, p_T that of the same rows with the prompt as it was when the task began
(frozen). Before task j > 0 the prompt writes, for each earlier task i, `samples_per_label` x
|labels of i| sequences from "__<task i>__" (sampled: top-k 64, repetition penalty 2.5, at most
`max_new_tokens`). One that splits on "__ans__" into text and one of task i's labels is a
candidate; per label up to 2m candidates are drawn at random and the first m train beside task j
(only the first when fewer than 2m - 1 were found; the rest is the reference's validation part),
m = `pseudo_per_label`. The optimizer is the reference's Adafactor.

Not reproduced: the per-task marker and "__ans__" are text, not tokens added to the vocabulary
(that would resize the frozen model's embeddings); the frequent tokens are counted over the first
task's training inputs (the reference ships a count over a corpus it does not name); KD takes
log-softmax, where the reference's log(softmax) drops a batch's whole term once a probability
underflows; its best-epoch selection, and its beam search at test (the harness evaluates every
method alike). For a causal model KD reads the positions that predict the answer.
"""

from __future__ import annotations

import contextlib
import random
import warnings
from collections import Counter
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from transformers.optimization import Adafactor

from harness.textio import Batcher
from harness_methods.base import Context, Method, stage_seed
from harness_methods.prompts import PromptedModel

ANSWER = "__ans__"
FREQUENT = 5000                  # utils.py getpromptembedding: top 5,000 tokens
SAMPLING = {"do_sample": True, "top_k": 64, "repetition_penalty": 2.5}  # model.py _generative_samples


def marker(task_name: str) -> str:
    """The input from which the prompt writes a task's examples."""
    return f"__{task_name}__"


def lm_row(row: dict) -> tuple[str, str]:
    """A training row's LM objective: its task's marker -> "source __ans__ target"."""
    return marker(row["task"]), f"{row['source']} {ANSWER} {row['target']}"


def parse_sample(text: str, labels: tuple[str, ...]) -> tuple[str, str] | None:
    """(text, label) of a generated "text __ans__ label" whose label is one of `labels`."""
    parts = text.split(ANSWER)
    if len(parts) != 2 or parts[1].strip(" ") not in labels:
        return None
    return parts[0].strip(" "), parts[1].strip(" ")


def choose_pseudo(found: dict[str, list[str]], per_label: int, rng: random.Random
                  ) -> dict[str, list[str]]:
    """Per label, up to 2m candidates drawn at random, of which the first m train; with fewer than
    2m - 1 found, only the first (Classification.py, `memnumforeveryclass`)."""
    chosen = {}
    for label, texts in found.items():
        drawn = rng.sample(texts, 2 * per_label) if len(texts) > 2 * per_label else texts
        chosen[label] = drawn[:per_label] if len(drawn) >= 2 * per_label - 1 else drawn[:1]
    return chosen


def distillation_sum(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor
                     ) -> torch.Tensor:
    """Sum over the masked positions and the vocabulary of KL(softmax(teacher) || softmax(student))."""
    log_s, log_t = F.log_softmax(student.float(), -1), F.log_softmax(teacher.float(), -1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)
    return (kl * mask).sum()


class SoftPrompt(torch.nn.Module):
    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.vectors = torch.nn.Parameter(init.clone())


class LFPT5(Method):
    name = "lfpt5"
    paper_name = "LFPT5"
    table_rank = 5.7
    # Adafactor factors each matrix's second moment; ZeRO hands the optimizer flat partitions.
    max_zero_stage = 0
    search_space = {"kd_lambda": (1e-3, 0.5)}

    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__(config)
        self.length = self.number("prompt_length", 300, integer=True, low=1)
        self.lm_lambda = self.number("lm_lambda", 0.25, low=0)
        self.kd_lambda = self.number("kd_lambda", 0.01, low=0, high=1)
        self.per_label = self.number("pseudo_per_label", 2, integer=True, low=1)
        self.samples_per_label = self.number("samples_per_label", 48, integer=True, low=1)
        self.max_new_tokens = self.number("max_new_tokens", 128, integer=True, low=1)
        self.prompt: SoftPrompt | None = None
        self.teacher: torch.Tensor | None = None    # the prompt when the stage began
        self.use_teacher = False
        self.pseudo: list[dict] = []                # this stage's generated rows of earlier tasks
        self.kept: dict[str, dict[str, int]] = {}   # stage's task -> earlier task -> rows kept
        self.lm_batcher: Batcher | None = None

    # -- the prompt ------------------------------------------------------------------------------
    def setup(self, ctx: Context) -> None:
        ctx.model.requires_grad_(False)
        self.prompt = SoftPrompt(self.initial_prompt(ctx)).to(ctx.device)
        ctx.model = PromptedModel(ctx.model, self.prompt_for, after=ctx.backbone.is_seq2seq)
        ctx.model.prompts = self.prompt
        b = ctx.batcher
        # The LM target holds a whole example (the reference allows it twice the input length).
        self.lm_batcher = Batcher(ctx.backbone, b.max_source_length,
                                  b.max_source_length + b.max_target_length, b.device,
                                  head_at_labels=b.head_at_labels,
                                  pad_to_multiple_of=b.pad_to_multiple_of)

    def initial_prompt(self, ctx: Context) -> torch.Tensor:
        """The reference's start: mean embeddings of the task description, the first task's name
        and labels, then of frequent tokens drawn at random (seeded by the run)."""
        tok, first = ctx.backbone.tokenizer, ctx.tasks[0]
        table = ctx.model.get_input_embeddings().weight.detach().float()
        phrases = ["sentence classification", first.name, *first.labels][: self.length]
        rows = [table[tok(p, add_special_tokens=False).input_ids].mean(0) for p in phrases]
        counts = Counter(i for ids in tok(list(ctx.data[first.name].train["source"]),
                                          add_special_tokens=False).input_ids
                         for i in ids if i not in tok.all_special_ids)
        frequent = [i for i, _ in sorted(counts.items(), key=lambda c: (-c[1], c[0]))[:FREQUENT]]
        k = self.length - len(rows)
        generator = torch.Generator().manual_seed(ctx.seed)
        picks = torch.randperm(len(frequent), generator=generator)[:k] if k <= len(frequent) \
            else torch.randint(len(frequent), (k,), generator=generator)
        return torch.stack(rows + [table[frequent[i]] for i in picks.tolist()])

    def prompt_for(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor | None = None) -> torch.Tensor:
        vectors = self.teacher if self.use_teacher else self.prompt.vectors
        return vectors.unsqueeze(0).expand(len(input_ids), -1, -1)

    @contextlib.contextmanager
    def teacher_prompt(self):
        self.use_teacher = True
        try:
            yield
        finally:
            self.use_teacher = False

    # -- a stage -----------------------------------------------------------------------------------
    def before_task(self, ctx: Context) -> None:
        self.teacher = self.prompt.vectors.detach().clone()
        self.pseudo = self.generate_pseudo(ctx) if ctx.stage else []
        counts = Counter(row["task"] for row in self.pseudo)
        self.kept[ctx.task.name] = {t.name: counts[t.name] for t in ctx.tasks[:ctx.stage]}

    def training_data(self, ctx: Context) -> datasets.Dataset:
        train = ctx.task_data.train
        rows = [{"source": s, "target": t, "task": ctx.task.name}
                for s, t in zip(train["source"], train["target"])]
        return datasets.Dataset.from_list(self.pseudo + rows)  # the reference's file order

    def make_optimizer(self, ctx: Context, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return Adafactor(params, lr=float(self.config["lr"]), clip_threshold=1.0, decay_rate=-0.8,
                         weight_decay=float(self.config.get("weight_decay", 0.0)),
                         scale_parameter=False, relative_step=False)

    def penalty(self, ctx: Context, batch: dict, outputs: Any) -> dict[str, torch.Tensor]:
        lam = self.kd_lambda
        with self.precision(ctx):
            lm = ctx.model(**self.lm_batcher.train_batch(*zip(*map(lm_row, ctx.batch_rows)))).loss
        # The trainer adds the task loss whole; the reference weighs it by (1 - kd_lambda).
        terms = {"lm": (1 - lam) * self.lm_lambda * lm, "task_share": -lam * outputs.loss}
        pseudo = [k for k, row in enumerate(ctx.batch_rows)
                  if row.get("task", ctx.task.name) != ctx.task.name]
        if pseudo:
            terms["kd"] = lam * self.distillation(ctx, batch, outputs.logits, pseudo)
        return terms

    def distillation(self, ctx: Context, batch: dict, logits: torch.Tensor, rows: list[int]
                     ) -> torch.Tensor:
        """KD over the pseudo rows: the teacher prompt's forward on them, in the same mode."""
        index = torch.tensor(rows, device=logits.device)
        sub = {k: v[index] if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.no_grad(), self.teacher_prompt(), self.precision(ctx):
            teacher = ctx.model(**sub).logits
        mask = torch.ones(teacher.shape[:2], device=teacher.device) if ctx.backbone.is_seq2seq \
            else ctx.batcher.predicts_label(sub["labels"]).float()
        return distillation_sum(logits[index], teacher, mask)

    @staticmethod
    def precision(ctx: Context):
        """The extra forwards in the step's precision (the plain loop's bf16 autocast on GPU)."""
        return torch.autocast("cuda", dtype=torch.bfloat16,
                              enabled=ctx.profile.bf16 and ctx.device.type == "cuda")

    # -- pseudo examples ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate_pseudo(self, ctx: Context) -> list[dict]:
        """Rows of every earlier task written by the prompt as it is now (eval mode, seeded by the
        run and the stage); the same on every rank (rank 0's)."""
        model, was_training = ctx.model, ctx.model.training
        model.eval()
        rows: list[dict] = []
        try:
            with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
                torch.manual_seed(stage_seed(ctx, ctx.stage))
                rng = random.Random(stage_seed(ctx, ctx.stage))
                for task in ctx.tasks[:ctx.stage]:
                    texts = self.sample(ctx, marker(task.name), self.samples_per_label * len(task.labels))
                    found: dict[str, list[str]] = {}
                    for parsed in filter(None, (parse_sample(t, task.labels) for t in texts)):
                        found.setdefault(parsed[1], []).append(parsed[0])
                    rows += [{"source": text, "target": label, "task": task.name}
                             for label, chosen in choose_pseudo(found, self.per_label, rng).items()
                             for text in chosen]
        finally:
            model.train(was_training)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            shared = [rows]
            torch.distributed.broadcast_object_list(shared, src=0)
            rows = shared[0]
        return rows

    def sample(self, ctx: Context, source: str, n: int) -> list[str]:
        """`n` sampled continuations of `source`, decoded."""
        tok, texts = ctx.backbone.tokenizer, []
        for start in range(0, n, ctx.profile.eval_batch_size):
            batch = ctx.batcher.eval_batch([source] * min(ctx.profile.eval_batch_size, n - start))
            with self.precision(ctx), warnings.catch_warnings():
                # The repetition penalty then reads the new tokens only (not the marker), as intended.
                warnings.filterwarnings("ignore", "Passing `repetition_penalty`")
                out = ctx.model.generate(**batch, **SAMPLING, max_new_tokens=self.max_new_tokens,
                                         pad_token_id=tok.pad_token_id)
            if not ctx.backbone.is_seq2seq:
                out = out[:, batch["input_ids"].shape[1]:]  # the new tokens only
            texts += [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True,
                                                          clean_up_tokenization_spaces=False)]
        return texts

    # -- resume ------------------------------------------------------------------------------------
    def stage_metrics(self, ctx: Context) -> dict[str, float]:
        """The pseudo-rows of each earlier task this stage trained on."""
        return {f"pseudo_rows/{task}": n for task, n in self.kept.get(ctx.task.name, {}).items()}

    def state_dict(self) -> dict[str, Any]:
        return {"pseudo_rows_kept": self.kept}

    def load_state_dict(self, state: dict[str, Any], ctx: Context, completed_stages: int) -> None:
        self.kept = {stage: dict(counts) for stage, counts in state["pseudo_rows_kept"].items()}
