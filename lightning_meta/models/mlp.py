"""A fully connected network: the 1-40-40-1 ReLU regressor of MAML's sinusoid experiment
(Finn et al. 2017, §5.1), and small heads and baselines elsewhere."""

from __future__ import annotations

import itertools

from torch import Tensor, nn


class MLP(nn.Module):
    """Linear layers with ReLU between them (none after the last).

    Args:
        in_features: input size (1 for sinusoid regression).
        hidden_sizes: sizes of the hidden layers ([40, 40] in MAML).
        out_features: output size (1 for regression, the number of ways for classification).
    """

    def __init__(self, in_features: int = 1, hidden_sizes: list[int] | None = None, out_features: int = 1) -> None:
        super().__init__()
        sizes = [in_features, *(hidden_sizes if hidden_sizes is not None else [40, 40]), out_features]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)
        self.out_features = out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
