"""Turning (source, target) text into model batches, for seq2seq (T5) and causal (LLaMA) models."""

from __future__ import annotations

import torch

from harness.backbone import Backbone


class Batcher:
    """Tokenises and pads (dynamic padding: to the longest sequence of the batch).

    Each distinct text is tokenised once per run and its ids kept (a stage sees every training
    example once per epoch, and every test set is evaluated after every stage); a batch is then
    only padded. Texts are tokenised one by one, so a cached batch is identical to tokenising the
    batch afresh.
    """

    def __init__(self, backbone: Backbone, max_source_length: int, max_target_length: int,
                 device: torch.device | None = None):
        self.device = device or torch.device("cpu")  # where the batches go (the model's device)
        self.tok = backbone.tokenizer
        self.is_seq2seq = backbone.is_seq2seq
        self.max_source_length = max_source_length
        self.max_target_length = max_target_length
        self._cache: dict[tuple[str, bool], list[int]] = {}

    def _ids(self, texts: list[str], target: bool = False, **kwargs) -> list[list[int]]:
        """Token ids of each text (`target`: tokenised as a label), tokenising only unseen ones,
        in one batched call."""
        missing = [t for t in dict.fromkeys(texts) if (t, target) not in self._cache]
        if missing:
            encoded = (self.tok(text_target=missing, **kwargs) if target
                       else self.tok(missing, **kwargs)).input_ids
            self._cache.update(((t, target), ids) for t, ids in zip(missing, encoded))
        return [self._cache[(t, target)] for t in texts]

    def _pad(self, rows: list[list[int]], value: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(map(len, rows))
        fill = [[value] * (width - len(r)) for r in rows]
        ids = [f + r if left else r + f for r, f in zip(rows, fill)]
        mask = [[0] * len(f) + [1] * len(r) if left else [1] * len(r) + [0] * len(f)
                for r, f in zip(rows, fill)]
        return torch.tensor(ids), torch.tensor(mask)

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
            input_ids, mask = self._pad(self._ids(sources, max_length=self.max_source_length,
                                                  truncation=True), self.tok.pad_token_id)
            labels, _ = self._pad(self._ids(targets, target=True, max_length=self.max_target_length,
                                            truncation=True), -100)
            return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
        # Causal: BOS + source + label + EOS, loss on the label and EOS only (METHODS.md §2.3).
        rows, label_rows = [], []
        # Tokenise source and label together (a label alone can split differently), and take the
        # label's tokens as what follows the source's own tokens.
        plain = self._ids(sources, add_special_tokens=False)
        joint = self._ids([src + " " + tgt for src, tgt in zip(sources, targets)],
                          add_special_tokens=False)
        for s, full in zip(plain, joint):
            t = full[len(s):][: self.max_target_length]
            s = s[: self.max_source_length]
            bos = [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []
            ids = bos + s + t + [self.tok.eos_token_id]
            rows.append(ids)
            label_rows.append([-100] * (len(bos) + len(s)) + t + [self.tok.eos_token_id])
        input_ids, mask = self._pad(rows, self.tok.pad_token_id)
        labels, _ = self._pad(label_rows, -100)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    def _eval_batch(self, sources: list[str]) -> dict[str, torch.Tensor]:
        if self.is_seq2seq:
            input_ids, mask = self._pad(self._ids(sources, max_length=self.max_source_length,
                                                  truncation=True), self.tok.pad_token_id)
            return {"input_ids": input_ids, "attention_mask": mask}
        # Causal: BOS + source, no EOS (generation continues the prompt), padded on the left.
        bos = [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []
        rows = [bos + ids[: self.max_source_length]
                for ids in self._ids(sources, add_special_tokens=False)]
        input_ids, mask = self._pad(rows, self.tok.pad_token_id, left=True)
        return {"input_ids": input_ids, "attention_mask": mask}

    def decode(self, generated: torch.Tensor, prompt_width: int) -> list[str]:
        if self.is_seq2seq:
            return self.tok.batch_decode(generated, skip_special_tokens=True)
        # Causal: keep the continuation after the last "Answer:"; empty if it was truncated away.
        texts = self.tok.batch_decode(generated, skip_special_tokens=True,
                                      clean_up_tokenization_spaces=False)
        return [t.rsplit("Answer:", 1)[1].strip() if "Answer:" in t else "" for t in texts]
