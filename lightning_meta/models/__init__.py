"""Backbones: plain `nn.Module`s with no knowledge of meta-learning, injected into algorithms."""

from lightning_meta.models.conv4 import Conv4
from lightning_meta.models.mlp import MLP
from lightning_meta.models.norm import PlainBatchNorm2d

__all__ = ["MLP", "Conv4", "PlainBatchNorm2d"]
