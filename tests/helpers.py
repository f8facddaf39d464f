"""Small real pieces for method tests: the testing kit's (harness.testing), and a LoRA check."""

import torch

from harness.profiles import load_profile
from harness.testing.kit import TINY, at_second_stage, at_stage, make_context, train_stage  # noqa: F401
from tests.tolerance import assert_close, magnitude

# The step counts that tests assert, and the steps at which they kill a run, follow the default
# profile's epochs and batch size, so that the profile can change without touching them.
DEFAULT = load_profile("default")


def steps_per_stage(examples: int) -> int:
    """Optimizer steps of one stage of `examples` training examples on the default profile."""
    return DEFAULT.epochs * -(-examples // DEFAULT.batch_size)


def inside_stage_2(examples: int) -> int:
    """A training step inside stage 2, counted from the run's start (for a kill point)."""
    per_stage = steps_per_stage(examples)
    return per_stage + per_stage // 2


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
