"""Backbones: plain `nn.Module`s with no knowledge of meta-learning, injected into algorithms."""

from lightning_meta.models.context import ContextConditioned
from lightning_meta.models.conv4 import Conv4
from lightning_meta.models.mlp import MLP
from lightning_meta.models.norm import PlainBatchNorm2d
from lightning_meta.models.resnet12 import DropBlock, ResNet12

__all__ = ["MLP", "ContextConditioned", "Conv4", "DropBlock", "PlainBatchNorm2d", "ResNet12"]
