"""Conv4: the four-block convolutional backbone of MAML (Finn et al. 2017) and Prototypical
Networks (Snell et al. 2017), the standard for Omniglot and miniImageNet few-shot benchmarks.

Each block is 3×3 conv → BatchNorm → ReLU → 2×2 max-pool. BatchNorm keeps no running
statistics: it always normalises with the current batch (transductive, as in the MAML and
Reptile papers), and running-stat updates inside `functional_call` would leak across tasks.
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_meta.models.norm import PlainBatchNorm2d

NORMS = ("batch", "plain_batch", "group", "none")


class Conv4(nn.Module):
    """Four conv blocks, then an optional linear head.

    Args:
        in_channels: channels of the input images (1 for Omniglot, 3 for miniImageNet).
        hidden_channels: channels of every conv block (64 in both papers).
        out_features: size of the linear head (the number of ways, for MAML-style classifiers).
            None gives no head: the flattened features are the output (an embedding, for
            metric-based methods such as Prototypical Networks).
        feature_size: spatial size of the last block's output, so the head knows its input
            size: 1 for 28×28 inputs (Omniglot), 5 for 84×84 (miniImageNet).
        norm: "batch" (`nn.BatchNorm2d` without running statistics, the papers' layer),
            "plain_batch" (the same normalisation in plain ops, `PlainBatchNorm2d`: correct
            under vmap, so tasks can be adapted in parallel), "group" (GroupNorm with 8
            channels a group: per-example statistics) or "none".
    """

    def __init__(
        self,
        in_channels: int = 1,
        hidden_channels: int = 64,
        out_features: int | None = None,
        feature_size: int = 1,
        norm: str = "batch",
        pooled_blocks: int = 4,
        flatten: bool = True,
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm={norm!r} is not one of {NORMS}")
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
            layers: list[nn.Module] = [nn.Conv2d(channels, hidden_channels, 3, padding=1)]
            if norm == "batch":
                layers.append(nn.BatchNorm2d(hidden_channels, track_running_stats=False))
            elif norm == "plain_batch":
                layers.append(PlainBatchNorm2d(hidden_channels))
            elif norm == "group":
                layers.append(nn.GroupNorm(max(1, hidden_channels // 8), hidden_channels))
            layers.append(nn.ReLU())
            if block < pooled_blocks:
                layers.append(nn.MaxPool2d(2))
            blocks.append(nn.Sequential(*layers))
            channels = hidden_channels
        self.features = nn.Sequential(*blocks, nn.Flatten()) if flatten else nn.Sequential(*blocks)
        self.embedding_size = hidden_channels * feature_size * feature_size
        self.out_features = out_features
        self.head = nn.Linear(self.embedding_size, out_features) if out_features is not None else None

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x)
        return self.head(features) if self.head is not None else features
