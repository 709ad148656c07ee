"""The functional inner loop in float64: against hand-computed steps and finite differences."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_meta.inner_loop import adapt, forward, functional_gradients, named_params
from lightning_meta.models import Conv4


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def smooth_net() -> nn.Module:
    # Tanh, not ReLU: finite differences need a smooth function.
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))


def data(seed: int, n: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g), torch.randn(n, 2, generator=g)


def mse_of(module: nn.Module, x: torch.Tensor, y: torch.Tensor):
    return lambda params: (forward(module, params, x) - y).pow(2).mean()


def test_one_step_equals_hand_computed_sgd_on_linear_regression():
    torch.manual_seed(0)
    module = nn.Linear(3, 2)
    x, y = data(1)
    w, b = module.weight.detach().clone(), module.bias.detach().clone()
    residual = x @ w.T + b - y  # loss = mean(residual²) over n·2 entries
    scale = 2.0 / residual.numel()
    grad_w, grad_b = scale * residual.T @ x, scale * residual.sum(0)
    theta = adapt(mse_of(module, x, y), named_params(module), steps=1, step_size=0.3)
    assert len(theta) == 2
    torch.testing.assert_close(theta[1]["weight"], w - 0.3 * grad_w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(theta[1]["bias"], b - 0.3 * grad_b, rtol=1e-12, atol=1e-12)


def maml_objective(module: nn.Module, steps: int, first_order: bool, step_size=0.1):
    support, query = data(1), data(2)
    names = [n for n, _ in module.named_parameters()]

    def objective(*flat: torch.Tensor) -> torch.Tensor:
        params = dict(zip(names, flat, strict=True))
        trajectory = adapt(mse_of(module, *support), params, steps, step_size, first_order)
        return mse_of(module, *query)(trajectory[-1])

    return objective, [p.detach().clone().requires_grad_() for p in module.parameters()]


@pytest.mark.parametrize("steps", [1, 3])
def test_second_order_meta_gradient_matches_finite_differences(steps):
    objective, flat = maml_objective(smooth_net(), steps, first_order=False)
    assert torch.autograd.gradcheck(objective, tuple(flat), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_first_order_gradient_is_the_query_gradient_at_the_adapted_params():
    module = smooth_net()
    support, query = data(1), data(2)
    params = named_params(module)
    trajectory = adapt(mse_of(module, *support), params, steps=2, step_size=0.1, first_order=True)
    meta_grads = torch.autograd.grad(mse_of(module, *query)(trajectory[-1]), list(params.values()))
    adapted = {n: p.detach().requires_grad_() for n, p in trajectory[-1].items()}
    expected = torch.autograd.grad(mse_of(module, *query)(adapted), list(adapted.values()))
    for got, want in zip(meta_grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # And it differs from the second-order gradient (the test would pass vacuously otherwise).
    objective, flat = maml_objective(module, 2, first_order=False)
    second = torch.autograd.grad(objective(*flat), flat)
    assert max((a - b).abs().max() for a, b in zip(meta_grads, second, strict=True)) > 1e-6


def test_dict_step_sizes_apply_per_parameter_and_skip_missing_names():
    module = smooth_net()
    x, y = data(1)
    params = named_params(module)
    grads = dict(zip(params, torch.autograd.grad(mse_of(module, x, y)(params), list(params.values())), strict=True))
    sizes = {"0.weight": 0.5, "2.bias": torch.tensor(0.25)}
    theta1 = adapt(mse_of(module, x, y), params, 1, sizes)[1]
    for name, p in params.items():
        expected = p - sizes[name] * grads[name] if name in sizes else p
        torch.testing.assert_close(theta1[name], expected, rtol=1e-12, atol=1e-12)
    # Per-parameter tensors of the parameters' own shapes (Meta-SGD) work element-wise.
    alpha = {n: torch.full_like(p, 0.1) for n, p in params.items()}
    elementwise = adapt(mse_of(module, x, y), params, 1, alpha)[1]
    scalar = adapt(mse_of(module, x, y), params, 1, 0.1)[1]
    for name in params:
        torch.testing.assert_close(elementwise[name], scalar[name], rtol=1e-12, atol=1e-12)


def test_per_step_step_sizes_equal_successive_single_steps():
    module = smooth_net()
    x, y = data(1)
    loss = mse_of(module, x, y)
    params = named_params(module)
    two = adapt(loss, params, 2, [0.3, 0.05])
    first = adapt(loss, params, 1, 0.3)[1]
    second = adapt(loss, first, 1, 0.05)[1]
    for name in params:
        torch.testing.assert_close(two[2][name], second[name], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="2 per-step step sizes for 3 inner steps"):
        adapt(loss, params, 3, [0.3, 0.05])


def test_learned_step_sizes_receive_meta_gradients():
    module = smooth_net()
    support, query = data(1), data(2)
    params = named_params(module)
    alpha = {n: torch.full_like(p, 0.1, requires_grad=True) for n, p in params.items()}
    adapted = adapt(mse_of(module, *support), params, 2, alpha)[-1]
    grads = torch.autograd.grad(mse_of(module, *query)(adapted), list(alpha.values()))
    assert all(g.abs().sum() > 0 for g in grads)


def test_adapting_leaves_the_module_untouched():
    module = smooth_net()
    before = copy.deepcopy(module.state_dict())
    x, y = data(1)
    trajectory = adapt(mse_of(module, x, y), named_params(module), 3, 0.5)
    assert len(trajectory) == 4 and trajectory[0]["0.weight"] is module[0].weight
    assert all(p.grad is None for p in module.parameters())
    for name, value in module.state_dict().items():
        assert torch.equal(value, before[name]), name
    # The adapted parameters did move.
    assert (trajectory[-1]["0.weight"] - before["0.weight"]).abs().max() > 1e-3


def test_inner_loop_adapts_even_under_no_grad():
    module = smooth_net()
    x, y = data(1)
    loss = mse_of(module, x, y)
    with torch.no_grad():
        trajectory = adapt(loss, named_params(module), 5, 0.1)
        assert loss(trajectory[-1]) < loss(trajectory[0])


def test_second_order_through_batchnorm_conv4_matches_finite_differences():
    torch.manual_seed(0)
    module = Conv4(in_channels=1, hidden_channels=2, out_features=3)
    g = torch.Generator().manual_seed(3)
    xs, xq = torch.randn(6, 1, 16, 16, generator=g), torch.randn(6, 1, 16, 16, generator=g)
    ys, yq = torch.arange(6) % 3, (torch.arange(6) + 1) % 3
    names = [n for n, _ in module.named_parameters()]
    ce = torch.nn.functional.cross_entropy

    def objective(*flat: torch.Tensor) -> torch.Tensor:
        params = dict(zip(names, flat, strict=True))
        theta = adapt(lambda p: ce(forward(module, p, xs), ys), params, 1, 0.4)[-1]
        return ce(forward(module, theta, xq), yq)

    flat = tuple(p.detach().clone().requires_grad_() for p in module.parameters())
    assert torch.autograd.gradcheck(objective, flat, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_negative_steps_are_rejected():
    module = smooth_net()
    with pytest.raises(ValueError, match="inner steps=-1"):
        adapt(mse_of(module, *data(1)), named_params(module), -1, 0.1)


def test_a_mis_named_parameter_is_refused_naming_it_and_the_closest_real_name():
    # Before this check, functional_call(strict=False) dropped `wieght` and used the module's
    # own weight: the adapted value never reached the forward pass and nothing said so.
    module = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    params = {"wieght": torch.zeros(2, 3), "bias": torch.zeros(2)}
    with pytest.raises(KeyError, match=r"Linear has no parameter or buffer named 'wieght' \(closest: 'weight'\)"):
        forward(module, params, x)
    with pytest.raises(KeyError, match=r"'0\.wieght' \(closest: '0\.weight'.*'2\.bais' \(closest: '2\.bias'"):
        forward(smooth_net(), {"0.wieght": torch.zeros(5, 3), "2.bais": torch.zeros(2)}, x)
    with pytest.raises(KeyError, match=r"named 'context'; .*the module has: bias, weight\)"):
        forward(module, {"context": torch.zeros(3)}, x)


def test_forward_takes_any_subset_of_parameters_and_buffers():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    module.eval()  # normalise with the running statistics, so replacing a buffer shows
    x = torch.randn(5, 3)
    assert torch.equal(forward(module, {}, x), module(x))
    replaced = {"0.bias": torch.zeros(4), "1.running_mean": torch.ones(4)}
    expected = copy.deepcopy(module)
    with torch.no_grad():
        expected[0].bias.zero_()
        expected[1].running_mean.fill_(1.0)
    torch.testing.assert_close(forward(module, replaced, x), expected(x), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(expected(x), module(x))


def test_a_parameter_registered_after_the_first_call_is_accepted():
    # The valid names are cached per module; a miss must look again before refusing.
    module = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    forward(module, {}, x)
    module.scale = nn.Parameter(torch.ones(1))
    assert torch.equal(forward(module, {"scale": torch.zeros(1)}, x), module(x))


def test_forward_checks_names_under_vmap_and_functional_gradients():
    # The task-parallel path: per-task adaptation vmapped over tasks, inner gradients from
    # torch.func.grad. Good names give the loop's result; a bad name is refused there too.
    module = smooth_net()
    g = torch.Generator().manual_seed(5)
    xs, ys = torch.randn(4, 7, 3, generator=g), torch.randn(4, 7, 2, generator=g)
    params = {n: p.detach() for n, p in named_params(module).items()}

    def adapted(names: dict[str, str]):
        def per_task(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            renamed = {names.get(n, n): p for n, p in params.items()}
            theta = adapt(lambda p: (forward(module, p, x) - y).pow(2).mean(), renamed, 2, 0.1, first_order=True)
            return forward(module, theta[-1], x)

        with functional_gradients():
            return torch.func.vmap(per_task)(xs, ys)

    looped = torch.stack([mse_adapted_forward(module, params, x, y) for x, y in zip(xs, ys, strict=True)])
    torch.testing.assert_close(adapted({}), looped, rtol=1e-12, atol=1e-12)
    with pytest.raises(KeyError, match=r"'2\.wieght' \(closest: '2\.weight'"):
        adapted({"2.weight": "2.wieght"})


def mse_adapted_forward(module: nn.Module, params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    theta = adapt(lambda p: (forward(module, p, x) - y).pow(2).mean(), params, 2, 0.1, first_order=True)
    return forward(module, theta[-1], x).detach()
