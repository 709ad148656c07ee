"""A learned optimizer in the inner loop: "Learning to learn by gradient descent by gradient
descent" (Andrychowicz, Denil, Gomez, Hoffman, Pfau, Schaul, Shillingford & de Freitas, NeurIPS
2016).

A small two-layer LSTM (20 hidden units) reads each coordinate's gradient and proposes that
coordinate's step, θ ← θ + 0.01 · LSTM(∇). It is coordinate-wise: one set of LSTM weights shared
by every coordinate of every parameter tensor, each coordinate with its own hidden state, so it
applies to a learner of any size and its state is carried across the inner steps of one task.
Gradients are preprocessed (paper, appendix A) into (log|g|/p, sign g) when |g| >= e^-p and
(-1, e^p g) otherwise, p = 10, so that magnitudes spanning orders of magnitude reach the LSTM on
a common scale. Its weights are meta-trained through the unrolled inner loop; long unrolls are
cut into windows (`truncated_unroll`: the reference script unrolls 100 steps in windows of 20).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_meta.inner_loop import UpdateRule, update_step
from lightning_meta.task import Params

LSTMState = tuple[tuple[Tensor, Tensor], ...]
"""Per LSTM layer, (h, c), each `[coordinates, hidden_size]`."""


def preprocess_gradients(grads: Tensor, p: float = 10.0) -> Tensor:
    """`[n]` gradients to `[n, 2]` LSTM inputs: (log|g|/p, sign g) where |g| >= e^-p, else
    (-1, e^p g) (Andrychowicz et al. 2016, appendix A)."""
    large = grads.abs() >= math.exp(-p)
    # The clamp keeps log's unused branch finite, so its (masked) gradient is 0, not NaN.
    magnitude = torch.where(large, grads.abs().clamp_min(math.exp(-p)).log() / p, -torch.ones_like(grads))
    direction = torch.where(large, torch.sign(grads), math.exp(p) * grads)
    return torch.stack([magnitude, direction], dim=-1)


def lstm_cell(x: Tensor, hc: tuple[Tensor, Tensor], cell: nn.LSTMCell) -> tuple[Tensor, Tensor]:
    """`cell(x, hc)` written out in tensor ops, so that it runs under `torch.func.vmap` (which has
    no batching rule for `aten::lstm_cell`). The ops and their order are the CPU kernel's
    (hidden projection plus input projection, gates i, f, g, o), so on a CPU the values and
    first and second derivatives are bitwise those of `cell(x, hc)` (`tests/test_update_rule_vmap.py`);
    on CUDA, where `nn.LSTMCell` runs a fused kernel, they agree to rounding."""
    h, c = hc
    gates = F.linear(h, cell.weight_hh, cell.bias_hh) + F.linear(x, cell.weight_ih, cell.bias_ih)
    i, f, g, o = gates.chunk(4, dim=-1)
    c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c_next), c_next


class LearnedOptimizer(UpdateRule):
    """A coordinate-wise LSTM optimizer whose weights the outer optimizer trains.

    Args:
        hidden_size: hidden units of each LSTM layer (the paper: 20).
        layers: stacked LSTM layers (the paper: 2).
        preprocess_p: p of the gradient preprocessing (the paper: 10).
        output_scale: the LSTM's output times this is the step (the reference code: 0.01).
    """

    vmap_blocker = None
    """Its tasks may be vmapped: per-task losses and meta-gradients equal the loop's in float64,
    first and second order, over several steps (`tests/test_update_rule_vmap.py`)."""

    def __init__(
        self, hidden_size: int = 20, layers: int = 2, preprocess_p: float = 10.0, output_scale: float = 0.01
    ) -> None:
        super().__init__()
        if hidden_size < 1 or layers < 1 or not preprocess_p > 0:
            raise ValueError(
                f"LearnedOptimizer needs hidden_size >= 1, layers >= 1, preprocess_p > 0; got {hidden_size}, "
                f"{layers}, {preprocess_p}"
            )
        self.hidden_size, self.preprocess_p, self.output_scale = hidden_size, preprocess_p, output_scale
        self.cells = nn.ModuleList(nn.LSTMCell(2 if i == 0 else hidden_size, hidden_size) for i in range(layers))
        self.output = nn.Linear(hidden_size, 1)

    def init_state(self, params: Params) -> LSTMState:
        """Zero hidden and cell states, one row per coordinate of `params`."""
        ref = next(iter(params.values()))
        zeros = ref.new_zeros(sum(p.numel() for p in params.values()), self.hidden_size)
        return tuple((zeros, zeros) for _ in self.cells)

    def propose(self, flat_grads: Tensor, state: LSTMState) -> tuple[Tensor, LSTMState]:
        """Every coordinate's step `[n]` from its gradient `[n]`, and the LSTM's next state."""
        x = preprocess_gradients(flat_grads, self.preprocess_p).to(self.output.weight.dtype)
        new_state = []
        for cell, hc in zip(self.cells, state, strict=True):
            h, c = lstm_cell(x, hc, cell)
            new_state.append((h, c))
            x = h
        return self.output_scale * self.output(x).squeeze(-1), tuple(new_state)

    def forward(self, params: Params, grads: Params, state: LSTMState, step: int) -> tuple[Params, LSTMState]:
        flat = torch.cat([grads[n].reshape(-1) for n in params])
        update, new_state = self.propose(flat, state)
        sizes = [p.numel() for p in params.values()]
        steps = dict(zip(params, update.split(sizes), strict=True))
        return {n: p + steps[n].view_as(p) for n, p in params.items()}, new_state


def detached(value: object) -> object:
    """`value` (a tensor, dict, tuple or list of them, nested) with every tensor detached."""
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, dict):
        return {k: detached(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(detached(v) for v in value)
    return value


def truncated_unroll(
    loss_fn: Callable[[Params], Tensor] | Sequence[Callable[[Params], Tensor]],
    params: Params,
    rule: UpdateRule,
    steps: int,
    window: int,
    first_order: bool = True,
) -> Iterator[tuple[Tensor, Params]]:
    """Run `rule` for `steps` steps on `loss_fn`, cut into windows of `window` steps (truncated
    back-propagation through time, as the reference training script: 100 steps in windows of 20).

    Yields, per window, its meta-loss (the mean of the losses of the parameters after each of
    its steps) and the parameters at its end. Take the meta-gradient and step the outer
    optimizer between yields: the next window starts from the parameters and rule state
    detached, so no graph reaches back into an earlier window, and it runs with the rule's
    updated weights.

    Args:
        loss_fn: the optimizee's loss as a function of its parameters; or, for a stochastic
            optimizee (a minibatch per step, as the paper's MNIST network), `steps + 1` of
            them, where the k-th gives θ_k's gradient and scores θ_k in the meta-loss, so each
            θ_k is scored on the minibatch its own step is taken on, as the reference code does.
        params: θ0 (detached from any graph).
        rule: the update rule being meta-trained.
        steps: the unroll length.
        window: steps per truncation window; `window >= steps` back-propagates through it all.
        first_order: drop second derivatives through the optimizee's gradients, as the paper
            does (its Figure 2: no gradient along the dashed edges).
    """
    if steps < 1 or window < 1:
        raise ValueError(f"truncated_unroll needs steps >= 1 and window >= 1, got {steps}, {window}")
    if callable(loss_fn):
        loss_at: Sequence[Callable[[Params], Tensor]] = [loss_fn] * (steps + 1)
    else:
        loss_at = list(loss_fn)
        if len(loss_at) != steps + 1:
            raise ValueError(
                f"truncated_unroll got {len(loss_at)} loss functions for steps={steps}: pass one function, or "
                f"steps + 1 = {steps + 1} of them (one per θ_0..θ_steps)"
            )
    params, state, done = detached(params), None, 0
    state = rule.init_state(params)
    while done < steps:
        losses = []
        for step in range(done, min(done + window, steps)):
            params, state = update_step(loss_at[step], params, rule, state, step, first_order)
            losses.append(loss_at[step + 1](params))
        done += len(losses)
        yield torch.stack(losses).mean(), params
        params, state = detached(params), detached(state)
