"""Relation Networks (Sung, Yang, Zhang, Xiang, Torr & Hospedales, CVPR 2018).

Instead of a fixed distance, a learned relation module scores how well a query matches a class:
the embedding module returns feature maps (not flattened), the feature maps of a class's support
examples are summed into one map (K-shot), each query's map is concatenated with each class map
along the channels, and the relation module (two conv blocks, then two linear layers and a
sigmoid) gives a relation score in [0, 1]. Scores regress onto the one-hot match with mean
squared error: the paper treats relation scores as a regression, not a classification (§3.2).

The embedding is `Conv4(pooled_blocks=2, flatten=False)` in the configs: 64 maps of 7×7 for
28×28 inputs (the paper's Omniglot net uses unpadded convolutions and gets 5×5; the relation
module works on either, `feature_size` says which).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_meta.algorithms.base import MetaLearner, TaskOutput
from lightning_meta.algorithms.predictor import Predictor, metric_predictor
from lightning_meta.models.norm import query_groups
from lightning_meta.task import Task


def class_feature_maps(maps: Tensor, labels: Tensor, ways: int) -> Tensor:
    """Sum of each class's support feature maps (the paper's K-shot class representation): `[ways, C, H, W]`."""
    one_hot = F.one_hot(labels, ways).to(maps.dtype)  # [S, ways]
    return torch.einsum("sk,schw->kchw", one_hot, maps)


def relation_targets(query_y: Tensor, ways: int, dtype: torch.dtype) -> Tensor:
    """The regression targets: 1 for the query's own class, 0 for the others, `[Q, ways]`."""
    return F.one_hot(query_y, ways).to(dtype)


class RelationModule(nn.Module):
    """g_φ: two conv blocks (3×3 conv, BatchNorm on batch statistics, ReLU, 2×2 max-pool) on
    the concatenated pair of maps, then Linear → ReLU → Linear → sigmoid.

    Args:
        channels: C, channels of one feature map (the input has 2C).
        feature_size: spatial side of the feature maps.
        hidden: width of the hidden linear layer (8 in the paper).
    """

    def __init__(self, channels: int, feature_size: int, hidden: int) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        for in_channels in (2 * channels, channels):
            blocks += [
                nn.Conv2d(in_channels, channels, 3, padding=1),
                nn.BatchNorm2d(channels, track_running_stats=False),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
        self.convs = nn.Sequential(*blocks, nn.Flatten())
        side = feature_size // 4
        self.fc = nn.Sequential(nn.Linear(channels * side * side, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, pairs: Tensor) -> Tensor:
        """Relation scores in [0, 1] for `[P, 2C, H, W]` pairs: `[P]`."""
        return torch.sigmoid(self.fc(self.convs(pairs))).squeeze(-1)


class RelationNetworks(MetaLearner):
    """Relation Networks: a learned relation module scores (query, class) feature-map pairs.

    Args:
        backbone: the embedding module, returning feature maps `[N, C, H, W]`
            (e.g. `Conv4(pooled_blocks=2, flatten=False)`).
        feature_channels: C of the backbone's maps (64 in the paper).
        feature_size: spatial side of the backbone's maps (7 for the configs' Conv4 on 28×28;
            at least 4, as the relation module pools twice).
        relation_hidden: width of the relation module's hidden linear layer (8 in the paper).
        optimizer: the outer optimizer (default Adam, 1e-3 in the paper).
        lr_scheduler: optional learning-rate schedule, stepped every episode batch (the paper
            halves the rate every 100,000 episodes).
    """

    adapts_with_gradients = False

    def __init__(
        self,
        backbone: nn.Module,
        feature_channels: int = 64,
        feature_size: int = 7,
        relation_hidden: int = 8,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(backbone, optimizer, lr_scheduler)
        if feature_size < 4:
            raise ValueError(
                f"model.init_args.feature_size={feature_size}: the relation module pools twice and needs maps of "
                "at least 4×4; give the backbone fewer pooling blocks (Conv4 pooled_blocks=2 gives 7×7 on 28×28)"
            )
        for key, value in (("feature_channels", feature_channels), ("relation_hidden", relation_hidden)):
            if value < 1:
                raise ValueError(f"model.init_args.{key}={value} must be at least 1")
        self.feature_channels, self.feature_size = feature_channels, feature_size
        self.relation = RelationModule(feature_channels, feature_size, relation_hidden)

    def task_loss(self, task: Task) -> TaskOutput:
        if not task.is_classification:
            raise TypeError("RelationNetworks classifies: its tasks need integer class labels")
        n_support = task.support_x.shape[0]
        maps = self.embed(torch.cat([task.support_x, task.query_x]))
        ways = int(task.support_y.max()) + 1
        scores = self.score(maps[:n_support], task.support_y, maps[n_support:], ways)
        loss = F.mse_loss(scores, relation_targets(task.query_y, ways, scores.dtype))
        return TaskOutput(loss, scores)

    def embed(self, x: Tensor) -> Tensor:
        """The backbone's feature maps `[N, C, H, W]`, checked against the relation module's input."""
        maps = self.backbone(x)
        expected = (self.feature_channels, self.feature_size, self.feature_size)
        if maps.dim() != 4 or tuple(maps.shape[1:]) != expected:
            raise ValueError(
                f"RelationNetworks needs feature maps [N, {', '.join(map(str, expected))}] from the backbone, got "
                f"{list(maps.shape)}: use Conv4(flatten=False, pooled_blocks=2) on 28×28 inputs, or set "
                "model.init_args.feature_channels / feature_size to the backbone's maps"
            )
        return maps

    def score(self, support: Tensor, support_y: Tensor, queries: Tensor, ways: int) -> Tensor:
        """Relation scores `[Q, ways]` of every (query, class) pair."""
        classes = class_feature_maps(support, support_y, ways)  # [ways, C, H, W]
        Q = queries.shape[0]
        pairs = torch.cat(
            [classes.unsqueeze(0).expand(Q, *classes.shape), queries.unsqueeze(1).expand(Q, ways, *queries.shape[1:])],
            dim=2,
        )  # [Q, ways, 2C, H, W]: class map first, then the query's, as in the paper's code
        # The relation module's BatchNorm sees every (query, class) pair of the task: under the
        # per-example protocol each query's `ways` pairs are normalised among themselves instead.
        with query_groups(ways):
            return self.relation(pairs.flatten(0, 1)).view(Q, ways)

    def adapt_to(self, support_x: Tensor, support_y: Tensor) -> Predictor:
        """The support feature maps; the predictor scores queries against each class's
        (`MetaLearner.adapt_to`)."""
        return metric_predictor(self, support_x, support_y, self.embed, self.score)

    def prediction_probabilities(self, predictions: Tensor) -> Tensor:
        """Relation scores are not logits: normalised to sum to 1 over the classes."""
        return predictions / predictions.sum(-1, keepdim=True).clamp_min(torch.finfo(predictions.dtype).tiny)
