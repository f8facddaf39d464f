"""Pretraining the embedded backbone (`embedded.pretrain_steps`): a fixed number of seeded steps,
so a machine builds the same model each time; another cached folder than the untrained model; a
loss that went down; benchmark labels only as names of concepts, never in the benchmark's prompt
format, so no benchmark task is learnt before its training split."""

import itertools
from dataclasses import replace

import torch
from transformers import AutoTokenizer, T5ForConditionalGeneration

from harness.backbone import embedded_backbone_dir
from harness.benchmark import load_benchmark
from harness.data import build_source
from harness.synthetic import INSTRUCTIONS, pretraining_examples, tokenizer_phrases
from tests.helpers import TINY

CORPUS = [s for s, t in itertools.islice(pretraining_examples(7), 200) for s in (s, t)]


def loss_on(folder, pairs):
    model = T5ForConditionalGeneration.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer([s for s, _ in pairs], return_tensors="pt", padding=True)
    labels = tokenizer([t for _, t in pairs], return_tensors="pt", padding=True).input_ids
    labels[labels == tokenizer.pad_token_id] = -100
    with torch.no_grad():
        return model(**batch, labels=labels).loss.item(), model.state_dict()


def test_pretraining_is_seeded_cached_apart_and_lowers_the_loss(tmp_path, monkeypatch):
    spec = replace(TINY, pretrain_steps=80, pretrain_batch=16)
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "a"))
    untrained, pretrained = embedded_backbone_dir(CORPUS, TINY), embedded_backbone_dir(CORPUS, spec)
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "b"))
    again = embedded_backbone_dir(CORPUS, spec)
    assert untrained.name != pretrained.name
    held_out = list(itertools.islice(pretraining_examples(0), 64))  # the tasks pretraining saw
    before, _ = loss_on(untrained, held_out)
    after, weights = loss_on(pretrained, held_out)
    _, rebuilt = loss_on(again, held_out)
    assert after < 0.8 * before
    assert all(torch.equal(weights[k], rebuilt[k]) for k in weights)  # same steps, same model


def test_benchmark_labels_are_names_never_answers_in_the_benchmark_format():
    taken = {label.lower() for task in load_benchmark().tasks.values() for label in task.labels}
    examples = list(itertools.islice(pretraining_examples(0), 5000))
    answers = {t.lower() for s, t in examples if "Option:" in s}  # the benchmark's prompt format
    names = {t.lower() for s, t in examples if s.endswith("\nTheme:")}
    two_option = {t for s, t in examples if s.endswith(".") and "Answer A or B" in s}
    assert len(answers) > 100 and not answers & taken
    assert names <= taken and len(names) > 30
    assert two_option == {"A", "B"}
    assert len(examples) == sum(1 for s, _ in examples if "Option:" in s or s.endswith("\nTheme:")
                                or "Answer A or B" in s)


def test_the_tokenizer_keeps_each_instruction_whole(tmp_path, monkeypatch):
    """Each instruction is one piece wherever it stands (after the prefixes, at the start of a
    pretraining example); the text around it gets the pieces it gets without it; the phrases are
    part of the cached folder's name."""
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path))
    plain = embedded_backbone_dir(CORPUS, TINY)
    whole = embedded_backbone_dir(CORPUS, TINY, tokenizer_phrases())
    assert plain.name != whole.name
    words, phrases = AutoTokenizer.from_pretrained(plain), AutoTokenizer.from_pretrained(whole)
    instruction = INSTRUCTIONS["SC"]  # 11 words
    for source in (build_source(load_benchmark().task("yelp"), "Text: fine words", instruction),
                   instruction + "Option: good, bad \nText: fine words\nAnswer:"):
        pieces = phrases.convert_ids_to_tokens(phrases(source).input_ids)
        assert pieces.count(instruction.strip()) == 1
        around = [p for p in pieces if p != instruction.strip()]
        assert around == words.convert_ids_to_tokens(words(source.replace(instruction, "")).input_ids)
        assert len(pieces) <= len(words(source).input_ids) - 10
