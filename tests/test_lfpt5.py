"""LFPT5 checked against its reference's formulas (qcwthu/Lifelong-Fewshot-Language-Learning).

A plausible mistake each check catches (each was tried once and failed the test): the prompt in
front of a T5 input, the LM term unweighted or outside the (1 - kd_lambda) share, the KD term
averaged instead of summed, read at the label positions only, over every row instead of the
pseudo rows, or against the current prompt instead of the stage's first; the pseudo rows keeping
every candidate, or m where the reference keeps one; the prompt started from random tokens.
"""

import random

import torch
import torch.nn.functional as F

from harness_methods.lfpt5 import ANSWER, choose_pseudo, marker, parse_sample
from tests.helpers import at_second_stage, make_context
from tests.tolerance import assert_close, magnitude, network_ops

SETTINGS = {"prompt_length": 6, "samples_per_label": 2, "max_new_tokens": 8}


def prompted(ctx, method, input_ids, attention_mask, prompt):
    """The reference's `_step` input: the input embeddings, then the prompt, unmasked."""
    embeds = ctx.model.get_input_embeddings()(input_ids)
    p = prompt.unsqueeze(0).expand(len(input_ids), -1, -1)
    return {"inputs_embeds": torch.cat([embeds, p], 1),
            "attention_mask": torch.cat([attention_mask, torch.ones(len(input_ids), len(prompt),
                                                                    dtype=attention_mask.dtype)], 1)}


def test_the_loss_is_the_references_mix_of_task_lm_and_distillation(synthetic_dir):
    ctx, method, batcher = at_second_stage(synthetic_dir, "lfpt5", settings=SETTINGS)
    first = ctx.data["agnews"].train
    # Pseudo rows of the first task (the tiny model writes none that parse), as the stage's data.
    method.pseudo = [{"source": s, "target": t, "task": "agnews"}
                     for s, t in zip(first["source"][:3], first["target"][:3])]
    rows = method.training_data(ctx).to_list()
    assert [r["task"] for r in rows[:3]] == ["agnews"] * 3 and rows[3]["task"] == "yahoo"
    rows = rows[:3] + rows[-3:]
    with torch.no_grad():  # the prompt moved since the stage began: teacher and student differ
        method.prompt.vectors.add_(0.5 * torch.randn_like(method.prompt.vectors))
    ctx.model.eval()
    ctx.batch_rows = rows
    batch = batcher.train_batch([r["source"] for r in rows], [r["target"] for r in rows])
    out = ctx.model(**batch)
    terms = method.penalty(ctx, batch, out)
    total = out.loss + sum(terms.values())

    # By hand, as model.py and Classification.py compute it.
    model, prompt = ctx.model.model, method.prompt.vectors
    task = model(**prompted(ctx, method, batch["input_ids"], batch["attention_mask"], prompt),
                 labels=batch["labels"])
    tok = ctx.backbone.tokenizer
    lm_in = [marker(r["task"]) for r in rows]
    lm_out = [f"{r['source']} {ANSWER} {r['target']}" for r in rows]
    enc = tok(lm_in, padding=True, return_tensors="pt")
    labels = tok(text_target=lm_out, padding=True, return_tensors="pt").input_ids
    labels[labels == tok.pad_token_id] = -100
    lm = model(**prompted(ctx, method, enc.input_ids, enc.attention_mask, prompt), labels=labels).loss
    with torch.no_grad():
        teacher = model(**prompted(ctx, method, batch["input_ids"], batch["attention_mask"],
                                   method.teacher), labels=batch["labels"]).logits
    pseudo = [0, 1, 2]  # ifmem == 0: the earlier task's rows; every decoder position, pads included
    kd = F.kl_div(F.softmax(task.logits[pseudo], 2).log(), F.softmax(teacher[pseudo], 2),
                  reduction="sum")
    lam, mu = method.kd_lambda, method.lm_lambda
    assert float(kd.detach()) > 0 and (batch["labels"][pseudo] == -100).any()  # padded positions exist
    # (task + mu lm)(1 - lam) + lam kd, term by term. Each is the same network's forward (its
    # chain of roundings) on the same inputs; KD then sums over the vocabulary and the positions.
    ops = network_ops(model.config, max(enc.input_ids.shape[1], batch["input_ids"].shape[1])
                      + len(prompt))
    assert_close(out.loss, task.loss, ops=ops, scale=float(task.loss.detach()))
    assert_close(terms["task_share"], -lam * task.loss, ops=ops, scale=lam * float(task.loss.detach()))
    assert_close(terms["lm"], (1 - lam) * mu * lm, ops=ops, scale=float(lm.detach()))
    ops_kd = ops + teacher.shape[2] + teacher.shape[1] * len(pseudo)
    assert_close(terms["kd"], lam * kd, ops=ops_kd, scale=lam * float(kd.detach()))
    assert set(terms) == {"task_share", "lm", "kd"}
    total.backward()
    assert method.prompt.vectors.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())  # the backbone is frozen


