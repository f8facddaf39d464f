"""A LLaMA-family causal LM given by a local path runs through the same code path."""

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from harness.backbone import embedded_backbone_dir
from harness.cli import main
from harness_methods import registry
from harness_methods.modifier import Modifier
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


@pytest.fixture(scope="module")
def llama_dir(synthetic_dir, tmp_path_factory):
    records = json.loads((synthetic_dir / "SC" / "IMDB" / "train.json").read_text())
    return tiny_llama(tmp_path_factory.mktemp("llama") / "model",
                      [r["sentence"] for r in records] + ["Good", "Bad"])


BASE_METHODS = sorted(n for n in registry.available()
                      if not issubclass(registry.method_class(n), Modifier))


@pytest.mark.parametrize("method", BASE_METHODS + ["seqlora+sam", "olora+rwp"])
def test_every_method_trains_and_evaluates_a_causal_model(synthetic_dir, llama_dir, tmp_path,
                                                          method):
    assert main(["run", "--method", method, "--tasks", "IMDB,SST-2", "--model", str(llama_dir),
                 "--data-dir", str(synthetic_dir), "--results", str(tmp_path / "r"),
                 "--train-per-task", "16", "--test-per-task", "8", "--no-progress"]) == 0
    run_dir = tmp_path / "r" / "default" / method / "tasks-IMDB+SST-2" / "seed0"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["model"] == str(llama_dir)
    assert len(summary["accuracy_matrix"]) == (2 if method == "mtl" else 3)
    last = sorted(run_dir.glob("stage_0[12]-*"))[-1]
    metrics = json.loads((last / "metrics.json").read_text())
    assert metrics["train"]["steps"] > 0
    # Every method that changes the backbone's weights reports their updates; the prompt methods
    # (only soft prompts train, methods.prompts) change none.
    if not all(name.startswith("prompts.") for name in metrics["saved_tensors"]):
        assert (last / "deltas.safetensors").exists()


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


def test_lwf_distils_the_logits_that_predict_the_labels(synthetic_dir, llama_dir):
    """A causal model's logits at position i predict token i + 1: the distillation term must read
    the last prompt position (it predicts the first label token) and not the EOS position (it
    predicts nothing)."""
    from harness.backbone import load_backbone
    from harness.textio import Batcher
    from harness_methods.base import Context

    for head_at_labels in (True, False):
        batcher = Batcher(load_backbone(llama_dir), 512, 50, head_at_labels=head_at_labels)
        batch = batcher.train_batch(["a long prompt here Answer:", "short Answer:"], ["Good", "Bad"])
        labels = batch["labels"]
        predicts = batcher.predicts_label(labels)
        assert predicts.sum() == (labels != -100).sum()
        for row, last in zip(range(len(labels)), (labels != -100).int().cumsum(1).argmax(1)):
            first = int((labels[row] != -100).int().argmax())
            assert predicts[row, first - 1] and not predicts[row, last]
        method = registry.create("lwf", "default")
        teacher = torch.zeros(*labels.shape, 5)
        method.teacher = lambda **_: type("Out", (), {"logits": teacher})()
        ctx = Context(model=None, backbone=None, tasks=None, data={}, profile=None,
                      seed=0, batcher=batcher)
        student = teacher.clone()
        student[:, :, 0] = predicts.float() * 3.0  # differs exactly where a label is predicted
        moved = method.penalty(ctx, batch, type("Out", (), {"logits": student})()).item()
        student[:, :, 0] = (~predicts).float() * 3.0  # differs everywhere else
        assert moved > 0 and method.penalty(ctx, batch, type("Out", (), {"logits": student})()).item() == 0


def test_a_method_that_cannot_train_the_backbone_stops_before_the_run_is_written(
        synthetic_dir, llama_dir, tmp_path, capsys):
    """N-LoRA's reference term needs square adapted layers; grouped-query attention makes v_proj
    narrower (here 32 -> 16), so the run stops with one line before its folder is created."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(llama_dir)
    config.num_key_value_heads = 1
    torch.manual_seed(0)
    gqa = tmp_path / "gqa"
    LlamaForCausalLM(config).save_pretrained(gqa)
    AutoTokenizer.from_pretrained(llama_dir).save_pretrained(gqa)
    results = tmp_path / "r"
    args = ["run", "--method", "nlora", "--tasks", "IMDB,SST-2", "--model", str(gqa), "--data-dir",
            str(synthetic_dir), "--results", str(results), "--train-per-task", "16",
            "--test-per-task", "8", "--no-progress"]
    capsys.readouterr()  # transformers' bar while saving the model
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "v_proj maps 32 -> 16" in err and "paper_full" in err
    assert not results.exists()
    assert main(args + ["--set", "method.l1_form='paper_full'"]) == 0  # the paper's form fits


def test_a_cached_backbone_is_built_once_while_others_wait_and_killed_builds_are_swept(tmp_path):
    """Concurrent builders of one cached folder: one builds, the rest wait for it; what a killed
    build left (a temporary folder, a target without its config) is removed by the next builder."""
    import threading
    import time

    from harness.paths import cached_folder

    target = tmp_path / "backbones" / "model-abc"
    target.parent.mkdir()
    (target.parent / f".build-{target.name}-killed").mkdir()  # a killed build's leftover
    target.mkdir()  # a damaged target: no config.json
    builds = []

    def build(folder):
        builds.append(folder)
        time.sleep(0.3)  # long enough for the other threads to reach the lock
        (folder / "config.json").write_text("{}")

    threads = [threading.Thread(target=cached_folder, args=(target, build)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and (target / "config.json").exists()
    assert sorted(p.name for p in target.parent.iterdir()) == [f".{target.name}.lock", target.name]
