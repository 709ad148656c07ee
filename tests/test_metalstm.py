"""The Meta-Learner LSTM (Ravi & Larochelle 2017) as an update rule: its gate equations against a
hand computation (float64), its initialisation (SGD with a small step), meta-gradients to its
weights and to θ0 through the unroll, and the support loss it reads (its checkpoint, CLI
and resume tests: tests/test_learned_update_rules_training.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

from lightning_meta.algorithms import MAML
from lightning_meta.data import SinusoidDataModule
from lightning_meta.inner_loop import (
    adapt,
    functional_gradients,
    inner_gradients,
    inner_gradients_and_loss,
    update_step,
)
from lightning_meta.models import MLP
from lightning_meta.update_rules import MetaLSTM, preprocess_gradients

REPO = Path(__file__).resolve().parents[1]


def three_parameter_learner(seed: int = 0):
    """A 3-parameter least-squares learner, split over two tensors so the flattening order counts."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(4, 2, generator=g), torch.randn(4, generator=g)
    theta0 = {"w": torch.randn(2, generator=g), "b": torch.randn(1, generator=g)}

    def loss(params):
        return ((x @ params["w"] + params["b"] - y) ** 2).mean()

    return loss, theta0


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def hand_lstm_cell(cell: torch.nn.LSTMCell, x: list[float], h: list[float], c: list[float]):
    """PyTorch's LSTMCell in plain Python: gates (i, f, g, o) = W_ih x + b_ih + W_hh h + b_hh."""
    hidden = cell.hidden_size
    pre = [
        sum(cell.weight_ih[r, k].item() * x[k] for k in range(len(x)))
        + cell.bias_ih[r].item()
        + sum(cell.weight_hh[r, k].item() * h[k] for k in range(hidden))
        + cell.bias_hh[r].item()
        for r in range(4 * hidden)
    ]
    i, f, g, o = (pre[j * hidden : (j + 1) * hidden] for j in range(4))
    c_new = [sigmoid(f[k]) * c[k] + sigmoid(i[k]) * math.tanh(g[k]) for k in range(hidden)]
    h_new = [sigmoid(o[k]) * math.tanh(c_new[k]) for k in range(hidden)]
    return h_new, c_new


def hand_preprocess(v: float, p: float = 10.0) -> list[float]:
    if abs(v) >= math.exp(-p):
        return [math.log(abs(v)) / p, math.copysign(1.0, v)]
    return [-1.0, math.exp(p) * v]


def test_gate_equations_match_a_hand_computation_on_a_3_parameter_learner(float64):
    torch.manual_seed(0)
    rule = MetaLSTM(hidden_size=3)
    with torch.no_grad():  # weights large enough that every term of the gates counts
        for p in rule.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    loss, theta0 = three_parameter_learner()
    trajectory = adapt(loss, theta0, 3, rule, first_order=True)

    # The hand computation: per coordinate, in the order w[0], w[1], b[0].
    wi, wf = rule.input_weight.tolist(), rule.forget_weight.tolist()
    bi, bf = rule.input_bias.item(), rule.forget_bias.item()
    theta = theta0["w"].tolist() + theta0["b"].tolist()
    hs, cs = [[0.0] * 3 for _ in range(3)], [[0.0] * 3 for _ in range(3)]
    i_prev, f_prev = [0.0] * 3, [0.0] * 3
    for step in range(3):
        params = {"w": torch.tensor(theta[:2]), "b": torch.tensor(theta[2:])}
        value = loss(params).item()
        grad = inner_gradients(loss, params, first_order=True)
        grad = grad["w"].tolist() + grad["b"].tolist()
        new = []
        for k in range(3):
            hs[k], cs[k] = hand_lstm_cell(rule.lstm, hand_preprocess(value) + hand_preprocess(grad[k]), hs[k], cs[k])
            h_dot_i = sum(wi[j] * hs[k][j] for j in range(3))
            h_dot_f = sum(wf[j] * hs[k][j] for j in range(3))
            i_prev[k] = sigmoid(h_dot_i + wi[3] * theta[k] + wi[4] * i_prev[k] + bi)
            f_prev[k] = sigmoid(h_dot_f + wf[3] * theta[k] + wf[4] * f_prev[k] + bf)
            new.append(f_prev[k] * theta[k] - i_prev[k] * grad[k])
        theta = new
        got = trajectory[step + 1]
        torch.testing.assert_close(torch.cat([got["w"], got["b"]]), torch.tensor(theta), rtol=1e-12, atol=1e-14)


def test_bias_initialisation_is_in_the_papers_ranges():
    for seed in range(20):
        torch.manual_seed(seed)
        rule = MetaLSTM()
        assert 4.0 <= rule.forget_bias.item() <= 6.0
        assert -5.0 <= rule.input_bias.item() <= -4.0
        others = [p for n, p in rule.named_parameters() if not n.endswith("_bias")]
        assert all(p.abs().max() <= 0.01 for p in others)
    with pytest.raises(ValueError, match="interval"):
        MetaLSTM(forget_bias_init=(6.0, 4.0))


