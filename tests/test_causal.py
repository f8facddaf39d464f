"""A LLaMA-family causal LM given by a local path runs through the same code path."""

import json

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from harness.backbone import embedded_backbone_dir
from harness.cli import main
from tests.helpers import TINY


def tiny_llama(path, corpus):
    tokenizer = AutoTokenizer.from_pretrained(embedded_backbone_dir(corpus, TINY))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_causal_model_trains_and_evaluates(synthetic_dir, tmp_path):
    records = json.loads((synthetic_dir / "SC" / "IMDB" / "train.json").read_text())
    model = tiny_llama(tmp_path / "llama", [r["sentence"] for r in records] + ["Good", "Bad"])
    for method in ("seqlora", "inclora", "seqft"):
        assert main(["run", "--method", method, "--tasks", "IMDB,SST-2", "--model", str(model),
                     "--data-dir", str(synthetic_dir), "--results", str(tmp_path / "r"),
                     "--train-per-task", "16", "--test-per-task", "8", "--no-progress"]) == 0
    run_dir = tmp_path / "r" / "default" / "seqlora" / "tasks-IMDB+SST-2" / "seed0"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["model"] == str(model) and len(summary["accuracy_matrix"]) == 3
    metrics = json.loads((run_dir / "stage_01-IMDB" / "metrics.json").read_text())
    assert metrics["train"]["steps"] > 0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"] == str(model)


def test_causal_batches_mask_the_prompt_and_pad_left(synthetic_dir, tmp_path):
    from harness.backbone import load_backbone
    from harness.textio import Batcher

    records = json.loads((synthetic_dir / "SC" / "IMDB" / "train.json").read_text())
    backbone = load_backbone(tiny_llama(tmp_path / "llama", [r["sentence"] for r in records] + ["Good", "Bad"]))
    batcher = Batcher(backbone, 512, 50)
    tok = backbone.tokenizer
    batch = batcher.train_batch(["a long prompt here Answer:", "short Answer:"], ["Good", "Bad"])
    for row, labels, target in zip(batch["input_ids"], batch["labels"], ["Good", "Bad"]):
        kept = [int(t) for t in labels if t != -100]
        assert tok.decode(kept, skip_special_tokens=True).strip() == target  # loss on label only
        assert kept[-1] == tok.eos_token_id
    ev = batcher.eval_batch(["a long prompt here Answer:", "short Answer:"])
    assert ev["attention_mask"][1, 0] == 0 and ev["attention_mask"][1, -1] == 1  # left padding
    assert tok.eos_token_id not in ev["input_ids"][0].tolist()  # the prompt is continued
