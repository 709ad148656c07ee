"""The learned LSTM optimizer (Andrychowicz et al. 2016): its gradient preprocessing, exact
meta-gradients through the unroll (float64 gradcheck), and truncated back-propagation (its
checkpoint, CLI and resume tests: tests/test_learned_update_rules_training.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

from lightning_meta.algorithms import MAML
from lightning_meta.data import SinusoidDataModule
from lightning_meta.inner_loop import adapt, inner_gradients
from lightning_meta.models import MLP
from lightning_meta.update_rules import SGD, LearnedOptimizer, preprocess_gradients, truncated_unroll

REPO = Path(__file__).resolve().parents[1]


def test_gradient_preprocessing_is_the_papers_formula(float64):
    p = 10.0
    g = torch.tensor([2.0, -0.5, 1e-3, math.exp(-p), -1e-6, 0.0])
    expected = torch.tensor(
        [
            [math.log(2.0) / p, 1.0],
            [math.log(0.5) / p, -1.0],
            [math.log(1e-3) / p, 1.0],
            [-1.0, 1.0],  # |g| = e^-p: the log branch, log(e^-p)/p = -1
            [-1.0, -math.exp(p) * 1e-6],  # small: (-1, e^p g)
            [-1.0, 0.0],
        ]
    )
    torch.testing.assert_close(preprocess_gradients(g, p), expected, rtol=1e-14, atol=1e-14)
    # Differentiable, with finite derivatives at g = 0 (second-order meta-gradients go through it).
    g = torch.tensor([0.0, 1e-6, 3.0], requires_grad=True)
    (grad,) = torch.autograd.grad(preprocess_gradients(g).sum(), g)
    torch.testing.assert_close(grad, torch.tensor([math.exp(p), math.exp(p), 1 / (3.0 * p)]))


def quadratic(seed: int = 0, dim: int = 3):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(dim, dim, generator=g), torch.randn(dim, generator=g)
    theta0 = {"theta": torch.randn(dim, generator=g)}

    def loss(params):
        return ((a @ params["theta"] - b) ** 2).sum()

    return loss, theta0


class ForcedSGD(LearnedOptimizer):
    """The learned optimizer with its LSTM's proposal forced to −α·g."""

    def __init__(self, lr: float) -> None:
        super().__init__(hidden_size=2, layers=1)
        self.lr = lr

    def propose(self, flat_grads, state):
        return -self.lr * flat_grads, state


def test_a_learned_optimizer_forced_to_minus_alpha_g_is_sgd_exactly(float64):
    """Its plumbing (flatten, split, state, the step added) is SGD's: same trajectory and meta-gradient."""
    torch.manual_seed(0)
    batch = next(iter(SinusoidDataModule(shots=5, query_shots=5, tasks_per_batch=3).train_dataloader()))
    batch = type(batch)(**{k: v.double() for k, v in vars(batch).items()})
    sgd = MAML(MLP(hidden_sizes=[8, 8]), inner_lr=0.05, inner_steps=3)
    forced = MAML(MLP(hidden_sizes=[8, 8]), inner_steps=3, update_rule=ForcedSGD(0.05))
    forced.backbone.load_state_dict(sgd.backbone.state_dict())
    results = []
    for model in (sgd, forced):
        model.train()
        trajectory = model.adapt(batch[0], 3)
        loss = model(batch).loss.mean()
        grads = torch.autograd.grad(loss, list(model.backbone.parameters()))
        results.append((trajectory, loss, grads))
    (t_sgd, l_sgd, g_sgd), (t_forced, l_forced, g_forced) = results
    for a, b in zip(t_sgd, t_forced, strict=True):
        for n in a:
            torch.testing.assert_close(b[n], a[n], rtol=0, atol=1e-12)
    torch.testing.assert_close(l_forced, l_sgd, rtol=0, atol=1e-12)
    for a, b in zip(g_sgd, g_forced, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)


def test_meta_gradients_through_the_unroll_pass_gradcheck(float64):
    torch.manual_seed(0)
    rule = LearnedOptimizer(hidden_size=3, output_scale=0.3)
    names = [n for n, _ in rule.named_parameters()]
    loss, theta0 = quadratic()

    def final_loss(*weights):
        params, state = theta0, rule.init_state(theta0)
        for step in range(3):  # second order: the support gradients keep their graph
            grads = inner_gradients(loss, params, first_order=False)
            params, state = functional_call(rule, dict(zip(names, weights, strict=True)), (params, grads, state, step))
        return loss(params)

    weights = tuple(p.detach().clone().requires_grad_() for p in rule.parameters())
    assert torch.autograd.gradcheck(final_loss, weights, eps=1e-6, atol=1e-6, rtol=1e-5)
    grads = torch.autograd.grad(final_loss(*weights), weights)
    assert all(g.abs().max() > 0 for g in grads), "every LSTM weight gets a meta-gradient"