def test_at_initialisation_it_is_sgd_with_a_small_step(float64):
    torch.manual_seed(0)
    model = MAML(MLP(hidden_sizes=[16]), update_rule=MetaLSTM())
    rule = model.update_rule
    x, y = torch.randn(10, 1), torch.randn(10, 1)

    def loss(params):
        return ((functional_call(model.backbone, params, (x,)) - y) ** 2).mean()

    theta0 = {n: p.detach() for n, p in model.backbone.named_parameters()}
    grads = inner_gradients(loss, theta0, first_order=True)
    theta1, (_, input_gate, forget_gate) = update_step(loss, theta0, rule, rule.init_state(theta0), 0, True)
    rate = sigmoid(rule.input_bias.item())
    assert 0.006 < rate < 0.018  # σ(U[-5, -4])
    assert forget_gate.min() > 0.98  # σ(4) = 0.982: little decay
    # Every coordinate's gates are the biases' gates up to the small weights' contributions.
    torch.testing.assert_close(input_gate, torch.full_like(input_gate, rate), rtol=0.05, atol=0)
    torch.testing.assert_close(
        forget_gate, torch.full_like(forget_gate, sigmoid(rule.forget_bias.item())), rtol=1e-3, atol=0
    )
    # c_1 is θ0 − σ(b_I) g up to the forget gate's decay (1 − σ(b_F)) θ0 and the rate's spread.
    for n in theta0:
        sgd = theta0[n] - rate * grads[n]
        bound = (1 - forget_gate.min()) * theta0[n].abs() + 0.05 * rate * grads[n].abs() + 1e-12
        assert ((theta1[n] - sgd).abs() <= bound).all(), n
    # ... and that small step lowers the loss, as SGD's would.
    assert loss(theta1) < loss(theta0)


def test_meta_gradients_through_the_unroll_pass_gradcheck(float64):
    torch.manual_seed(0)
    rule = MetaLSTM(hidden_size=2)
    with torch.no_grad():
        for p in rule.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    names = [n for n, _ in rule.named_parameters()]
    loss, theta0 = three_parameter_learner()

    def final_loss(w, b, *weights):
        params = {"w": w, "b": b}
        state = rule.init_state(params)
        for step in range(3):  # second order: the support gradients and loss keep their graph
            grads, value = inner_gradients_and_loss(loss, params, first_order=False)
            params, state = functional_call(
                rule, dict(zip(names, weights, strict=True)), (params, grads, state, step), {"loss": value}
            )
        return loss(params)

    inputs = (theta0["w"].clone().requires_grad_(), theta0["b"].clone().requires_grad_())
    inputs += tuple(p.detach().clone().requires_grad_() for p in rule.parameters())
    assert torch.autograd.gradcheck(final_loss, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)
    grads = torch.autograd.grad(final_loss(*inputs), inputs)
    assert all(g.abs().max() > 0 for g in grads), "θ0 and every MetaLSTM weight get a meta-gradient"


@pytest.mark.parametrize("first_order", [True, False])
def test_maml_meta_gradients_reach_the_metalstm_and_theta0(first_order):
    torch.manual_seed(0)
    model = MAML(MLP(hidden_sizes=[8]), inner_steps=3, first_order=first_order, update_rule=MetaLSTM(hidden_size=4))
    batch = next(iter(SinusoidDataModule(tasks_per_batch=2).train_dataloader()))
    model.train()
    model.meta_loss(batch)[0].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert {n for n, _ in model.named_parameters() if n.startswith("update_rule.")} == {
        f"update_rule.{n}" for n, _ in model.update_rule.named_parameters()
    }


def test_the_rule_reads_the_support_loss_at_each_step(float64):
    loss, theta0 = three_parameter_learner()
    seen = []

    class Spy(MetaLSTM):
        def forward(self, params, grads, state, step, loss=None):
            seen.append((loss, params))
            return super().forward(params, grads, state, step, loss=loss)

    trajectory = adapt(loss, theta0, 2, Spy(hidden_size=2), first_order=True)
    for (value, params), theta in zip(seen, trajectory[:2], strict=True):
        assert params is theta
        torch.testing.assert_close(value, loss(theta), rtol=0, atol=0)
    # torch.func's gradients and value (the task-parallel path's) equal autograd's.
    with functional_gradients():
        grads_f, value_f = inner_gradients_and_loss(loss, theta0, first_order=False)
    grads_a, value_a = inner_gradients_and_loss(loss, theta0, first_order=False)
    torch.testing.assert_close(value_f, value_a, rtol=1e-15, atol=0)
    for n in grads_a:
        torch.testing.assert_close(grads_f[n], grads_a[n], rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match="needs the support loss"):
        MetaLSTM()(theta0, grads_a, MetaLSTM().init_state(theta0), 0)
    # The loss input is the same preprocessing as the gradients'.
    torch.testing.assert_close(preprocess_gradients(torch.tensor([0.5]))[0], torch.tensor(hand_preprocess(0.5)))


def test_auto_compilation_stays_with_the_measured_sgd_update():
    # (Its loop/vmap parity: tests/test_update_rule_vmap.py.)
    assert not MAML(MLP(hidden_sizes=[8]), first_order=True, update_rule=MetaLSTM()).compile_by_default
