"""Conv4: the four-block convolutional backbone of MAML (Finn et al. 2017) and Prototypical
Networks (Snell et al. 2017), the standard for Omniglot and miniImageNet few-shot benchmarks.

Two ways to halve the resolution in each block, both in the papers' code:

- `downsample="max_pool"`: 3×3 conv → BatchNorm → ReLU → 2×2 max-pool, flattened at the end
  (Vinyals et al., Snell et al., and Finn et al.'s miniImageNet network). On 28×28 Omniglot
  the last map is 1×1.
- `downsample="stride"`: 3×3 conv with stride 2 → BatchNorm → ReLU, then the last map averaged
  over its positions (Finn et al.'s Omniglot network, `--max_pool=False` in their code). The
  embedding has `hidden_channels` entries whatever the input size.

BatchNorm keeps no running statistics: it always normalises with the current batch
(transductive, as in the MAML and Reptile papers), and running-stat updates inside
`functional_call` would leak across tasks.

The head's initialisation matters to gradient-based meta-learners: each inner step adds to the
head a multiple of the support set's class-mean features (the gradient of the cross-entropy),
and a random initial head is noise added to that classifier, the larger the smaller the inner
learning rate. `head_init="zeros"` starts the head at zero, so the first inner step alone
builds the classifier (measured on Omniglot 5-way 1-shot: README, "Why the MAML configs start
the head at zero").
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_meta.models.norm import PlainBatchNorm2d

NORMS = ("batch", "plain_batch", "group", "none")
DOWNSAMPLES = ("max_pool", "stride")
HEAD_INITS = ("default", "zeros")


class GlobalAvgPool(nn.Module):
    """Mean over the spatial positions of an `[N, C, H, W]` map: `[N, C]`."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(-2, -1))


class Conv4(nn.Module):
    """Four conv blocks, then an optional linear head.

    Args:
        in_channels: channels of the input images (1 for Omniglot, 3 for miniImageNet).
        hidden_channels: channels of every conv block (64 in both papers).
        out_features: size of the linear head (the number of ways, for MAML-style classifiers).
            None gives no head: the flattened features are the output (an embedding, for
            metric-based methods such as Prototypical Networks).
        image_size: side of the (square) input images, from which the flattened features'
            size (the head's input, `embedding_size`) follows with `downsample="max_pool"`:
            28 (Omniglot) gives 1×1 maps, 84 (miniImageNet) 5×5. Unused with
            `downsample="stride"`, whose features are averaged. A mismatched input is refused
            with the value to set.
        feature_size: the last map's side, set by hand instead of `image_size` (older configs);
            None (the default) derives it from `image_size`.
        norm: "batch" (`nn.BatchNorm2d` without running statistics, the papers' layer),
            "plain_batch" (the same normalisation in plain ops, `PlainBatchNorm2d`: correct
            under vmap, so tasks can be adapted in parallel), "group" (GroupNorm with 8
            channels a group: per-example statistics) or "none".
        pooled_blocks: how many of the four blocks halve the resolution (the first ones);
            Relation Networks keep the last two at full resolution.
        flatten: end with flat features (for a head or an embedding); False returns the last
            feature maps (Relation Networks' relation module takes maps).
        downsample: "max_pool" or "stride" (module docstring).
        head_init: "default" (PyTorch's `nn.Linear` initialisation) or "zeros".
    """

    def __init__(
        self,
        in_channels: int = 1,
        hidden_channels: int = 64,
        out_features: int | None = None,
        image_size: int = 28,
        feature_size: int | None = None,
        norm: str = "batch",
        pooled_blocks: int = 4,
        flatten: bool = True,
        downsample: str = "max_pool",
        head_init: str = "default",
    ) -> None:
        super().__init__()
        for key, value, allowed in (("norm", norm, NORMS), ("downsample", downsample, DOWNSAMPLES)):
            if value not in allowed:
                raise ValueError(f"Conv4 {key}={value!r} is not one of {allowed}")
        if head_init not in HEAD_INITS:
            raise ValueError(f"Conv4 head_init={head_init!r} is not one of {HEAD_INITS}")
        if not 0 <= pooled_blocks <= 4:
            raise ValueError(f"Conv4 pooled_blocks={pooled_blocks} must be in 0..4")
        if not flatten and out_features is not None:
            raise ValueError(
                f"Conv4 flatten=False returns feature maps, which a linear head cannot take: "
                f"set out_features=None (got {out_features}) or flatten=True"
            )
        blocks = []
        channels = in_channels
        for block in range(4):
            stride = 2 if downsample == "stride" and block < pooled_blocks else 1
            layers: list[nn.Module] = [nn.Conv2d(channels, hidden_channels, 3, stride=stride, padding=1)]
            if norm == "batch":
                layers.append(nn.BatchNorm2d(hidden_channels, track_running_stats=False))
            elif norm == "plain_batch":
                layers.append(PlainBatchNorm2d(hidden_channels))
            elif norm == "group":
                layers.append(nn.GroupNorm(max(1, hidden_channels // 8), hidden_channels))
            layers.append(nn.ReLU())
            if downsample == "max_pool" and block < pooled_blocks:
                layers.append(nn.MaxPool2d(2))
            blocks.append(nn.Sequential(*layers))
            channels = hidden_channels
        if not flatten:
            self.features = nn.Sequential(*blocks)
        elif downsample == "stride":
            self.features = nn.Sequential(*blocks, GlobalAvgPool())
        else:
            self.features = nn.Sequential(*blocks, nn.Flatten())
        if image_size < 1 or (feature_size is not None and feature_size < 1):
            raise ValueError(f"Conv4 image_size={image_size} and feature_size={feature_size} must be positive")
        side = image_size
        for _ in range(pooled_blocks):
            side //= 2  # MaxPool2d(2) floors
        self.image_size, self.flatten = image_size, flatten and downsample == "max_pool"
        size = 1 if downsample == "stride" else feature_size if feature_size is not None else side
        if size < 1:
            raise ValueError(
                f"Conv4 image_size={image_size} is too small for {pooled_blocks} max-pooled blocks "
                f"(the maps vanish): use images of at least {2**pooled_blocks} pixels or fewer pooled_blocks"
            )
        self.embedding_size = hidden_channels * size * size
        self.out_features = out_features
        self.head = nn.Linear(self.embedding_size, out_features) if out_features is not None else None
        if self.head is not None and head_init == "zeros":
            with torch.no_grad():
                self.head.weight.zero_()
                self.head.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x)
        if self.flatten and features.shape[-1] != self.embedding_size:
            raise ValueError(
                f"Conv4 was built for {self.image_size}×{self.image_size} inputs ({self.embedding_size} "
                f"features) but got {tuple(x.shape[-2:])} ({features.shape[-1]} features): set the "
                f"backbone's image_size to {x.shape[-1]} (model.init_args.backbone.init_args.image_size)"
            )
        return self.head(features) if self.head is not None else features