def test_pseudo_examples_are_parsed_and_chosen_as_the_reference():
    labels = ("World", "Sports")
    assert parse_sample("a match report __ans__ Sports", labels) == ("a match report", "Sports")
    assert parse_sample("a __ans__ b __ans__ Sports", labels) is None  # not exactly one answer
    assert parse_sample("a match report __ans__ Tennis", labels) is None  # not a label
    assert parse_sample("no answer at all", labels) is None
    found = {"World": ["w1", "w2", "w3", "w4", "w5", "w6"], "Sports": ["s1", "s2", "s3"],
             "Both": ["b1", "b2"], "One": ["o1"]}
    chosen = choose_pseudo(found, 2, random.Random(0))
    drawn = random.Random(0).sample(found["World"], 4)  # 2m drawn at random, the first m train
    assert chosen["World"] == drawn[:2]
    assert chosen["Sports"] == ["s1", "s2"]  # 3 >= 2m - 1 found: the first m
    assert chosen["Both"] == ["b1"] and chosen["One"] == ["o1"]  # fewer: the first alone


def test_pseudo_rows_of_every_earlier_task_are_generated_and_seeded(synthetic_dir, monkeypatch):
    ctx, method, _ = at_second_stage(synthetic_dir, "lfpt5", settings=SETTINGS)
    # The real sampler: n decoded sequences, the same for the same run seed and stage.
    first = method.sample(ctx, marker("agnews"), 3)
    assert len(first) == 3 and method.generate_pseudo(ctx) == method.generate_pseudo(ctx)
    asked = []

    def written(ctx_, source, n):
        asked.append((source, n))
        return ["one __ans__ World", "two __ans__ World", "three __ans__ Sports", "bad __ans__ X"]

    monkeypatch.setattr(method, "sample", written)
    method.before_task(ctx)
    labels = ctx.tasks[0].labels
    assert asked == [(marker("agnews"), SETTINGS["samples_per_label"] * len(labels))]
    assert method.pseudo == [{"source": "one", "target": "World", "task": "agnews"},
                             {"source": "three", "target": "Sports", "task": "agnews"}]
    assert method.kept["yahoo"] == {"agnews": 2}
    assert torch.equal(method.teacher, method.prompt.vectors)  # the stage's first prompt


def test_the_prompt_starts_from_the_task_description_name_labels_and_frequent_tokens(synthetic_dir):
    ctx, method, _ = make_context(synthetic_dir, "lfpt5", settings={"prompt_length": 12})
    method.setup(ctx)
    tok, table = ctx.backbone.tokenizer, ctx.model.get_input_embeddings().weight.detach()
    first = ctx.tasks[0]
    phrases = ["sentence classification", first.name, *first.labels]
    vectors = method.prompt.vectors.detach()
    for k, phrase in enumerate(phrases):
        ids = tok(phrase, add_special_tokens=False).input_ids
        # A mean of a few rows: one rounding per addition and the division.
        assert_close(vectors[k], table[ids].mean(0), ops=len(ids) + 1, scale=magnitude(table[ids]))
    sources = tok(list(ctx.task_data.train["source"]), add_special_tokens=False).input_ids
    seen = {i for ids in sources for i in ids}
    rest = vectors[len(phrases):]
    rows = [int((table == v).all(1).nonzero()[0]) for v in rest]  # exact copies of table rows
    assert len(set(rows)) == len(rows) and set(rows) <= seen - set(tok.all_special_ids)


def test_adafactor_as_the_reference_and_no_sharded_optimizer(synthetic_dir):
    from transformers.optimization import Adafactor

    ctx, method, _ = make_context(synthetic_dir, "lfpt5", settings=SETTINGS)
    method.setup(ctx)
    optimizer = method.make_optimizer(ctx, method.trainable_parameters(ctx))
    assert isinstance(optimizer, Adafactor)
    assert {k: optimizer.defaults[k] for k in ("lr", "clip_threshold", "decay_rate", "weight_decay",
                                               "scale_parameter", "relative_step")} == \
        {"lr": 0.5, "clip_threshold": 1.0, "decay_rate": -0.8, "weight_decay": 1e-5,
         "scale_parameter": False, "relative_step": False}
    assert method.max_zero_stage == 0