def manual_unroll(loss, params, rule, steps, state=None):
    state = rule.init_state(params) if state is None else state
    losses = []
    for step in range(steps):
        params, state = rule(params, inner_gradients(loss, params, first_order=True), state, step)
        losses.append(loss(params))
    return torch.stack(losses).mean(), params, state


def test_one_window_covering_the_unroll_gives_the_full_unrolls_meta_gradient(float64):
    torch.manual_seed(0)
    rule = LearnedOptimizer(hidden_size=4, output_scale=0.1)
    loss, theta0 = quadratic(dim=5)
    windows = list(truncated_unroll(loss, theta0, rule, steps=6, window=6))
    assert len(windows) == 1
    trajectory = adapt(loss, theta0, 6, rule, first_order=True)
    full = torch.stack([loss(p) for p in trajectory[1:]]).mean()
    torch.testing.assert_close(windows[0][0], full, rtol=1e-13, atol=0)
    got = torch.autograd.grad(windows[0][0], list(rule.parameters()))
    want = torch.autograd.grad(full, list(rule.parameters()))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


def test_truncation_detaches_parameters_and_state_between_windows(float64):
    torch.manual_seed(0)
    rule = LearnedOptimizer(hidden_size=4, output_scale=0.1)
    loss, theta0 = quadratic(dim=5)
    (loss1, end1), (loss2, _) = truncated_unroll(loss, theta0, rule, steps=6, window=3)
    # Nothing of window 2 reaches back into window 1.
    assert torch.autograd.grad(loss2, [end1["theta"]], allow_unused=True) == (None,)
    # Window 2's meta-gradient is that of a 3-step unroll from window 1's end, detached.
    reference1, params, state = manual_unroll(loss, theta0, rule, 3)
    torch.testing.assert_close(loss1, reference1, rtol=1e-13, atol=0)
    params = {n: p.detach() for n, p in params.items()}
    state = tuple((h.detach(), c.detach()) for h, c in state)
    reference2, _, _ = manual_unroll_from(loss, params, rule, state, first_step=3, steps=3)
    torch.testing.assert_close(loss2, reference2, rtol=1e-13, atol=0)
    got = torch.autograd.grad(loss2, list(rule.parameters()))
    want = torch.autograd.grad(reference2, list(rule.parameters()))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)
    # ... and differs from the same three losses' gradient through the whole unroll, which
    # truncation approximates (it drops their paths back into window 1).
    trajectory = adapt(loss, theta0, 6, rule, first_order=True)
    untruncated = torch.stack([loss(p) for p in trajectory[4:]]).mean()
    torch.testing.assert_close(untruncated, loss2, rtol=1e-13, atol=0)  # same values, other graph
    full = torch.autograd.grad(untruncated, list(rule.parameters()))
    assert any(not torch.allclose(g, f) for g, f in zip(got, full, strict=True))


def test_a_loss_per_step_takes_each_step_and_scores_each_iterate_on_its_own_minibatch(float64):
    """A stochastic optimizee (the digits benchmark's minibatches): loss k gives θ_k's gradient
    and scores θ_k in the meta-loss; checked against SGD by hand on losses ½‖θ − c_k‖²."""
    centres = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    losses = [lambda p, c=c: 0.5 * ((p["theta"] - c) ** 2).sum() for c in centres]
    theta, lr = torch.zeros(3), 0.3
    rule = SGD(lr)
    windows = list(truncated_unroll(losses, {"theta": theta}, rule, steps=4, window=2))
    expected_terms = []
    for k in range(4):
        theta = theta - lr * (theta - centres[k])  # the gradient of loss k at θ_k
        expected_terms.append(0.5 * ((theta - centres[k + 1]) ** 2).sum())  # θ_{k+1} on loss k + 1
    torch.testing.assert_close(windows[-1][1]["theta"], theta, rtol=1e-14, atol=0)
    torch.testing.assert_close(windows[0][0], torch.stack(expected_terms[:2]).mean(), rtol=1e-14, atol=0)
    torch.testing.assert_close(windows[1][0], torch.stack(expected_terms[2:]).mean(), rtol=1e-14, atol=0)
    # The same function repeated is the one-function call, exactly.
    loss, theta0 = quadratic(dim=5)
    torch.manual_seed(0)
    lstm = LearnedOptimizer(hidden_size=4, output_scale=0.1)
    one = list(truncated_unroll(loss, theta0, lstm, steps=4, window=2))
    repeated = list(truncated_unroll([loss] * 5, theta0, lstm, steps=4, window=2))
    for (a, pa), (b, pb) in zip(one, repeated, strict=True):
        assert torch.equal(a, b) and torch.equal(pa["theta"], pb["theta"])
    with pytest.raises(ValueError, match="steps \\+ 1 = 5"):
        next(truncated_unroll(losses[:4], {"theta": torch.zeros(3)}, rule, steps=4, window=2))


def manual_unroll_from(loss, params, rule, state, first_step, steps):
    losses = []
    for step in range(first_step, first_step + steps):
        params, state = rule(params, inner_gradients(loss, params, first_order=True), state, step)
        losses.append(loss(params))
    return torch.stack(losses).mean(), params, state
