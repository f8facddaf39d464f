"""Turning (source, target) text into model batches, for seq2seq (T5) and causal (LLaMA) models."""

from __future__ import annotations

import torch

from harness.backbone import Backbone


class Batcher:
    """Tokenises and pads (dynamic padding: to the longest sequence of the batch)."""

    def __init__(self, backbone: Backbone, max_source_length: int, max_target_length: int,
                 device: torch.device | None = None):
        self.device = device or torch.device("cpu")  # where the batches go (the model's device)
        self.tok = backbone.tokenizer
        self.is_seq2seq = backbone.is_seq2seq
        self.max_source_length = max_source_length
        self.max_target_length = max_target_length

    def train_batch(self, sources: list[str], targets: list[str]) -> dict[str, torch.Tensor]:
        return self._to_device(self._train_batch(sources, targets))

    def eval_batch(self, sources: list[str]) -> dict[str, torch.Tensor]:
        return self._to_device(self._eval_batch(sources))

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.device.type == "cpu":
            return batch
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _train_batch(self, sources: list[str], targets: list[str]) -> dict[str, torch.Tensor]:
        """Labels are the target tokens (+ EOS); pad positions are -100 so the loss ignores them."""
        if self.is_seq2seq:
            enc = self.tok(sources, max_length=self.max_source_length, truncation=True,
                           padding=True, return_tensors="pt")
            labels = self.tok(text_target=targets, max_length=self.max_target_length,
                              truncation=True, padding=True, return_tensors="pt").input_ids
            labels[labels == self.tok.pad_token_id] = -100
            return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask,
                    "labels": labels}
        # Causal: BOS + source + label + EOS, loss on the label and EOS only (METHODS.md §2.3).
        rows, label_rows = [], []
        for src, tgt in zip(sources, targets):
            # Tokenise source and label together (a label alone can split differently), and
            # take the label's tokens as what follows the source's own tokens.
            s = self.tok(src, add_special_tokens=False).input_ids
            full = self.tok(src + " " + tgt, add_special_tokens=False).input_ids
            t = full[len(s):][: self.max_target_length]
            s = s[: self.max_source_length]
            bos = [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []
            ids = bos + s + t + [self.tok.eos_token_id]
            rows.append(ids)
            label_rows.append([-100] * (len(bos) + len(s)) + t + [self.tok.eos_token_id])
        width = max(map(len, rows))
        pad = self.tok.pad_token_id
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        labels = torch.tensor([r + [-100] * (width - len(r)) for r in label_rows])
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    def _eval_batch(self, sources: list[str]) -> dict[str, torch.Tensor]:
        if self.is_seq2seq:
            enc = self.tok(sources, max_length=self.max_source_length, truncation=True,
                           padding=True, return_tensors="pt")
            return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}
        # Causal: BOS + source, no EOS (generation continues the prompt), padded on the left.
        bos = [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []
        rows = [bos + self.tok(s, add_special_tokens=False).input_ids[: self.max_source_length]
                for s in sources]
        width = max(map(len, rows))
        pad = self.tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        return {"input_ids": input_ids, "attention_mask": mask}

    def decode(self, generated: torch.Tensor, prompt_width: int) -> list[str]:
        if self.is_seq2seq:
            return self.tok.batch_decode(generated, skip_special_tokens=True)
        # Causal: keep the continuation after the last "Answer:"; empty if it was truncated away.
        texts = self.tok.batch_decode(generated, skip_special_tokens=True,
                                      clean_up_tokenization_spaces=False)
        return [t.rsplit("Answer:", 1)[1].strip() if "Answer:" in t else "" for t in texts]
