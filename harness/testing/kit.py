"""Small real pieces for testing a method plugin: the embedded T5 on synthetic tasks, a context its
hooks can be called with, a stage trained the way the harness trains one, a whole run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from harness.backbone import EmbeddedSpec, embedded_backbone_dir, load_backbone
from harness.benchmark import load_benchmark
from harness.data import load_instructions, load_task
from harness.profiles import load_profile
from harness.store import RunDir, RunSpec
from harness.textio import Batcher
from harness.trainer import FitSettings, fit
from harness_methods import registry
from harness_methods.base import Context, Method

# A T5 small enough that a hook test takes a second: the shape, not the size, is what hooks see.
TINY = EmbeddedSpec(d_model=32, d_ff=64, num_heads=2, d_kv=16, num_layers=1, num_decoder_layers=1,
                    vocab_size=600)


def synthetic_benchmark(folder: Path, n_train: int = 120, n_test: int = 40) -> Path:
    """The synthetic benchmark (every task of the CL benchmark, generated offline) in `folder`."""
    from harness.synthetic import generate

    return generate(Path(folder), n_train=n_train, n_test=n_test)


def make_context(data_dir: Path, method_name: str, tasks=("agnews", "yahoo"), n_train: int = 32,
                 settings: dict[str, Any] | None = None, seed: int = 0
                 ) -> tuple[Context, Method, Batcher]:
    """A context on the tiny T5 with `tasks` of `data_dir` (`n_train` training and 8 test examples
    each), the method built with its settings for the default profile (`settings` replace some),
    and the batcher; nothing trained or set up yet."""
    bench = load_benchmark()
    instructions = load_instructions(data_dir)
    seq = bench.sequence(list(tasks))
    data = {t.name: load_task(data_dir, t, instructions, train_per_task=n_train, test_per_task=8)
            for t in seq}
    corpus = [s for d in data.values() for s in list(d.train["source"]) + list(d.train["target"])]
    backbone = load_backbone(embedded_backbone_dir(corpus, TINY))
    profile = load_profile("default")
    method = build_method(method_name, profile.name, settings or {})
    torch.manual_seed(seed)
    batcher = Batcher(backbone, 512, 50)
    ctx = Context(model=backbone.model, backbone=backbone, tasks=seq, data=data, profile=profile,
                  seed=seed, batcher=batcher)
    return ctx, method, batcher


def build_method(name: str, profile: str, settings: dict[str, Any]) -> Method:
    """The method as a run builds it, with `settings` replacing some of the base method's."""
    base_name, *modifiers = name.split("+")
    cls = registry.method_class(base_name)
    method = cls({**registry.method_config(base_name, profile, cls), **settings})
    for modifier in modifiers:
        mod_cls = registry.method_class(modifier)
        method = mod_cls(method, registry.method_config(modifier, profile, mod_cls))
    method.name = name
    return method


def train_stage(ctx: Context, method: Method, batcher: Batcher, stage: int) -> None:
    """`before_task`, training (batch 8, the profile's epochs) and `after_task` of one stage."""
    ctx.stage = stage
    method.before_task(ctx)
    fit(ctx, method, batcher, FitSettings(batch_size=8, seed=stage, progress=False))
    method.after_task(ctx)


def at_stage(data_dir: Path, method_name: str, stage: int = 1, **kwargs
             ) -> tuple[Context, Method, Batcher]:
    """Context, method and batcher with stages 0 .. `stage` - 1 trained and `stage` prepared
    (`before_task` called): where a term that reads earlier tasks is defined."""
    ctx, method, batcher = make_context(data_dir, method_name, **kwargs)
    method.setup(ctx)
    for earlier in range(stage):
        train_stage(ctx, method, batcher, earlier)
    ctx.stage = stage
    method.before_task(ctx)
    return ctx, method, batcher


def at_second_stage(data_dir: Path, method_name: str, **kwargs):
    """`at_stage(..., stage=1)`: the first task trained, the second prepared."""
    return at_stage(data_dir, method_name, 1, **kwargs)


def run_method(method: str, data_dir: Path, results: Path, tasks=("agnews", "SST-2"),
               train_per_task: int = 32, test_per_task: int = 8, seed: int = 0,
               settings: tuple[str, ...] = (), profile: str = "default") -> RunDir:
    """One whole run in this process, as `harness run --method METHOD --tasks ...` makes it
    (`settings`: `--set` arguments, `method.KEY=VALUE` or `section.key=value`); its folder."""
    runner, spec = prepared_run(method, data_dir, results, tasks, train_per_task, test_per_task,
                                seed, settings, profile)
    runner.run(spec)
    return runner.run_dir(spec)


def prepared_run(method: str, data_dir: Path, results: Path, tasks, train_per_task: int,
                 test_per_task: int, seed: int, settings: tuple[str, ...], profile: str):
    """The runner and run of `run_method`, before the run starts (a check may adjust the runner)."""
    from harness.runner import Options, runner_for

    method_sets = tuple(s for s in settings if s.startswith("method."))
    options = Options(results=Path(results), data_dir=Path(data_dir), train_per_task=train_per_task,
                      test_per_task=test_per_task, progress=False, method_overrides=method_sets,
                      profile_overrides=tuple(s for s in settings if s not in method_sets))
    spec = RunSpec(method=method, tasks=tuple(tasks), seed=seed, profile=profile, order=None)
    return runner_for(profile, options), spec
