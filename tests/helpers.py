"""Small real pieces for method tests: the embedded T5 on two synthetic tasks."""

from pathlib import Path

import torch

from harness.backbone import EmbeddedSpec, embedded_backbone_dir, load_backbone
from harness.benchmark import load_benchmark
from harness.data import load_instructions, load_task
from harness.profiles import load_profile
from harness.textio import Batcher
from harness.trainer import FitSettings, fit
from harness_methods import registry
from harness_methods.base import Context
from tests.tolerance import assert_close, magnitude

TINY = EmbeddedSpec(d_model=32, d_ff=64, num_heads=2, d_kv=16, num_layers=1, num_decoder_layers=1,
                    vocab_size=600)


def make_context(data_dir: Path, method_name: str, tasks=("agnews", "yahoo"), n_train=32,
                 settings: dict | None = None):
    """`settings` replace entries of the method's config for the default profile."""
    bench = load_benchmark()
    instructions = load_instructions(data_dir)
    seq = bench.sequence(list(tasks))
    data = {t.name: load_task(data_dir, t, instructions, train_per_task=n_train, test_per_task=8)
            for t in seq}
    corpus = [s for d in data.values() for s in list(d.train["source"]) + list(d.train["target"])]
    backbone = load_backbone(embedded_backbone_dir(corpus, TINY))
    profile = load_profile("default")
    config = {**registry.method_config(method_name, profile.name), **(settings or {})}
    method = registry.method_class(method_name)(config)
    torch.manual_seed(0)
    batcher = Batcher(backbone, 512, 50)
    ctx = Context(model=backbone.model, backbone=backbone, tasks=seq, data=data, profile=profile,
                  seed=0, batcher=batcher)
    return ctx, method, batcher


def train_stage(ctx, method, batcher, stage):
    ctx.stage = stage
    method.before_task(ctx)
    fit(ctx, method, batcher, FitSettings(batch_size=8, seed=stage, progress=False))
    method.after_task(ctx)


def at_second_stage(data_dir: Path, method_name: str, **kwargs):
    """Context, method and batcher after training stage 1, with stage 2 prepared (before_task)."""
    ctx, method, batcher = make_context(data_dir, method_name, **kwargs)
    method.setup(ctx)
    train_stage(ctx, method, batcher, 0)
    ctx.stage = 1
    method.before_task(ctx)
    return ctx, method, batcher


def assert_lora_output(layer, x, adapters):
    """A bias-free LoRA layer computes W0 x + sum over `adapters` of s B A x, up to rounding: the
    d_in- and r-term sums, the scalings and the sums over paths, of the magnitude of their terms,
    |W0| |x| + sum s |B| |A| |x|."""
    with torch.no_grad():
        expected = layer.base_layer(x) + sum(
            layer.scaling[a] * layer.lora_B[a](layer.lora_A[a](x)) for a in adapters)
        terms = x.abs() @ layer.base_layer.weight.abs().T + sum(
            layer.scaling[a] * (x.abs() @ layer.lora_A[a].weight.abs().T)
            @ layer.lora_B[a].weight.abs().T for a in adapters)
        ops = layer.in_features + max(layer.r[a] for a in adapters) + len(adapters) + 2
        assert_close(layer(x), expected, ops=ops, scale=magnitude(terms))
