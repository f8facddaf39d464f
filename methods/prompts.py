"""Soft prompts in front of the input embeddings, for the prompt-based methods (Progressive Prompts,
L2P, LFPT5): the method's `setup` wraps the backbone in `PromptedModel`, whose `prompt` callable
gives the vectors to prepend for a batch (the same for every row, or chosen per row), or None.

peft's prompt tuning holds one prompt per adapter and prepends it whole; these methods concatenate
a growing sequence of per-task prompts, or pick prompts per example from a pool, so the prepending
is done here, once, for training and generation, on seq2seq and causal models alike:
- the prompt goes before every input token (before a causal batch's left padding too), unmasked;
- a causal batch's labels get -100 over the prompt, and its position ids count the prompt first;
- a causal `generate` returns the input ids before the new tokens, as a plain model's does.
A seq2seq model may take its prompt after the input instead (`after=True`, LFPT5's placement):
behind every row's tokens and padding, unmasked.
"""

from __future__ import annotations

from typing import Callable

import torch

PromptFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], "torch.Tensor | None"]


def source_mask(attention_mask: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """The input positions that hold source tokens: the unpadded ones, less a causal training
    batch's answer (its labels, which cover the whole row or, right-aligned, its last columns)."""
    if labels is None:
        return attention_mask.bool()
    answer = torch.zeros_like(attention_mask, dtype=torch.bool)
    answer[:, attention_mask.shape[1] - labels.shape[1]:] = labels != -100
    return attention_mask.bool() & ~answer


class PromptedModel(torch.nn.Module):
    """`model` with `prompt(input_ids, attention_mask, labels)` ([B, P, d] or None) in front of its
    inputs. The method registers its prompt modules on it as `prompts`: they are then part of the
    model, trained, saved and restored with it, and named `prompts.*` in its checkpoints."""

    # Generation cannot reuse a key/value cache of the prompt text's tokens: the soft prompt
    # comes before them, so the prompt must be read whole (harness.evaluator reads this).
    reads_whole_prompt = True

    def __init__(self, model: torch.nn.Module, prompt: PromptFn, after: bool = False):
        super().__init__()
        if after and not model.config.is_encoder_decoder:
            raise ValueError("a prompt after the input needs a seq2seq model")
        self.model = model
        self.prompt = prompt
        self.after = after

    @property
    def config(self):
        return self.model.config

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()

    def _prepended(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    labels: torch.Tensor | None = None) -> dict | None:
        prompt = self.prompt(input_ids, attention_mask, labels)
        if prompt is None:
            return None
        embeds = self.model.get_input_embeddings()(input_ids)
        n = prompt.shape[1]
        parts = [prompt.to(embeds.dtype), embeds]
        masks = [attention_mask.new_ones(len(input_ids), n), attention_mask]
        if self.after:
            parts, masks = parts[::-1], masks[::-1]
        return {"inputs_embeds": torch.cat(parts, 1), "attention_mask": torch.cat(masks, 1), "n": n}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs):
        inputs = self._prepended(input_ids, attention_mask, kwargs.get("labels"))
        if inputs is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        n = inputs.pop("n")
        if not self.config.is_encoder_decoder:
            labels = kwargs.get("labels")
            # Labels cover the whole row, unless the head is computed at the last columns only
            # (`logits_to_keep`, harness.textio), whose labels the prompt in front does not move.
            if labels is not None and "logits_to_keep" not in kwargs:
                kwargs["labels"] = torch.cat([labels.new_full((len(labels), n), -100), labels], 1)
            if kwargs.get("position_ids") is not None:
                positions = torch.arange(n, device=input_ids.device).expand(len(input_ids), n)
                kwargs["position_ids"] = torch.cat([positions, kwargs["position_ids"] + n], 1)
        return self.model(**inputs, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs):
        inputs = self._prepended(input_ids, attention_mask)
        if inputs is None:
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        inputs.pop("n")
        out = self.model.generate(**inputs, **kwargs)
        if self.config.is_encoder_decoder:
            return out
        return torch.cat([input_ids, out], 1)  # generate from embeddings returns the new tokens only
