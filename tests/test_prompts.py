"""Progressive Prompts, L2P and the soft-prompt wrapper, checked against the references' formulas.

A plausible mistake each check catches (each was tried once and failed the test): the prompts
concatenated oldest first, the reparameterisation without its residual, the earlier prompts left
trainable, a prompt initialised off the vocabulary, the prompt after the input, a causal batch's
position ids not shifted by the prompt; L2P ranking keys by dot product or ascending, its prompts
not in similarity order, the pull term over batch x N, the query reading the answer.
"""

import json

import torch

from harness_methods.prompts import PromptedModel
from tests.helpers import at_second_stage, make_context
from tests.tolerance import assert_close, bound, magnitude, network_ops


def reference_input(ctx, method, batch):
    """The reference's encoder input at task k: [f_k(P_k); f_{k-1}(P_{k-1}); ...; f_1(P_1); x]."""
    embed = ctx.model.get_input_embeddings()
    prompts = []
    for task_prompt in reversed(method.prompts):  # newest first
        p = task_prompt.vectors
        net = task_prompt.mlp.net
        prompts.append(p + net(p))  # the residual reparameterisation
    prompt = torch.cat(prompts, 0).unsqueeze(0).expand(len(batch["input_ids"]), -1, -1)
    mask = torch.cat([torch.ones(len(batch["input_ids"]), prompt.shape[1], dtype=torch.long),
                      batch["attention_mask"]], 1)
    return torch.cat([prompt, embed(batch["input_ids"])], 1), mask


def test_progressive_prompts_prepend_newest_first_and_train_only_the_newest(synthetic_dir):
    ctx, method, batcher = at_second_stage(synthetic_dir, "progprompt",
                                           settings={"prompt_length": 3, "bottleneck": 16})
    assert isinstance(ctx.model, PromptedModel) and len(method.prompts) == 2
    ctx.model.eval()  # no dropout: the two computations below are the same arithmetic
    train = ctx.task_data.train
    batch = batcher.train_batch(list(train["source"][:4]), list(train["target"][:4]))
    out = ctx.model(**batch)
    embeds, mask = reference_input(ctx, method, batch)
    expected = ctx.model.model(inputs_embeds=embeds, attention_mask=mask, labels=batch["labels"])
    tokens = embeds.shape[1]
    # The same network on the same inputs: its forward chain of roundings bounds the difference.
    assert_close(out.logits, expected.logits, ops=network_ops(ctx.model.config, tokens),
                 scale=magnitude(expected.logits))
    out.loss.backward()
    newest, earlier = method.prompts[1], method.prompts[0]
    assert newest.vectors.grad is not None and newest.vectors.grad.abs().sum() > 0
    assert all(p.grad is not None for p in newest.mlp.parameters())
    assert all(p.grad is None and not p.requires_grad for p in earlier.parameters())
    assert all(p.grad is None for p in ctx.model.model.parameters())  # the backbone is frozen
    assert {id(p) for p in method.trainable_parameters(ctx)} == {id(p) for p in newest.parameters()}


def test_a_new_prompt_starts_as_random_vocabulary_embeddings(synthetic_dir):
    ctx, method, _ = make_context(synthetic_dir, "progprompt", settings={"prompt_length": 5})
    method.setup(ctx)
    method.before_task(ctx)
    vectors = method.prompts[0].vectors.detach()
    table = ctx.model.get_input_embeddings().weight.detach()
    # Each vector is a row of the embedding table, copied exactly.
    assert all(bool((table == v).all(1).any()) for v in vectors)


def test_prompted_generation_and_causal_batches_match_the_reference_layout(synthetic_dir, tmp_path):
    from harness.backbone import load_backbone
    from harness.textio import Batcher
    from tests.test_causal import tiny_llama

    records = json.loads((synthetic_dir / "SC" / "IMDB" / "train.json").read_text())
    backbone = load_backbone(tiny_llama(tmp_path / "llama", [r["sentence"] for r in records]
                                        + ["Good", "Bad"]))
    model = backbone.model.eval()
    with torch.no_grad():  # sharp attention, so that positions matter (at initialisation it is uniform)
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30)
            layer.self_attn.k_proj.weight.mul_(30)
    torch.manual_seed(0)
    prompt = torch.randn(1, 4, model.config.hidden_size)
    wrapped = PromptedModel(model, lambda ids, mask, labels: prompt.expand(len(ids), -1, -1))
    batcher = Batcher(backbone, 512, 50)
    sources = [r["sentence"] for r in records[:3]]
    batch = batcher.train_batch(sources, ["Good", "Bad", "Good"])
    out = wrapped(**batch)
    # By hand: the prompt before the (left-padded) row, positions counting it first, and the
    # loss read at the same label positions.
    embeds = torch.cat([prompt.expand(3, -1, -1), model.get_input_embeddings()(batch["input_ids"])], 1)
    mask = torch.cat([torch.ones(3, 4, dtype=torch.long), batch["attention_mask"]], 1)
    positions = torch.cat([torch.arange(4).expand(3, 4), batch["position_ids"] + 4], 1)
    expected = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                     labels=batch["labels"], logits_to_keep=batch["logits_to_keep"])
    tokens = embeds.shape[1]
    assert_close(out.loss, expected.loss, ops=network_ops(model.config, tokens),
                 scale=float(expected.loss.detach()))
    assert_close(out.logits, expected.logits, ops=network_ops(model.config, tokens),
                 scale=magnitude(expected.logits))
    # Generation: the input ids, then what the model generates after [prompt; input].
    gen = batcher.eval_batch(sources)
    ids = wrapped.generate(**gen, max_new_tokens=3, do_sample=False, pad_token_id=batcher.tok.pad_token_id)
    assert torch.equal(ids[:, :gen["input_ids"].shape[1]], gen["input_ids"])
    direct = model.generate(inputs_embeds=torch.cat([prompt.expand(3, -1, -1),
                                                     model.get_input_embeddings()(gen["input_ids"])], 1),
                            attention_mask=torch.cat([torch.ones(3, 4, dtype=torch.long),
                                                      gen["attention_mask"]], 1),
                            max_new_tokens=3, do_sample=False, pad_token_id=batcher.tok.pad_token_id)
    assert torch.equal(ids[:, gen["input_ids"].shape[1]:], direct)


