"""CAVIA: only the context adapts in the inner loop, only θ in the outer step; float64 checks of
the meta-gradient; FiLM and input conditioning; vmap parity; refusals by name."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_meta.algorithms import CAVIA, MAML
from lightning_meta.models import MLP, ContextConditioned, Conv4
from lightning_meta.task import Task, TaskBatch

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def sine_task(seed: int, shots: int = 10) -> Task:
    g = torch.Generator().manual_seed(seed)
    amplitude, phase = 0.1 + 4.9 * torch.rand(1, generator=g), torch.pi * torch.rand(1, generator=g)
    x = 10 * torch.rand(2 * shots, 1, generator=g) - 5
    y = amplitude * torch.sin(x + phase)
    return Task(x[:shots], y[:shots], x[shots:], y[shots:])


def sine_cavia(**kwargs) -> CAVIA:
    torch.manual_seed(0)
    return CAVIA(MLP(in_features=6, hidden_sizes=[16, 16]), context_size=5, **kwargs)


def image_batch(tasks: int = 3, ways: int = 3, shots: int = 2, side: int = 16) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1)
    return TaskBatch(
        support_x=torch.randn(tasks, ways * shots, 1, side, side, generator=g),
        support_y=labels,
        query_x=torch.randn(tasks, ways * shots, 1, side, side, generator=g),
        query_y=labels.clone(),
    )


def film_cavia(norm: str = "batch", **kwargs) -> CAVIA:
    torch.manual_seed(0)
    backbone = Conv4(hidden_channels=4, out_features=3, norm=norm, image_size=16)
    return CAVIA(backbone, context_size=3, condition="film", inner_lr=0.5, **kwargs)


def test_the_inner_loop_adapts_only_the_context_and_the_outer_step_only_theta():
    model = sine_cavia(inner_steps=2)
    trajectory = model.adapt(sine_task(0), 2)
    assert [set(p) for p in trajectory] == [{"context"}] * 3
    assert torch.equal(trajectory[0]["context"], torch.zeros(5))
    assert trajectory[-1]["context"].abs().max() > 0  # φ moved
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.training_step(TaskBatch.stack([sine_task(0), sine_task(1)]), 0).backward()
    optimizer.step()
    assert all(not torch.equal(p, theta[n]) for n, p in model.named_parameters())  # θ moved
    assert torch.equal(model.backbone.context, torch.zeros(5))  # φ is reset per task, never learned
    assert "backbone.context" not in dict(model.named_parameters())


def test_second_order_meta_gradient_against_a_hand_written_reference():
    model = sine_cavia(inner_steps=2, inner_lr=0.7)
    task = sine_task(3)
    model.zero_grad()
    model.training_step(TaskBatch.stack([task]), 0).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}

    # The reference: the MLP's layers by hand, φ's two inner steps with autograd, create_graph.
    weights = [model.backbone.backbone.net[i] for i in (0, 2, 4)]

    def net(x, phi):
        h = torch.cat([x, phi.expand(x.shape[0], -1)], dim=1)
        for i, layer in enumerate(weights):
            h = F.linear(h, layer.weight, layer.bias)
            h = torch.relu(h) if i < 2 else h
        return h

    phi = torch.zeros(5, requires_grad=True)
    for _ in range(2):
        (g,) = torch.autograd.grad(F.mse_loss(net(task.support_x, phi), task.support_y), phi, create_graph=True)
        phi = phi - 0.7 * g
    params = [p for layer in weights for p in (layer.weight, layer.bias)]
    expected = torch.autograd.grad(F.mse_loss(net(task.query_x, phi), task.query_y), params)
    names = [f"backbone.backbone.net.{i}.{k}" for i in (0, 2, 4) for k in ("weight", "bias")]
    for name, reference in zip(names, expected, strict=True):
        torch.testing.assert_close(got[name], reference, rtol=1e-12, atol=1e-12, msg=name)
    # Second order matters here: the first-order meta-gradient differs.
    first = sine_cavia(inner_steps=2, inner_lr=0.7, first_order=True)
    first.training_step(TaskBatch.stack([task]), 0).backward()
    assert (first.backbone.backbone.net[0].weight.grad - got["backbone.backbone.net.0.weight"]).abs().max() > 1e-6


def test_film_meta_gradient_matches_finite_differences():
    model = film_cavia(inner_steps=1)
    batch = image_batch(tasks=1)
    film_bias = model.backbone.film.bias

    def meta_loss(bias):
        with torch.no_grad():
            film_bias.copy_(bias)
        return model.training_step(batch, 0).detach()

    model.zero_grad()
    model.training_step(batch, 0).backward()
    analytic = film_bias.grad.clone()
    base = film_bias.detach().clone()
    eps = 1e-6
    for i in range(0, base.numel(), 3):
        plus, minus = base.clone(), base.clone()
        plus[i] += eps
        minus[i] -= eps
        numeric = (meta_loss(plus) - meta_loss(minus)) / (2 * eps)
        torch.testing.assert_close(analytic[i], numeric, rtol=1e-5, atol=1e-8)
    assert analytic.abs().max() > 1e-4


def test_film_modulates_the_named_layer_with_gamma_and_beta_of_the_context():
    torch.manual_seed(0)
    backbone = Conv4(hidden_channels=4, out_features=3, image_size=16)
    wrapped = ContextConditioned(backbone, 3, condition="film")
    x = torch.randn(5, 1, 16, 16)
    captured = {}
    wrapped.backbone.features[2][1].register_forward_hook(lambda m, a, out: captured.update(out=out))
    wrapped.backbone.features[2][0].register_forward_hook(lambda m, a, out: captured.update(conv=out))
    context = torch.tensor([0.3, -1.0, 2.0])
    torch.func.functional_call(wrapped, {"context": context}, (x,))
    gamma, beta = wrapped.film(context).split(4)
    normed = F.batch_norm(captured["conv"], None, None, wrapped.backbone.features[2][1].weight,
                          wrapped.backbone.features[2][1].bias, training=True)  # fmt: skip
    torch.testing.assert_close(captured["out"], gamma.view(1, -1, 1, 1) * normed + beta.view(1, -1, 1, 1))


@pytest.mark.parametrize("build", [sine_cavia, lambda: film_cavia("plain_batch")], ids=["input", "film"])
def test_vmap_gives_the_loop_meta_gradient_in_float64(build):
    model = build()
    batch = image_batch() if model.backbone.condition == "film" else TaskBatch.stack([sine_task(i) for i in range(3)])
    grads = {}
    for path in ("loop", "vmap"):
        model.zero_grad()
        model.task_batching = path
        model.training_step(batch, 0).backward()
        grads[path] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, reference in grads["loop"].items():
        torch.testing.assert_close(grads["vmap"][name], reference, rtol=1e-10, atol=1e-12, msg=name)


def test_cavia_adapts_far_fewer_numbers_than_maml():
    cavia = sine_cavia()
    maml = MAML(MLP(hidden_sizes=[16, 16]))
    assert cavia.adapted_parameters() == 5
    assert sum(p.numel() for p in maml.parameters()) == 1 * 16 + 16 + 16 * 16 + 16 + 16 + 1


def test_bad_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match=r"context_size=0 must be at least 1 \(model.init_args.context_size\)"):
        CAVIA(MLP(in_features=1), context_size=0)
    with pytest.raises(ValueError, match="condition='concat' is not one of"):
        CAVIA(MLP(in_features=6), condition="concat")
    with pytest.raises(ValueError, match=r"film_at='features.9' is not a submodule of Conv4"):
        CAVIA(Conv4(out_features=3), condition="film", film_at="features.9")
    with pytest.raises(
        ValueError, match="takes 1 inputs, but the data has 1 and the context 5: build it with in_features=6"
    ):
        sine_cavia_wrong = CAVIA(MLP(in_features=1), context_size=5)
        sine_cavia_wrong.adapt(sine_task(0), 1)
