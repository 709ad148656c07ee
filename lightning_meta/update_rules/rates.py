"""Learned inner learning rates as update rules: Meta-SGD's per-entry rates (Li, Zhou, Chen & Li
2017) and MAML++'s per-tensor, per-step rates (LSLR; Antoniou, Edwards & Storkey 2019). Both are
SGD, θ − α ⊙ g, whose α the outer optimizer trains with θ."""

from __future__ import annotations

import torch
from torch import nn

from lightning_meta.inner_loop import UpdateRule, sgd_step
from lightning_meta.task import Params


def rate_key(name: str) -> str:
    """A parameter name as a `ParameterDict` key (module names may not contain dots)."""
    return name.replace(".", "-")


def rename_legacy_rates(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    """A load_state_dict pre-hook: checkpoints from before update rules kept Meta-SGD's and
    MAML++'s rates under `inner_lrs.<key>`; they now live in `update_rule.rates.<key>`."""
    old = prefix + "inner_lrs."
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[prefix + "update_rule.rates." + key.removeprefix(old)] = state_dict.pop(key)


class LearnedRates(UpdateRule):
    """θ − α ⊙ g with α the shape of θ, learned by the outer optimizer (Meta-SGD).

    Args:
        init: each rate starts uniform in [low, high] (Meta-SGD's paper: [0.005, 0.1]); low = high
            starts every rate at that constant.
    """

    def __init__(self, init: tuple[float, float] = (0.005, 0.1)) -> None:
        super().__init__()
        low, high = init
        if not 0 < low <= high:
            raise ValueError(f"LearnedRates init={[low, high]} must be [low, high] with 0 < low <= high")
        self.init = (low, high)
        self.rates = nn.ParameterDict()

    def bind(self, params: Params) -> None:
        """One rate tensor per parameter tensor, drawn from the global generator (as Meta-SGD did)."""
        low, high = self.init
        for name, param in params.items():
            if rate_key(name) not in self.rates:
                self.rates[rate_key(name)] = nn.Parameter(torch.empty_like(param.detach()).uniform_(low, high))

    def forward(self, params: Params, grads: Params, state: None, step: int) -> tuple[Params, None]:
        return sgd_step(params, grads, {n: self.rates[rate_key(n)] for n in params}), state


class PerStepRates(UpdateRule):
    """θ − α_{k,ℓ} g: one learned scalar rate per parameter tensor ℓ and inner step k (LSLR).

    Args:
        lr: the initial value of every rate.
        steps: the number of inner steps with rates of their own; later steps reuse the last.
    """

    def __init__(self, lr: float = 0.1, steps: int = 5) -> None:
        super().__init__()
        if not lr > 0 or steps < 1:
            raise ValueError(f"PerStepRates needs lr > 0 and steps >= 1, got lr={lr}, steps={steps}")
        self.lr, self.steps = lr, steps
        self.rates = nn.ParameterDict()

    def bind(self, params: Params) -> None:
        for name, param in params.items():
            if rate_key(name) not in self.rates:
                self.rates[rate_key(name)] = nn.Parameter(torch.full((self.steps,), self.lr, dtype=param.dtype))

    def forward(self, params: Params, grads: Params, state: None, step: int) -> tuple[Params, None]:
        k = min(step, self.steps - 1)
        return sgd_step(params, grads, {n: self.rates[rate_key(n)][k] for n in params}), state