# -- L2P ------------------------------------------------------------------------------------------
def test_l2p_selects_the_nearest_keys_by_cosine_and_pulls_them_as_the_reference():
    from harness_methods.l2p import PromptPool

    pool = PromptPool(4, 2, 3, torch.Generator().manual_seed(0))
    with torch.no_grad():  # keys of different lengths: the dot product would rank them otherwise
        pool.keys.copy_(torch.tensor([[10.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 5.0]]))
    query = torch.tensor([[0.0, 2.0, 0.1], [1.0, 0.9, 0.0]])
    prompts, pulled = pool.select(query, top_n=2)
    cos = torch.nn.functional.cosine_similarity(query.unsqueeze(1), pool.keys.unsqueeze(0), dim=-1)
    order = cos.argsort(dim=1, descending=True)[:, :2]
    assert order.tolist() == [[1, 2], [2, 0]]
    expected = torch.stack([torch.cat([pool.prompts[i] for i in row]) for row in order.tolist()])
    assert torch.equal(prompts, expected)  # [B, N * L, d], the most similar first
    # The pull term: the selected keys' cosine with their query, summed, over the batch size.
    total = cos.gather(1, order).sum() / 2
    assert_close(pulled, total, ops=8, scale=2.0)
    pulled.backward()
    assert pool.keys.grad[3].abs().sum() == 0  # chosen by no query: not pulled


def test_l2p_query_reads_the_frozen_backbone_on_the_source_alone(synthetic_dir, tmp_path):
    from harness.backbone import load_backbone
    from harness.textio import Batcher
    from harness_methods.base import Context
    from harness_methods.l2p import L2P
    from tests.test_causal import tiny_llama

    records = json.loads((synthetic_dir / "SC" / "IMDB" / "train.json").read_text())
    backbone = load_backbone(tiny_llama(tmp_path / "llama", [r["sentence"] for r in records]
                                        + ["Good", "Bad"]))
    method = L2P({"lr": 1e-3, "pool_size": 4, "prompt_length": 2, "top_n": 2})
    ctx = Context(model=backbone.model, backbone=backbone, tasks=(), data={}, profile=None, seed=0)
    method.setup(ctx)
    batcher = Batcher(backbone, 512, 50)
    sources = [r["sentence"] for r in records[:3]]
    train = batcher.train_batch(sources, ["Good", "Bad", "Good"])
    generate = batcher.eval_batch(sources)
    with_answer = method.query(train["input_ids"], train["attention_mask"], train["labels"])
    alone = method.query(generate["input_ids"], generate["attention_mask"], None)
    # Causal attention: the source's states do not see the answer after it; the two batches pad
    # to other widths, so only rounding differs.
    assert_close(with_answer, alone, ops=network_ops(backbone.model.config, train["input_ids"].shape[1]),
                 scale=magnitude(alone))
    # Training the prompts moves neither the backbone nor the query.
    out = ctx.model(**train)
    (out.loss + method.penalty(ctx, train, out)["key_pull"]).backward()
    assert all(p.grad is None for p in backbone.model.parameters())
    assert method.pool.prompts.grad is not None and method.pool.keys.grad is not None


def test_prompted_t5_generates_what_its_forward_scores(synthetic_dir):
    """Generation and training see the same prompted input: a prompted T5's first generation
    step scores the vocabulary as its forward does at the decoder start, not as the plain model."""
    ctx, method, batcher = make_context(synthetic_dir, "progprompt", settings={"prompt_length": 4})
    method.setup(ctx)
    method.before_task(ctx)
    ctx.model.eval()
    batch = batcher.eval_batch(list(ctx.task_data.test["source"][:8]))
    generated = ctx.model.generate(**batch, max_new_tokens=1, do_sample=False, num_beams=1,
                                   output_logits=True, return_dict_in_generate=True)
    start = torch.full((len(batch["input_ids"]), 1), ctx.model.config.decoder_start_token_id)
    with torch.no_grad():
        logits = ctx.model(**batch, decoder_input_ids=start).logits[:, -1]
        plain = ctx.model.model(**batch, decoder_input_ids=start).logits[:, -1]
    ops = network_ops(ctx.model.config, batch["input_ids"].shape[1] + 4)
    assert_close(generated.logits[0], logits, ops=ops, scale=magnitude(logits))
    assert float((logits - plain).abs().max()) > 10 * bound(magnitude(logits), ops)  # far beyond rounding
