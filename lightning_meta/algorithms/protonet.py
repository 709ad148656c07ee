"""Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017).

Embed the support set, average each class's embeddings into a prototype, classify each query
by a softmax over negative squared Euclidean distances to the prototypes. No inner loop: the
support set adapts the classifier through the prototypes alone, so evaluation needs no
gradients. Squared Euclidean (a Bregman divergence) rather than cosine is what the paper found
best (§2.3, Table 1).
"""

from __future__ import annotations

import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_meta.algorithms.base import MetaLearner, TaskOutput, supervised_loss
from lightning_meta.algorithms.predictor import Predictor, metric_predictor
from lightning_meta.task import Task


def prototypes(embeddings: Tensor, labels: Tensor, ways: int) -> Tensor:
    """Mean embedding of each class 0..ways-1: `[ways, dim]`."""
    one_hot = torch.nn.functional.one_hot(labels, ways).to(embeddings.dtype)
    return (one_hot.T @ embeddings) / one_hot.sum(0).unsqueeze(1)


def squared_euclidean(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise ||a_i - b_j||², `[len(a), len(b)]`, computed exactly (no cdist expansion)."""
    return (a.unsqueeze(1) - b.unsqueeze(0)).pow(2).sum(-1)


class ProtoNet(MetaLearner):
    """Prototypical Networks with squared Euclidean distance.

    Args:
        backbone: the embedding network (e.g. Conv4 without a head).
        optimizer: the outer optimizer (default Adam, lr 1e-3 as in the paper).
        lr_scheduler: optional learning-rate schedule, stepped every episode (the paper
            halves the rate every 2000 episodes).
    """

    adapts_with_gradients = False
    # Not compiled by default: through the Trainer its compiled step was not measured faster than
    # the eager one on CPU (README "Compiling the backbone"); `compile: true` gives the eager numbers.

    def __init__(
        self,
        backbone: nn.Module,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(backbone, optimizer, lr_scheduler)

    def task_loss(self, task: Task) -> TaskOutput:
        if not task.is_classification:
            raise TypeError("ProtoNet classifies: its tasks need integer class labels, not regression targets")
        n_support = task.support_x.shape[0]
        # One forward for support and query together, as in the paper's code: BatchNorm then
        # normalises over the whole episode.
        embeddings = self.embed(torch.cat([task.support_x, task.query_x]))
        ways = int(task.support_y.max()) + 1
        logits = self.score(embeddings[:n_support], task.support_y, embeddings[n_support:], ways)
        return TaskOutput(supervised_loss(logits, task.query_y), logits)

    def embed(self, x: Tensor) -> Tensor:
        """Flat embeddings `[N, dim]`."""
        return self.backbone(x).flatten(1)

    def score(self, support: Tensor, support_y: Tensor, query: Tensor, ways: int) -> Tensor:
        """Logits `[Q, ways]`: minus the squared distance of each query to each prototype."""
        return -squared_euclidean(query, prototypes(support, support_y, ways))

    def adapt_to(self, support_x: Tensor, support_y: Tensor) -> Predictor:
        """The prototypes of the support set; the predictor scores queries against them
        (`MetaLearner.adapt_to`)."""
        return metric_predictor(self, support_x, support_y, self.embed, self.score)
