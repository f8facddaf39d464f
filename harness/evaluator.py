"""Evaluation: greedy generation on a task's test split and exact match after normalisation."""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass

import torch

from harness import faults
from harness.data import TaskData
from harness.distributed import SINGLE, World
from harness.metrics import normalize
from harness.textio import Batcher



@dataclass
class PromptPrefix:
    """The key/value cache of the prompt tokens that every example of a task starts with (task,
    dataset, instruction and options: 30-45% of a real prompt), computed once per evaluation and
    copied into each generation batch instead of being computed again for every example."""

    n_tokens: int
    cache: object
    keyword: str  # how generate() takes a cache: `cache` (transformers >= 5.2x) or `past_key_values`

    MIN_TOKENS = 16  # below this the copies cost more than the forward they save

    @classmethod
    def of(cls, model: torch.nn.Module, batcher: Batcher, sources: list[str]) -> "PromptPrefix | None":
        # A model that must read the prompt whole cannot take it in two parts: soft prompts put
        # before the text (methods.prompts), gates on the whole prompt (GainLoRA).
        if batcher.is_seq2seq or not sources or getattr(model, "reads_whole_prompt", False):
            return None
        rows = batcher.prompt_rows(sources)
        n = min(len(os.path.commonprefix(rows)), min(map(len, rows)) - 1)  # leave each row a token
        if n < cls.MIN_TOKENS:
            return None
        ids = torch.tensor([rows[0][:n]], device=batcher.device)
        out = model(input_ids=ids, use_cache=True,
                    **({"logits_to_keep": 1} if batcher.head_at_labels else {}))
        keyword = "cache" if "cache" in getattr(type(out), "__dataclass_fields__", {}) \
            else "past_key_values"
        return cls(n, getattr(out, keyword), keyword)

    def for_batch(self, size: int):
        cache = copy.deepcopy(self.cache)  # generation appends to the cache it is given
        cache.batch_repeat_interleave(size)
        return cache


@torch.inference_mode()
def evaluate_task(model: torch.nn.Module, batcher: Batcher, data: TaskData, *, batch_size: int,
                  max_new_tokens: int, world: World = SINGLE,
                  bf16: bool = False, reuse_prefix: bool = True) -> tuple[float, list[dict]]:
    """Accuracy (percent) on the task's test split, and one prediction record per example.

    Examples are batched in order of source length so padding stays small; greedy decoding stops
    as soon as every sequence of the batch has produced EOS. With several ranks, rank r generates
    batches r, r+W, ... of the same batching and rank 0 gathers the texts, so every example is
    generated in the very batch a single process would put it in. Other ranks get (nan, []).
    `bf16` generates under CUDA bf16 autocast, the precision the profile trains in. A causal
    model reuses the cache of the prompt prefix the task's examples share (`reuse_prefix`).
    """
    was_training = model.training
    if was_training:  # a switch walks every module (and transformers' kernel hooks): only if needed
        model.eval()
    sources = data.test_columns["source"]
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    mine: dict[int, str] = {}
    precision = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    with precision():
        prefix = PromptPrefix.of(model, batcher, sources) if reuse_prefix else None
    for chunk in batches[world.rank::world.size]:
        texts = [sources[i] for i in chunk]
        if prefix is None:
            batch, cached = batcher.eval_batch(texts), {}
        else:
            batch = batcher.eval_batch_after_prefix(texts, prefix.n_tokens)
            cached = {prefix.keyword: prefix.for_batch(len(chunk))}
        with precision():
            out = model.generate(**batch, **cached, max_new_tokens=max_new_tokens, num_beams=1,
                                 do_sample=False, repetition_penalty=1.0,
                                 pad_token_id=batcher.tok.pad_token_id)
        for i, text in zip(chunk, batcher.decode(out, batch["input_ids"].shape[1])):
            mine[i] = text
        faults.point("eval_batch")
    if was_training:
        model.train()
    gathered = world.gather(mine)
    if gathered is None:
        return float("nan"), []
    predictions = [""] * len(sources)
    for part in gathered:
        for i, text in part.items():
            predictions[i] = text
    return score(data, predictions)


def score(data: TaskData, predictions: list[str]) -> tuple[float, list[dict]]:
    """Accuracy (percent) of the predictions, in the order of the test split, and their records:
    exact match after the reference normalisation."""
    targets, indices = data.test_columns["target"], data.test_columns["index"]
    records = []
    correct = 0
    for i, (pred, gold) in enumerate(zip(predictions, targets)):
        ok = normalize(pred) == normalize(gold)
        correct += ok
        records.append({"task": data.task.name, "index": indices[i], "gold": gold,
                        "prediction": pred, "correct": ok})
    return 100.0 * correct / max(1, len(targets)), records
