"""SAM and RWP: checked on a quadratic loss, where every gradient is known in closed form."""

import pytest
import torch

from harness.errors import HarnessError
from harness_methods import registry
from harness_methods.base import Context, Method
from harness_methods.rwp import RWP, noise_std
from harness_methods.sam import SAM
from tests.tolerance import assert_close, magnitude

H = torch.tensor([[3.0, 1.0], [1.0, 2.0]])
# autograd's gradient of 0.5 theta^T H theta: two halves of 2-term rows, added and halved
GRADIENT_OPS = 2 * 2 + 2


def terms(*points):
    """The magnitude of the terms of H x at `points`: |H| |x|."""
    return max(magnitude(H.abs() @ x.abs()) for x in points)


class Quadratic(torch.nn.Module):
    """L(theta) = 0.5 theta^T H theta, plus a frozen weight RWP's full scope may perturb."""

    def __init__(self):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        self.frozen = torch.nn.Parameter(torch.tensor([0.5, 4.0]), requires_grad=False)

    def loss(self):
        return 0.5 * self.theta @ H @ self.theta + 0 * self.frozen.sum()


def setup(modifier_cls, **settings):
    model = Quadratic()
    ctx = Context(model=model, backbone=None, tasks=(), data={}, profile=None, seed=0)
    method = modifier_cls(Method({"lr": 0.1}), settings)
    method.trainable_parameters(ctx)

    def closure():
        loss = model.loss()
        loss.backward()
        return loss.detach()

    return model, ctx, method, closure


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_gradient_is_taken_at_the_perturbed_point_and_weights_restored(adaptive):
    rho = 0.1
    model, ctx, method, closure = setup(SAM, rho=rho, adaptive=adaptive)
    theta = model.theta.detach().clone()
    g = H @ theta
    if adaptive:
        eps = rho * theta ** 2 * g / (theta.abs() * g).norm()
    else:
        eps = rho * g / g.norm()
    method.step(ctx, closure)
    assert torch.equal(model.theta.detach(), theta)  # restored exactly (copied back)
    # eps carries the first gradient's rounding and its own (a 2-term norm, its square root, up
    # to four products and the division); then theta + eps, and the gradient there
    assert_close(model.theta.grad, H @ (theta + eps), ops=2 * GRADIENT_OPS + 8 + 1,
                 scale=terms(theta + eps))


def test_sam_with_rho_zero_is_the_base_gradient():
    model, ctx, method, closure = setup(SAM, rho=0.0)
    theta = model.theta.detach().clone()
    method.step(ctx, closure)
    assert_close(model.theta.grad, H @ theta, ops=GRADIENT_OPS, scale=terms(theta))


@pytest.mark.parametrize("scope", ["lora", "full"])
def test_rwp_gradient_is_the_stated_mixture(scope, monkeypatch):
    model, ctx, method, closure = setup(RWP, sigma=0.1, scope=scope, **{"lambda": 0.3})
    method.generator = torch.Generator().manual_seed(0)
    theta, frozen = model.theta.detach().clone(), model.frozen.detach().clone()
    fixed = {"theta": torch.tensor([0.2, -0.1]), "frozen": torch.tensor([1.0, 1.0])}
    monkeypatch.setattr(method, "sample_noise", lambda tensors: [
        fixed["theta"] if t is model.theta else fixed["frozen"] for t in tensors])
    method.step(ctx, closure)
    expected = 0.3 * (H @ (theta + fixed["theta"])) + 0.7 * (H @ theta)
    # the shifted point, two gradients, and the mixture's two products and sum
    assert_close(model.theta.grad, expected, ops=1 + GRADIENT_OPS + 3,
                 scale=terms(theta, theta + fixed["theta"]))
    assert torch.equal(model.theta.detach(), theta) and torch.equal(model.frozen.detach(), frozen)
    assert model.frozen.grad is None  # only the trainable parameters get gradients


def test_rwp_noise_scale_follows_the_weights_magnitude():
    """var_abs: std = sigma sqrt|theta|. With 200k draws per magnitude the sample std is within 1%
    of the true one with overwhelming probability (relative standard error ~ 1/sqrt(2n) = 0.16%)."""
    sigma = 0.05
    generator = torch.Generator().manual_seed(0)
    for size in (0.01, 1.0, 9.0):  # a statistical bound (above), not a rounding one
        theta = torch.full((200_000,), size)
        noise = torch.randn(theta.shape, generator=generator) * noise_std(theta, sigma, "var_abs")
        assert noise.std().item() == pytest.approx(sigma * size ** 0.5, rel=0.01)
    w = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    # a row's 2-term norm, its square root, sigma times it (and the expected 0.1's rounding)
    assert_close(noise_std(w, 0.1, "filter"), torch.tensor([[0.5, 0.5], [0.1, 0.1]]), ops=4)
    assert torch.equal(noise_std(w, 0.1, "std_abs"), 0.1 * w)  # the same product (w >= 0): bitwise


def test_rwp_with_sigma_zero_is_the_base_gradient():
    model, ctx, method, closure = setup(RWP, sigma=0.0)
    method.generator = torch.Generator().manual_seed(0)
    theta = model.theta.detach().clone()
    method.step(ctx, closure)
    # the two passes' gradients (noise 0: the same point) mixed by two products and a sum
    assert_close(model.theta.grad, H @ theta, ops=GRADIENT_OPS + 3, scale=terms(theta))


def test_composition_by_name():
    method = registry.create("olora+sam", "default")
    assert isinstance(method, SAM) and method.base.name == "olora"
    assert method.base.config["lambda1"] == 0.5 and method.config["rho"] == 0.05
    assert method.recorded_config() == {**method.base.config, "sam": method.config}
    with pytest.raises(HarnessError, match="is a modifier"):
        registry.create("sam", "default")
    with pytest.raises(HarnessError, match="not a modifier"):
        registry.create("seqlora+olora", "default")


def test_a_modifier_forwards_every_hook_but_the_step():
    """Each hook of `Method` reaches the base method through a modifier, except `step` (the
    modifier's own); a hook added to `Method` later fails here until it is forwarded."""
    import inspect

    from harness_methods.base import Method
    from harness_methods.modifier import FORWARDED, Modifier

    hooks = {name for name, member in vars(Method).items() if inspect.isfunction(member)
             and not name.startswith("_") and name not in ("choice", "number", "flag",
                                                           "module_targets", "recorded_config")}
    assert hooks - set(FORWARDED) == {"step", "trainable_parameters"}
    calls = []

    class Base(Method):
        def after_task(self, ctx):
            calls.append(("after_task", ctx))

        def state_dict(self):
            return {"from": "base"}

    modifier = Modifier(Base({"lr": 1e-3}))
    modifier.after_task("ctx")
    assert calls == [("after_task", "ctx")] and modifier.state_dict() == {"from": "base"}
