"""Padding-free training for causal models (`train.padding_free`): a step's rows packed into one
row with restarting position ids computes the loss and gradients of the padded batch."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from harness.backbone import load_backbone
from harness.cli import main
from harness.textio import Batcher
from tests.test_causal import llama_dir  # noqa: F401 (the fixture)
from tests.tolerance import assert_close, magnitude


@pytest.fixture(scope="module")
def lora_llama(llama_dir):  # noqa: F811
    backbone = load_backbone(llama_dir)
    torch.manual_seed(0)
    model = get_peft_model(backbone.model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                      target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():  # B = 0 at the start would leave A's gradient 0
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(1))
    return backbone, model


def examples(synthetic_dir, n=8):
    """Rows of different lengths: sources of two tasks and labels of one or more tokens."""
    rows = []
    for path in ("SC/IMDB", "TC/yahoo"):
        records = json.loads((synthetic_dir / path / "train.json").read_text())[: n // 2]
        rows += [(r["sentence"], r["label"]) for r in records]
    return [r[0] for r in rows], [r[1] for r in rows]


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def grad_ops(config, lengths) -> int:
    """The rounding chain of a gradient entry: a sum over every token of the batch, each term
    through the feed-forward width (a LLaMA's `intermediate_size`, a T5's `d_ff`) and an
    attention row."""
    width = getattr(config, "intermediate_size", None) or config.d_ff
    return int(lengths.sum()) + width + int(lengths.max())


def test_a_packed_batch_gives_the_padded_batchs_loss_and_gradients(synthetic_dir, lora_llama):
    backbone, model = lora_llama
    batcher = Batcher(backbone, 512, 50)
    sources, targets = examples(synthetic_dir)
    padded = batcher.train_batch(sources, targets)
    packed = batcher.train_batch(sources, targets, packed=True)
    lengths = padded["attention_mask"].sum(1)
    assert packed["input_ids"].shape == (1, int(lengths.sum()))
    assert int(lengths.min()) < int(lengths.max())  # there was padding to drop
    loss, grads = loss_and_grads(model, padded)
    packed_loss, packed_grads = loss_and_grads(model, packed)
    # Both sum the same per-token terms in another order: the loss over the label tokens, each a
    # log-softmax over the vocabulary; a gradient entry as `grad_ops` says.
    assert_close(packed_loss, loss, ops=backbone.model.config.vocab_size)
    for name, grad in grads.items():
        assert_close(packed_grads[name], grad, ops=grad_ops(backbone.model.config, lengths),
                     scale=magnitude(grad))


def test_rows_that_see_each_other_would_be_told_apart(synthetic_dir, lora_llama):
    """The plausible mistakes: positions that run on across rows (the model then attends across
    them as one long text), or a cache left on (transformers then ignores the packing): the
    gradients leave the bound the packed batch keeps to."""
    backbone, model = lora_llama
    batcher = Batcher(backbone, 512, 50)
    sources, targets = examples(synthetic_dir)
    padded = batcher.train_batch(sources, targets)
    _, grads = loss_and_grads(model, padded)
    packed = batcher.train_batch(sources, targets, packed=True)
    running = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1])[None])
    cached = dict(packed, use_cache=True)
    ops = grad_ops(backbone.model.config, padded["attention_mask"].sum(1))
    for wrong in (running, cached):
        _, wrong_grads = loss_and_grads(model, wrong)
        with pytest.raises(AssertionError, match="max .difference"):
            for name, grad in grads.items():
                assert_close(wrong_grads[name], grad, ops=ops, scale=magnitude(grad))


def test_a_padding_free_run_trains_and_prompt_methods_stay_padded(synthetic_dir, llama_dir,  # noqa: F811
                                                                  tmp_path):
    for method in ("seqlora", "progprompt"):
        assert main(["run", "--method", method, "--tasks", "IMDB,SST-2", "--model",
                     str(llama_dir), "--data-dir", str(synthetic_dir), "--results",
                     str(tmp_path / "r"), "--train-per-task", "16", "--test-per-task", "8",
                     "--no-progress", "--set", "train.padding_free=true"]) == 0
        run_dir = tmp_path / "r" / "default" / method / "tasks-IMDB+SST-2" / "seed0"
        config = json.loads((run_dir / "config.json").read_text())
        assert config["profile"]["padding_free"] is True
        assert len(json.loads((run_dir / "summary.json").read_text())["accuracy_matrix"]) == 3
