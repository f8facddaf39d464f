"""Turning (source, target) text into model batches, for seq2seq (T5) and causal (LLaMA) models."""

from __future__ import annotations

import inspect

import torch

from harness.backbone import Backbone


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count a left-padded row's real tokens only (padding at 0), so that each row
    is computed as it would be unpadded."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


# Token ids of each text, kept for the process, by what fixes them: the tokenizer (its class, files
# and size), the model kind and the length bounds. A sweep's job process runs many runs on the same
# tasks; tokenising them again in each run was 4% of its time on the embedded default.
_token_ids: dict[tuple, dict[tuple[str, bool], list[int]]] = {}


class Batcher:
    """Tokenises and pads (dynamic padding: to the longest sequence of the batch).

    Each distinct text is tokenised once per process and its ids kept (a stage sees every
    training example once per epoch, every test set is evaluated after every stage, and a job
    process runs a sweep's runs on the same tasks); a batch is then only padded. Texts are
    tokenised one by one, so a cached batch is identical to tokenising the batch afresh.
    """

    def __init__(self, backbone: Backbone, max_source_length: int, max_target_length: int,
                 device: torch.device | None = None, head_at_labels: bool = True,
                 pad_to_multiple_of: int = 0):
        self.device = device or torch.device("cpu")  # where the batches go (the model's device)
        # Training batches padded to a multiple of this many tokens (0: to the longest row): the
        # widths a stage's steps take are then few, which a compiled step needs (a new shape
        # retraces it; a CUDA graph is recorded per shape). Masked, the extra padding changes
        # nothing but rounding; evaluation batches stay as they are.
        self.pad_to_multiple_of = pad_to_multiple_of
        self.tok = backbone.tokenizer
        self.is_seq2seq = backbone.is_seq2seq
        self.max_source_length = max_source_length
        self.max_target_length = max_target_length
        self._cache = _token_ids.setdefault(
            (type(self.tok).__name__, self.tok.name_or_path, len(self.tok), self.is_seq2seq,
             max_source_length, max_target_length), {})
        # Causal models whose forward can compute the head at the last positions only (the
        # vocabulary projection is a fifth of SmolLM2's forward); others get whole-row logits.
        self.head_at_labels = not self.is_seq2seq and head_at_labels and \
            "logits_to_keep" in inspect.signature(backbone.model.forward).parameters

    def _ids(self, texts: list[str], target: bool = False, **kwargs) -> list[list[int]]:
        """Token ids of each text (`target`: tokenised as a label), tokenising only unseen ones,
        in one batched call."""
        missing = [t for t in dict.fromkeys(texts) if (t, target) not in self._cache]
        if missing:
            encoded = (self.tok(text_target=missing, **kwargs) if target
                       else self.tok(missing, **kwargs)).input_ids
            self._cache.update(((t, target), ids) for t, ids in zip(missing, encoded))
        return [self._cache[(t, target)] for t in texts]

    def source_lengths(self, sources: list[str]) -> list[int]:
        """Token count of each source, as a training batch tokenises it (for grouping by length)."""
        kwargs = dict(max_length=self.max_source_length, truncation=True) if self.is_seq2seq \
            else dict(add_special_tokens=False)
        return [len(ids) for ids in self._ids(sources, **kwargs)]

    def _pad(self, rows: list[list[int]], value: int, left: bool = False,
             multiple: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(map(len, rows))
        if multiple > 1:
            width = -(-width // multiple) * multiple
        fill = [[value] * (width - len(r)) for r in rows]
        ids = [f + r if left else r + f for r, f in zip(rows, fill)]
        mask = [[0] * len(f) + [1] * len(r) if left else [1] * len(r) + [0] * len(f)
                for r, f in zip(rows, fill)]
        return torch.tensor(ids), torch.tensor(mask)

    def train_batch(self, sources: list[str], targets: list[str],
                    packed: bool = False) -> dict[str, torch.Tensor]:
        """A training batch; `packed`: a causal model's rows one after another in one row, no
        padding (where the model can compute its head at chosen positions; a seq2seq model's
        batch is padded whatever `packed` says)."""
        batch = self._packed_batch(sources, targets) if packed and self.head_at_labels \
            else self._train_batch(sources, targets)
        # No key/value cache: transformers builds one by default, which nothing reads in training
        # (measured: 5% of a training step of the embedded default on CPU).
        return self._to_device({**batch, "use_cache": False})

    def eval_batch(self, sources: list[str]) -> dict[str, torch.Tensor]:
        return self._to_device(self._eval_batch(sources))

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.device.type == "cpu":
            return batch
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in batch.items()}

    def _causal_rows(self, sources: list[str], targets: list[str]
                     ) -> tuple[list[list[int]], list[list[int]]]:
        """Each causal training row (BOS + source + label + EOS) and its label tokens (label + EOS).
        Source and label are tokenised together (a label alone can split differently), and the
        label's tokens taken as what follows the source's own tokens."""
        rows, label_rows = [], []
        plain = self._ids(sources, add_special_tokens=False)
        joint = self._ids([src + " " + tgt for src, tgt in zip(sources, targets)],
                          add_special_tokens=False)
        bos = [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []
        for s, full in zip(plain, joint):
            t = full[len(s):][: self.max_target_length] + [self.tok.eos_token_id]
            rows.append(bos + s[: self.max_source_length] + t)
            label_rows.append(t)
        return rows, label_rows

    def _packed_batch(self, sources: list[str], targets: list[str]) -> dict[str, torch.Tensor]:
        """Padding-free: the rows one after another in a single row, position ids restarting at
        each (transformers then masks attention to each row's own tokens: its packed-sequence
        mask, which needs no attention mask and no cache). The head runs only where the loss reads
        it: for each row the K + 1 positions from the last source token to EOS, whose labels
        (-100, then the K label tokens) the loss shifts as it would a whole row's; a row's EOS
        logit meets the next row's -100."""
        rows, label_rows = self._causal_rows(sources, targets)
        keep, labels, start = [], [], 0
        for row, label in zip(rows, label_rows):
            end = start + len(row)
            keep += range(end - len(label) - 1, end)
            labels += [-100] + label
            start = end
        return {"input_ids": torch.tensor([[token for row in rows for token in row]]),
                "position_ids": torch.tensor([[i for row in rows for i in range(len(row))]]),
                "labels": torch.tensor([labels]), "logits_to_keep": torch.tensor(keep)}

    def _train_batch(self, sources: list[str], targets: list[str]) -> dict[str, torch.Tensor]:
        """Labels are the target tokens (+ EOS); pad positions are -100 so the loss ignores them."""
        m = self.pad_to_multiple_of
        if self.is_seq2seq:
            input_ids, mask = self._pad(self._ids(sources, max_length=self.max_source_length,
                                                  truncation=True), self.tok.pad_token_id, multiple=m)
            labels, _ = self._pad(self._ids(targets, target=True, max_length=self.max_target_length,
                                            truncation=True), -100, multiple=m)
            return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
        # Causal: BOS + source + label + EOS, loss on the label and EOS only.
        rows, label_rows = self._causal_rows(sources, targets)
        if not self.head_at_labels:
            input_ids, mask = self._pad(rows, self.tok.pad_token_id, multiple=m)
            labels, _ = self._pad([[-100] * (len(r) - len(t)) + t for r, t in zip(rows, label_rows)],
                                  -100, multiple=m)
            return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
        # The language-model head only where the loss reads it: padded on the left, every row ends
        # at the last column, so the labels sit in the last K columns and the logits that predict
        # them in the K + 1 before the end. transformers computes just those (`logits_to_keep`), and
        # its loss shifts the K + 1 kept labels as it would the whole row. Position ids count real
        # tokens only, so each row is computed as it would be unpadded.
        input_ids, mask = self._pad(rows, self.tok.pad_token_id, left=True, multiple=m)
        labels, _ = self._pad(label_rows, -100, left=True, multiple=m)
        keep = min(labels.shape[1] + 1, input_ids.shape[1])
        labels = torch.cat([torch.full((len(rows), keep - labels.shape[1]), -100), labels], dim=1)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
                "position_ids": position_ids(mask), "logits_to_keep": keep}

    def predicts_label(self, labels: torch.Tensor) -> torch.Tensor:
        """Which logit positions of a training batch predict a label token: a seq2seq decoder's
        sit at their labels; a causal model's logits at position i predict token i + 1."""
        is_label = labels != -100
        if self.is_seq2seq:
            return is_label
        return torch.cat([is_label[:, 1:], torch.zeros_like(is_label[:, :1])], dim=1)

    def _eval_batch(self, sources: list[str]) -> dict[str, torch.Tensor]:
        if self.is_seq2seq:
            input_ids, mask = self._pad(self._ids(sources, max_length=self.max_source_length,
                                                  truncation=True), self.tok.pad_token_id)
            return {"input_ids": input_ids, "attention_mask": mask}
        # Causal: BOS + source, no EOS (generation continues the prompt), padded on the left.
        input_ids, mask = self._pad(self.prompt_rows(sources), self.tok.pad_token_id, left=True)
        return {"input_ids": input_ids, "attention_mask": mask}

    def prompt_rows(self, sources: list[str]) -> list[list[int]]:
        """A causal model's prompt token ids: BOS + the truncated source."""
        bos = [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []
        return [bos + ids[: self.max_source_length]
                for ids in self._ids(sources, add_special_tokens=False)]

    def eval_batch_after_prefix(self, sources: list[str], n_prefix: int) -> dict[str, torch.Tensor]:
        """A causal generation batch whose first `n_prefix` prompt tokens, the same in every row,
        are already in a key/value cache: the prefix, then each row's rest padded on the left (the
        padding sits between them, masked; positions count real tokens only)."""
        rows = self.prompt_rows(sources)
        rest, rest_mask = self._pad([r[n_prefix:] for r in rows], self.tok.pad_token_id, left=True)
        prefix = torch.tensor([rows[0][:n_prefix]]).expand(len(rows), -1)
        return self._to_device({"input_ids": torch.cat([prefix, rest], dim=1),
                                "attention_mask": torch.cat([torch.ones_like(prefix), rest_mask], 1)})

    def decode(self, generated: torch.Tensor, prompt_width: int) -> list[str]:
        if self.is_seq2seq:
            return self.tok.batch_decode(generated, skip_special_tokens=True)
        # Causal: keep the continuation after the last "Answer:"; empty if it was truncated away.
        texts = self.tok.batch_decode(generated, skip_special_tokens=True,
                                      clean_up_tokenization_spaces=False)
        return [t.rsplit("Answer:", 1)[1].strip() if "Answer:" in t else "" for t in texts]
