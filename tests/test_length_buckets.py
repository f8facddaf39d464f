"""`train.pad_to_multiple_of`: training batches padded to a multiple of N tokens (few shapes for a
compiled step) compute the loss and gradients of batches padded to their longest row."""

import pytest
import torch

from harness.textio import Batcher
from harness.testing.kit import make_context
from tests.test_padding_free import examples, grad_ops, lora_llama, loss_and_grads  # noqa: F401
from tests.test_causal import llama_dir  # noqa: F401 (the fixture)
from tests.tolerance import assert_close, magnitude

MULTIPLE = 16


def assert_same_step(model, config, plain: dict, bucketed: dict) -> None:
    lengths = plain["attention_mask"].sum(1)
    loss, grads = loss_and_grads(model, plain)
    bucketed_loss, bucketed_grads = loss_and_grads(model, bucketed)
    # The extra positions are masked: the same per-token terms, summed over wider rows. The loss
    # is a mean of log-softmaxes over the vocabulary; a gradient entry as `grad_ops` says.
    assert_close(bucketed_loss, loss, ops=config.vocab_size)
    for name, grad in grads.items():
        assert_close(bucketed_grads[name], grad, ops=grad_ops(config, lengths),
                     scale=magnitude(grad))


def widths(batch: dict) -> tuple[int, int]:
    return batch["input_ids"].shape[1], batch["labels"].shape[1]


@pytest.mark.parametrize("head_at_labels", [True, False])
def test_a_causal_batch_padded_to_a_multiple_trains_as_the_plain_one(synthetic_dir, lora_llama,
                                                                     head_at_labels):
    backbone, model = lora_llama
    sources, targets = examples(synthetic_dir)
    plain = Batcher(backbone, 512, 50, head_at_labels=head_at_labels).train_batch(sources, targets)
    bucketed = Batcher(backbone, 512, 50, head_at_labels=head_at_labels,
                       pad_to_multiple_of=MULTIPLE).train_batch(sources, targets)
    assert bucketed["input_ids"].shape[1] % MULTIPLE == 0
    assert widths(bucketed) > widths(plain)  # there is extra padding to be masked
    assert_same_step(model, backbone.model.config, plain, bucketed)


def seq2seq_batches(synthetic_dir):
    """The embedded T5 (no dropout: both passes compute the same function) and the same rows
    padded to their longest and to a multiple."""
    ctx, _, _ = make_context(synthetic_dir, "seqft", tasks=("agnews",), n_train=8)
    ctx.model.eval()
    sources, targets = examples(synthetic_dir)
    plain = Batcher(ctx.backbone, 512, 50).train_batch(sources, targets)
    bucketed = Batcher(ctx.backbone, 512, 50, pad_to_multiple_of=MULTIPLE).train_batch(sources,
                                                                                       targets)
    return ctx, plain, bucketed


def test_a_seq2seq_batch_padded_to_a_multiple_trains_as_the_plain_one(synthetic_dir):
    ctx, plain, bucketed = seq2seq_batches(synthetic_dir)
    assert all(w % MULTIPLE == 0 for w in widths(bucketed)) and widths(bucketed) > widths(plain)
    assert_same_step(ctx.model, ctx.model.config, plain, bucketed)


def test_labels_padded_as_tokens_would_be_told_apart(synthetic_dir):
    """The plausible mistake: the labels' extra columns filled with the pad token, not -100 (the
    loss then also trains the model to write padding): the loss leaves the bound."""
    ctx, plain, bucketed = seq2seq_batches(synthetic_dir)
    labels = bucketed["labels"].clone()
    labels[:, plain["labels"].shape[1]:] = ctx.backbone.tokenizer.pad_token_id
    with pytest.raises(AssertionError):
        assert_same_step(ctx.model, ctx.model.config, plain, dict(bucketed, labels=labels))

