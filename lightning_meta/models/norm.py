"""Batch normalisation written in plain tensor ops, for task-parallel (vmapped) meta-learning.

`nn.BatchNorm2d` in training mode under `torch.func.vmap` gives silently wrong second-order
meta-gradients (checked in torch 2.13 in float64: conv biases before the norm, whose true
gradient is 0, get non-zero ones; other gradients off by tens of percent; likely
pytorch/functorch#534). The same normalisation spelled out as mean/var/affine ops has no
special batching rule and differentiates correctly under vmap to any order, so the vmapped
path can use it; `tests/test_task_parallel.py` holds the float64 parity against the loop.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class PlainBatchNorm2d(nn.Module):
    """BatchNorm over (N, H, W) with batch statistics only (no running statistics), affine.

    Numerically the same as `nn.BatchNorm2d(num_features, track_running_stats=False)` (the
    biased variance normalises, as there), with parameters of the same names and shapes.

    Args:
        num_features: channels C of the `[N, C, H, W]` input.
        eps: added to the variance for stability.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = (x - mean).pow(2).mean(dim=(0, 2, 3), keepdim=True)
        scale = self.weight.view(1, -1, 1, 1) * torch.rsqrt(var + self.eps)
        return (x - mean) * scale + self.bias.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"
