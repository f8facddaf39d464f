"""Backbones: a model plus its tokenizer, loaded from a local path, and the embedded default.

The embedded default is built offline: a tokenizer trained with the `tokenizers` library on the
benchmark's training text, and a small `T5ForConditionalGeneration` initialised from a `T5Config`
with a fixed seed. Both are saved with `save_pretrained` into the cache and then loaded through the
same code path as any `--model path/to/t5-large` or LLaMA-family checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer,
                          PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast,
                          T5Config, T5ForConditionalGeneration)
from transformers.utils import logging as hf_logging

from harness.errors import HarnessError
from harness.paths import cache_dir, cached_folder

# Bump when the embedded backbone's build changes (tokenizer training, model construction), so
# folders cached by an earlier version are not taken for this one's.
BUILD_VERSION = 4
BUILD_THREADS = 2  # pretraining's threads, whatever the caller's (see embedded_backbone_dir)


@dataclass
class Backbone:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    is_seq2seq: bool
    path: str


def load_backbone(path: str | Path, dtype: torch.dtype = torch.float32) -> Backbone:
    """Load a seq2seq (T5) or causal (LLaMA-family) model and its tokenizer from a local folder."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise HarnessError(f"{path}: not a model folder (no config.json); give a local checkpoint path")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report would print a table before our one line
    try:
        config = AutoConfig.from_pretrained(path)
        is_seq2seq = bool(getattr(config, "is_encoder_decoder", False))
        auto = AutoModelForSeq2SeqLM if is_seq2seq else AutoModelForCausalLM
        model, info = auto.from_pretrained(path, dtype=dtype, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        # transformers' own reason (a malformed config.json, an architecture that is neither
        # seq2seq nor causal, no weights file, weights of other shapes), on one line
        reason = " ".join(str(exc).split())
        if "ignore_mismatched_sizes" in reason:  # its details went to a log "above"
            reason = "its weights have other shapes than its config.json gives"
        raise HarnessError(f"--model {path}: cannot be loaded: {reason[:300]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    _check_loaded(path, config, info, tokenizer)
    if not is_seq2seq:
        # Decoder-only evaluation pads on the left so generation continues the prompt (§2.3).
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return Backbone(model=model, tokenizer=tokenizer, is_seq2seq=is_seq2seq, path=str(path))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


def _check_loaded(path: Path, config, info: dict, tokenizer) -> None:
    """What transformers loads without complaint but would train something else: weights the
    files lack (initialised at random), or a tokenizer built without its vocabulary."""
    missing = [k for k in info.get("missing_keys", []) if k not in
               getattr(config, "_tied_weights_keys", ()) and "lm_head" not in k]
    if missing:
        raise HarnessError(f"--model {path}: the weights files lack {len(missing)} tensor(s) of "
                           f"the model ({', '.join(sorted(missing)[:3])}...): they would be random")
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise HarnessError(f"--model {path}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    if len(tokenizer) > config.vocab_size:
        raise HarnessError(f"--model {path}: the tokenizer has {len(tokenizer)} tokens, the "
                           f"model's embedding {config.vocab_size}: they do not belong together")


# ----------------------------------------------------------------------------------------------
# The embedded default


@dataclass(frozen=True)
class EmbeddedSpec:
    """Shape of the embedded T5; a few million parameters, T5's own architecture."""

    d_model: int = 128
    d_ff: int = 512
    num_heads: int = 4
    d_kv: int = 32
    num_layers: int = 2
    num_decoder_layers: int = 2
    vocab_size: int = 4000
    dropout_rate: float = 0.0
    init_seed: int = 0
    # Pretraining on held-out synthetic tasks (harness.synthetic.pretraining_examples) before the
    # model is saved: optimizer steps (0: none, the model stays at its random initialisation),
    # their batch size and AdamW learning rate.
    pretrain_steps: int = 0
    pretrain_batch: int = 32
    pretrain_lr: float = 2e-3

    @classmethod
    def from_dict(cls, raw: dict) -> "EmbeddedSpec":
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise HarnessError(f"unknown embedded-model settings {sorted(unknown)}")
        for key, value in raw.items():  # numbers of the default's kind; sizes and rates positive
            default = cls.__dataclass_fields__[key].default
            kind = (int, float) if isinstance(default, float) else int
            low = 0 if key in ("pretrain_steps", "dropout_rate", "init_seed") else 1e-12
            if isinstance(value, bool) or not isinstance(value, kind) or value < low:
                raise HarnessError(f"profile setting embedded.{key} must be a "
                                   f"{'number' if kind != int else 'whole number'} "
                                   f"{'>= 0' if low == 0 else '> 0'}; got {value!r}")
        return cls(**raw)


def _train_tokenizer(texts: list[str], vocab_size: int,
                     phrases: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A T5-style tokenizer (metaspace pieces; pad=0, eos=1, unk=2; `</s>` appended), with one
    piece for each of `phrases`, wherever it stands (the spaces around it taken into the piece).

    BPE rather than T5's unigram model: on a corpus of a few thousand short texts the unigram
    trainer prunes its vocabulary to a few hundred pieces and splits common words into letters.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, \
        processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Like T5's SentencePiece model, newlines and runs of spaces become one space.
    tok.normalizer = normalizers.Replace(Regex(r"\s+"), " ")
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    # Every printable ASCII character is a piece, so text the corpus lacks is still spelt out.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                  initial_alphabet=[chr(c) for c in range(33, 127)],
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([AddedToken(p, lstrip=True, rstrip=True, normalized=True) for p in phrases])
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=512)


def pretrain(model: T5ForConditionalGeneration, tokenizer: PreTrainedTokenizerBase,
              spec: EmbeddedSpec) -> None:
    """`spec.pretrain_steps` AdamW steps on held-out synthetic tasks (seeded by `init_seed`),
    gradient norm clipped at 1; a fixed number of steps, so the same machine builds the same
    model. A plain loop: there is nothing of a run here (no method, stages or checkpoints)."""
    from harness.synthetic import pretraining_examples

    examples = pretraining_examples(spec.init_seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.pretrain_lr, fused=True)
    model.train()
    for _ in range(spec.pretrain_steps):
        sources, targets = zip(*(next(examples) for _ in range(spec.pretrain_batch)))
        batch = tokenizer(list(sources), return_tensors="pt", padding=True)
        labels = tokenizer(list(targets), return_tensors="pt", padding=True).input_ids
        labels[labels == tokenizer.pad_token_id] = -100
        model(**batch, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


def embedded_backbone_dir(corpus: Sequence[str], spec: EmbeddedSpec,
                          phrases: tuple[str, ...] = ()) -> Path:
    """Build (once) and return the folder of the embedded default for this corpus, spec and the
    phrases its tokenizer keeps whole (`_train_tokenizer`).

    The folder name is a hash of the corpus, phrases and spec, so another text gets its own
    tokenizer; the folder is written to a temporary name and renamed, so it is never half-built.
    """
    from harness.synthetic import PRETRAINING_VERSION

    digest = hashlib.sha256()
    digest.update(f"build:{BUILD_VERSION}".encode())
    digest.update(json.dumps(spec.__dict__, sort_keys=True).encode())
    if spec.pretrain_steps:  # a new version of the pretraining examples is another model
        digest.update(f"pretraining:{PRETRAINING_VERSION}".encode())
    for text in (*corpus, "\0phrases", *phrases):
        digest.update(text.encode())
        digest.update(b"\0")
    target = cache_dir() / "backbones" / f"t5-embedded-{digest.hexdigest()[:16]}"

    def build(folder: Path) -> None:
        tokenizer = _train_tokenizer(corpus, spec.vocab_size, phrases)
        config = T5Config(
            vocab_size=len(tokenizer), d_model=spec.d_model, d_ff=spec.d_ff, d_kv=spec.d_kv,
            num_heads=spec.num_heads, num_layers=spec.num_layers,
            num_decoder_layers=spec.num_decoder_layers, feed_forward_proj="relu",
            dropout_rate=spec.dropout_rate, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
            tie_word_embeddings=True)
        with torch.random.fork_rng():  # building must not disturb the caller's random state
            torch.manual_seed(spec.init_seed)
            model = T5ForConditionalGeneration(config)
            if spec.pretrain_steps:
                # A fixed thread count: the order of a reduction follows the threads, so a build
                # under another OMP_NUM_THREADS would cache another model under the same name
                # (measured: order 4's SeqLoRA AA 20.8 against 14.0 from builds under 1 and 2).
                threads = torch.get_num_threads()
                torch.set_num_threads(BUILD_THREADS)
                try:
                    pretrain(model, tokenizer, spec)
                finally:
                    torch.set_num_threads(threads)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return cached_folder(target, build)
