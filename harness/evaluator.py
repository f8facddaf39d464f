"""Evaluation: greedy generation on a task's test split and exact match after normalisation."""

from __future__ import annotations

import contextlib
import string

import torch

from harness import faults
from harness.data import TaskData
from harness.distributed import SINGLE, World
from harness.textio import Batcher

_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """The reference normalisation: lower-case, drop ASCII punctuation, collapse whitespace.

    Articles are kept (the reference says so explicitly; METHODS.md §4).
    """
    return " ".join(text.lower().translate(_PUNCT).split())


@torch.inference_mode()
def evaluate_task(model: torch.nn.Module, batcher: Batcher, data: TaskData, *, batch_size: int,
                  max_new_tokens: int, world: World = SINGLE,
                  bf16: bool = False) -> tuple[float, list[dict]]:
    """Accuracy (percent) on the task's test split, and one prediction record per example.

    Examples are batched in order of source length so padding stays small; greedy decoding stops
    as soon as every sequence of the batch has produced EOS. With several ranks, rank r generates
    batches r, r+W, ... of the same batching and rank 0 gathers the texts, so every example is
    generated in the very batch a single process would put it in. Other ranks get (nan, []).
    `bf16` generates under CUDA bf16 autocast, the precision the profile trains in.
    """
    was_training = model.training
    model.eval()
    sources = list(data.test["source"])
    targets = list(data.test["target"])
    indices = list(data.test["index"])
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    mine: dict[int, str] = {}
    for chunk in batches[world.rank::world.size]:
        batch = batcher.eval_batch([sources[i] for i in chunk])
        with torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, num_beams=1,
                                 do_sample=False, repetition_penalty=1.0,
                                 pad_token_id=batcher.tok.pad_token_id)
        for i, text in zip(chunk, batcher.decode(out, batch["input_ids"].shape[1])):
            mine[i] = text
        faults.point("eval_batch")
    model.train(was_training)
    gathered = world.gather(mine)
    if gathered is None:
        return float("nan"), []
    predictions = [""] * len(sources)
    for part in gathered:
        for i, text in part.items():
            predictions[i] = text
    records = []
    correct = 0
    for i, (pred, gold) in enumerate(zip(predictions, targets)):
        ok = normalize(pred) == normalize(gold)
        correct += ok
        records.append({"task": data.task.name, "index": indices[i], "gold": gold,
                        "prediction": pred, "correct": ok})
    return 100.0 * correct / max(1, len(targets)), records
