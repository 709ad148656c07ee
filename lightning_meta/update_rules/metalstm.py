"""The Meta-Learner LSTM: "Optimization as a Model for Few-Shot Learning" (Ravi & Larochelle,
ICLR 2017).

The learner's parameters are the cell state of an LSTM whose gates are learned: gradient descent
θ_t = θ_{t-1} − α_t ∇_t is an LSTM cell update c_t = f_t ⊙ c_{t-1} + i_t ⊙ c̃_t with c̃_t = −∇_t,
f_t = 1 and i_t = α_t, so learning the gates learns a per-coordinate, per-step rate (i_t) and a
per-coordinate shrinkage (f_t). Per coordinate, from the first layer's output h_t, the parameter
value and the previous gate:

    h_t = LSTM(preprocess(L_t), preprocess(∇_t))                     (a plain coordinate-wise LSTM)
    i_t = σ(W_I · [h_t, θ_{t-1}, i_{t-1}] + b_I)
    f_t = σ(W_F · [h_t, θ_{t-1}, f_{t-1}] + b_F)
    θ_t = f_t ⊙ θ_{t-1} − i_t ⊙ ∇_t

with L_t the support loss at θ_{t-1} (a scalar, the same input for every coordinate), the
Andrychowicz et al. preprocessing (`preprocess_gradients`) on both, the previous gates i_0 = f_0 = 0,
one set of weights shared by every coordinate, and the raw gradient in the cell update. The
learned initial cell state c_0 is the learner's θ0, which the learner (MAML) already meta-learns.
b_F starts in U[4, 6] and b_I in U[−5, −4] (the other weights in U[−0.01, 0.01], as the reference
code), so f ≈ 0.99 and i ≈ 0.01: it starts as SGD with a small step and little decay.

The rule needs the support loss as an input: `needs_loss = True` makes `update_step` pass it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_meta.inner_loop import UpdateRule
from lightning_meta.task import Params
from lightning_meta.update_rules.learned_optimizer import lstm_cell, preprocess_gradients

MetaLSTMState = tuple[tuple[Tensor, Tensor], Tensor, Tensor]
"""(first layer's (h, c), each `[coordinates, hidden_size]`; previous input gate `[coordinates]`;
previous forget gate `[coordinates]`)."""


def gate(h: Tensor, theta: Tensor, previous: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """σ(W · [h, θ, previous gate] + b) per coordinate: `h` `[n, hidden]`, the others `[n]`."""
    return torch.sigmoid(h @ weight[:-2] + theta * weight[-2] + previous * weight[-1] + bias)


class MetaLSTM(UpdateRule):
    """Ravi & Larochelle's meta-learner LSTM as an inner update rule (θ0 = c_0 is the learner's own).

    Args:
        hidden_size: hidden units of the first, plain LSTM layer (the reference code: 20).
        preprocess_p: p of the loss and gradient preprocessing (10, as Andrychowicz et al.).
        forget_bias_init: the interval b_F is drawn from (the paper: [4, 6]; its reference code
            draws from [4, 5]).
        input_bias_init: the interval b_I is drawn from ([−5, −4]).
    """

    needs_loss = True
    vmap_blocker = None
    """Its tasks may be vmapped: per-task losses and meta-gradients equal the loop's in float64,
    first and second order, over several steps (`tests/test_update_rule_vmap.py`)."""

    def __init__(
        self,
        hidden_size: int = 20,
        preprocess_p: float = 10.0,
        forget_bias_init: tuple[float, float] = (4.0, 6.0),
        input_bias_init: tuple[float, float] = (-5.0, -4.0),
    ) -> None:
        super().__init__()
        if hidden_size < 1 or not preprocess_p > 0:
            raise ValueError(f"MetaLSTM needs hidden_size >= 1 and preprocess_p > 0; got {hidden_size}, {preprocess_p}")
        for name, (low, high) in (("forget_bias_init", forget_bias_init), ("input_bias_init", input_bias_init)):
            if not low <= high:
                raise ValueError(f"MetaLSTM {name}=({low}, {high}) is not an interval (low <= high)")
        self.hidden_size, self.preprocess_p = hidden_size, preprocess_p
        # Input: preprocessed loss (2) and gradient (2), as the reference code's first layer.
        self.lstm = nn.LSTMCell(4, hidden_size)
        # Gate weights over [h_t, θ_{t-1}, previous gate]; one scalar bias per gate.
        self.input_weight = nn.Parameter(torch.empty(hidden_size + 2))
        self.forget_weight = nn.Parameter(torch.empty(hidden_size + 2))
        self.input_bias = nn.Parameter(torch.empty(1))
        self.forget_bias = nn.Parameter(torch.empty(1))
        with torch.no_grad():
            for p in self.parameters():
                p.uniform_(-0.01, 0.01)
            self.forget_bias.uniform_(*forget_bias_init)
            self.input_bias.uniform_(*input_bias_init)

    def init_state(self, params: Params) -> MetaLSTMState:
        """Zero first-layer state and zero previous gates, one row per coordinate of `params`."""
        ref = next(iter(params.values()))
        n = sum(p.numel() for p in params.values())
        zeros = ref.new_zeros(n, self.hidden_size, dtype=self.input_weight.dtype)
        gates = ref.new_zeros(n, dtype=self.input_weight.dtype)
        return (zeros, zeros), gates, gates

    def forward(
        self, params: Params, grads: Params, state: MetaLSTMState, step: int, loss: Tensor | None = None
    ) -> tuple[Params, MetaLSTMState]:
        """θ_t and the next state from θ_{t-1}, ∇_t, the state and L_t (`loss`, required)."""
        if loss is None:
            raise ValueError("MetaLSTM needs the support loss: call it through update_step/adapt, or pass loss=")
        dtype = self.input_weight.dtype
        theta = torch.cat([p.reshape(-1) for p in params.values()]).to(dtype)
        grad = torch.cat([grads[n].reshape(-1) for n in params]).to(dtype)
        hc, input_gate, forget_gate = state
        x_grad = preprocess_gradients(grad, self.preprocess_p)
        x_loss = preprocess_gradients(loss.reshape(1).to(dtype), self.preprocess_p).expand_as(x_grad)
        h, c = lstm_cell(torch.cat([x_loss, x_grad], dim=-1), hc, self.lstm)
        input_gate = gate(h, theta, input_gate, self.input_weight, self.input_bias)
        forget_gate = gate(h, theta, forget_gate, self.forget_weight, self.forget_bias)
        new_theta = forget_gate * theta - input_gate * grad
        sizes = [p.numel() for p in params.values()]
        flat = dict(zip(params, new_theta.split(sizes), strict=True))
        new_params = {n: flat[n].view_as(p).to(p.dtype) for n, p in params.items()}
        return new_params, ((h, c), input_gate, forget_gate)
