"""ResNet-12: the residual backbone of TADAM (Oreshkin et al. 2018) and MetaOptNet (Lee et al.
2019), the usual one for miniImageNet, tieredImageNet, CIFAR-FS and FC100 since.

Four residual blocks of 64-160-320-640 channels. Each block: three 3×3 convolutions (no bias),
each followed by BatchNorm, the first two by LeakyReLU(0.1); a 1×1 convolution with BatchNorm
on the shortcut; the sum through LeakyReLU(0.1); 2×2 max-pool. 84×84 inputs end as 640 maps of
5×5, averaged into 640 features (`pool="avg"`, TADAM and most later work) or flattened into
16,000 (`pool="flatten"`, MetaOptNet's code).

DropBlock (Ghiasi et al. 2018), optional (`drop_rate`), as in MetaOptNet: in training mode it
zeroes `block_size`×`block_size` squares of the last two blocks' outputs (dropout of single
positions, the same rate, on the first two), rescaled by the share kept. Unlike MetaOptNet, whose
rate ramps up over training, the rate is constant. It draws from
torch's global generator (so `seed_everything` fixes it) and is the identity in eval mode. It
is random, which the vmapped task path cannot reproduce per task, so a backbone with DropBlock
is refused by `task_batching="vmap"` (the loop path runs it).

BatchNorm keeps no running statistics by default, as Conv4 (transductive; the per-example
protocol of `lightning_meta.models.norm` applies unchanged). `norm="plain_batch"` is the same
normalisation in plain ops, for the vmapped path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_meta.models.conv4 import HEAD_INITS, GlobalAvgPool
from lightning_meta.models.norm import PlainBatchNorm2d

NORMS = ("batch", "plain_batch", "group", "none")
POOLS = ("avg", "flatten")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels, track_running_stats=False)
    if kind == "plain_batch":
        return PlainBatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(max(1, channels // 8), channels)
    return nn.Identity()


class DropBlock(nn.Module):
    """DropBlock on `[N, C, H, W]` maps in training mode; the identity in eval mode.

    Args:
        drop_rate: the share of activations to drop (per channel, in expectation).
        block_size: side of the dropped squares; 1 is dropout of single positions.
    """

    def __init__(self, drop_rate: float, block_size: int) -> None:
        super().__init__()
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"DropBlock drop_rate={drop_rate} must be in [0, 1)")
        if block_size < 1:
            raise ValueError(f"DropBlock block_size={block_size} must be at least 1")
        self.drop_rate, self.block_size = drop_rate, block_size

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.drop_rate == 0.0:
            return x
        height, width = x.shape[-2:]
        block = min(self.block_size, height, width)
        # Block centres are drawn where a whole block fits, at the rate that drops `drop_rate` of
        # the positions in expectation (Ghiasi et al., eq. 1).
        valid = (height - block + 1) * (width - block + 1)
        gamma = self.drop_rate / block**2 * height * width / valid
        centres = torch.bernoulli(
            torch.full((*x.shape[:-2], height - block + 1, width - block + 1), gamma, dtype=x.dtype, device=x.device)
        )
        pad = block - 1
        # Each centre spreads over the block below and to the right of it.
        dropped = F.max_pool2d(F.pad(centres, (pad, pad, pad, pad)), block, stride=1)[..., :height, :width]
        keep = 1.0 - dropped
        # Rescale by the kept share, as dropout does (clamped: an all-dropped map stays zero).
        return x * keep * (keep.numel() / keep.sum().clamp_min(1.0))

    def extra_repr(self) -> str:
        return f"drop_rate={self.drop_rate}, block_size={self.block_size}"


class ResidualBlock(nn.Module):
    """Three conv-norm layers and a 1×1 shortcut, LeakyReLU(0.1), 2×2 max-pool, then the
    optional drop (module docstring)."""

    def __init__(self, in_channels: int, channels: int, norm: str, drop: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        self.norm1 = _norm(norm, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = _norm(norm, channels)
        self.conv3 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm3 = _norm(norm, channels)
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, bias=False), _norm(norm, channels))
        self.activation = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2)
        self.drop = drop if drop is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.activation(self.norm1(self.conv1(x)))
        out = self.activation(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        return self.drop(self.pool(self.activation(out + self.shortcut(x))))


class ResNet12(nn.Module):
    """ResNet-12 (module docstring), then an optional linear head.

    Args:
        in_channels: channels of the input images (3 for the ImageNet and CIFAR benchmarks).
        channels: the four blocks' widths (64, 160, 320, 640 in TADAM and MetaOptNet; 64, 128,
            256, 512 in some later work).
        out_features: size of a linear head (the number of ways, for MAML-style learners);
            None (the default) returns the features (an embedding, for metric-based learners).
        norm: "batch" (`nn.BatchNorm2d` on batch statistics), "plain_batch" (the same, vmap-
            correct), "group" (GroupNorm, 8 channels a group) or "none".
        pool: "avg" (features averaged over positions: `channels[-1]` features) or "flatten"
            (the last maps flattened).
        image_size: side of the square inputs, for the flattened features' size (`pool="flatten"`);
            84 gives 5×5 maps.
        drop_rate: DropBlock's rate on blocks 3 and 4 and dropout's on blocks 1 and 2; 0 (the
            default) builds no drop layers. MetaOptNet trains with 0.1.
        block_size: DropBlock's square side (5 in MetaOptNet).
        head_init: "default" (PyTorch's `nn.Linear` initialisation) or "zeros" (Conv4's docstring).
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: tuple[int, int, int, int] | list[int] = (64, 160, 320, 640),
        out_features: int | None = None,
        norm: str = "batch",
        pool: str = "avg",
        image_size: int = 84,
        drop_rate: float = 0.0,
        block_size: int = 5,
        head_init: str = "default",
    ) -> None:
        super().__init__()
        for key, value, allowed in (("norm", norm, NORMS), ("pool", pool, POOLS), ("head_init", head_init, HEAD_INITS)):
            if value not in allowed:
                raise ValueError(f"ResNet12 {key}={value!r} is not one of {allowed}")
        channels = tuple(channels)
        if len(channels) != 4 or min(channels) < 1:
            raise ValueError(
                f"ResNet12 channels={list(channels)} must be four positive widths, e.g. [64, 160, 320, 640]"
            )
        side = image_size // 16  # four 2×2 max-pools, each flooring
        if pool == "flatten" and side < 1:
            raise ValueError(f"ResNet12 image_size={image_size} vanishes after four 2×2 max-pools: use at least 16")
        blocks = []
        previous = in_channels
        for index, width in enumerate(channels):
            drop: nn.Module | None = None
            if drop_rate > 0:
                drop = DropBlock(drop_rate, block_size if index >= 2 else 1)
            blocks.append(ResidualBlock(previous, width, norm, drop))
            previous = width
        self.features = nn.Sequential(*blocks, GlobalAvgPool() if pool == "avg" else nn.Flatten())
        self.image_size, self.pool = image_size, pool
        self.embedding_size = channels[-1] * (1 if pool == "avg" else side * side)
        self.out_features = out_features
        self.head = nn.Linear(self.embedding_size, out_features) if out_features is not None else None
        if self.head is not None and head_init == "zeros":
            with torch.no_grad():
                self.head.weight.zero_()
                self.head.bias.zero_()
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                # He (fan-out) initialisation for the LeakyReLU, the usual one for this network.
                nn.init.kaiming_normal_(module.weight, a=0.1, mode="fan_out", nonlinearity="leaky_relu")

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x)
        if features.shape[-1] != self.embedding_size:
            raise ValueError(
                f"ResNet12 was built for {self.image_size}×{self.image_size} inputs ({self.embedding_size} "
                f"features) but got {tuple(x.shape[-2:])} ({features.shape[-1]} features): set the "
                f"backbone's image_size to {x.shape[-1]} (model.init_args.backbone.init_args.image_size)"
            )
        return self.head(features) if self.head is not None else features
