"""Siamese networks for one-shot recognition (Koch, Zemel & Salakhutdinov, ICML DL workshop 2015).

One embedding network, applied twin-wise to two images, learns whether they show the same
class; a few-shot task is then solved by comparing each query with every support example and
picking the class of the best match. Pairs come from each episode itself (every query against
every support example), so Siamese networks train on the same task batches as the rest of the
family. Two pair losses, chosen by `loss`:

- "contrastive" (Hadsell, Chopra & LeCun 2006): d² for same-class pairs, max(0, m − d)² for
  different ones, d the Euclidean distance of the embeddings; predict the nearest support example.
- "koch": the paper's own, binary cross-entropy on p = σ(Σ_j α_j |e1_j − e2_j| + b), the learned
  weighted L1 distance; predict the support example with the highest same-class probability.

Deviation from the paper, on purpose: the embedding is the injected backbone (Conv4-64 on 28×28
in the configs, like the rest of the family) rather than Koch's 4096-d net on 105×105 drawings,
and pairs are drawn within episodes rather than from an affine-distorted pair set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_meta.algorithms.base import MetaLearner, TaskOutput, embedding_size, scores_by_class
from lightning_meta.algorithms.predictor import Predictor, metric_predictor
from lightning_meta.algorithms.protonet import squared_euclidean
from lightning_meta.task import Task

LOSSES = ("contrastive", "koch")


def contrastive_loss(squared_distances: Tensor, same: Tensor, margin: float, balance: bool = True) -> Tensor:
    """The contrastive loss of every pair, averaged: d² if same class, else max(0, m − d)².

    Args:
        squared_distances: d² per pair, any shape.
        same: bool, same shape: whether the pair shares a class.
        margin: m, the distance beyond which different-class pairs cost nothing.
        balance: average the same-class and the different-class pairs' means (a 20-way episode
            has 19 different pairs per same one); False: one mean over all pairs.
    """
    # sqrt has an infinite slope at 0: clamping keeps a coincident different-class pair finite.
    distances = squared_distances.clamp_min(1e-12).sqrt()
    losses = torch.where(same, squared_distances, (margin - distances).clamp_min(0).pow(2))
    return balanced_mean(losses, same) if balance else losses.mean()


def balanced_mean(losses: Tensor, same: Tensor) -> Tensor:
    """(mean over same-class pairs + mean over different-class pairs) / 2; a missing kind counts 0."""
    same_f = same.to(losses.dtype)
    n_same, n_diff = same_f.sum(), (1 - same_f).sum()
    same_mean = (losses * same_f).sum() / n_same.clamp_min(1)
    diff_mean = (losses * (1 - same_f)).sum() / n_diff.clamp_min(1)
    return (same_mean + diff_mean) / 2


def best_match_per_class(scores: Tensor, support_y: Tensor, ways: int) -> Tensor:
    """`[Q, ways]` logits: for each query and class, the highest score among that class's support examples."""
    return scores_by_class(scores, support_y, ways).amax(-1)


class Siamese(MetaLearner):
    """Siamese network trained on the query × support pairs of each episode.

    Args:
        backbone: the twin embedding network (e.g. Conv4 without a head).
        loss: "contrastive" (margin loss on the Euclidean distance) or "koch" (binary
            cross-entropy on the learned weighted L1 distance).
        margin: m of the contrastive loss (unused by "koch"); must be > 0.
        balance_pairs: weigh same-class and different-class pairs equally in the loss (Koch
            trained on balanced pairs; an N-way episode has N − 1 different pairs per same one).
        embedding_dim: size of the flat embedding, for the "koch" weighted-L1 layer (default:
            the backbone's `embedding_size`).
        optimizer: the outer optimizer (default Adam).
        lr_scheduler: optional learning-rate schedule, stepped every episode batch.
    """

    adapts_with_gradients = False

    def __init__(
        self,
        backbone: nn.Module,
        loss: str = "contrastive",
        margin: float = 1.0,
        balance_pairs: bool = True,
        embedding_dim: int | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(backbone, optimizer, lr_scheduler)
        if loss not in LOSSES:
            raise ValueError(f"model.init_args.loss={loss!r} is not one of {LOSSES}")
        if not margin > 0:
            raise ValueError(f"model.init_args.margin={margin} must be > 0 (1.0 suits embeddings of unit scale)")
        self.loss, self.margin, self.balance_pairs = loss, margin, balance_pairs
        self.distance_head: nn.Linear | None = None
        if loss == "koch":  # only then: an unused parameter would break DDP
            self.distance_head = nn.Linear(
                embedding_size(backbone, embedding_dim, "loss='koch'", "weighted-L1 layer"), 1
            )

    def pair_scores(self, query: Tensor, support: Tensor) -> Tensor:
        """`[Q, S]` similarity of every (query, support) embedding pair: −d² ("contrastive"), or
        the same-class logit Σ α|q − s| + b ("koch")."""
        if self.distance_head is None:
            return -squared_euclidean(query, support)
        return self.distance_head((query.unsqueeze(1) - support.unsqueeze(0)).abs()).squeeze(-1)

    def task_loss(self, task: Task) -> TaskOutput:
        if not task.is_classification:
            raise TypeError("Siamese classifies: its tasks need integer class labels, not regression targets")
        n_support = task.support_x.shape[0]
        embeddings = self.embed(torch.cat([task.support_x, task.query_x]))
        scores = self.pair_scores(embeddings[n_support:], embeddings[:n_support])
        same = task.query_y.unsqueeze(1) == task.support_y.unsqueeze(0)
        if self.distance_head is None:
            loss = contrastive_loss(-scores, same, self.margin, self.balance_pairs)
        else:
            pair_losses = F.binary_cross_entropy_with_logits(scores, same.to(scores.dtype), reduction="none")
            loss = balanced_mean(pair_losses, same) if self.balance_pairs else pair_losses.mean()
        ways = int(task.support_y.max()) + 1
        # −d² ranks support examples as d does: the best score per class is the nearest example.
        return TaskOutput(loss, best_match_per_class(scores, task.support_y, ways))

    def embed(self, x: Tensor) -> Tensor:
        """Flat embeddings `[N, dim]`."""
        return self.backbone(x).flatten(1)

    def score(self, support: Tensor, support_y: Tensor, query: Tensor, ways: int) -> Tensor:
        """`[Q, ways]`: each class's best-matching support example's pair score."""
        return best_match_per_class(self.pair_scores(query, support), support_y, ways)

    def adapt_to(self, support_x: Tensor, support_y: Tensor) -> Predictor:
        """The support embeddings; the predictor matches queries against them (`MetaLearner.adapt_to`)."""
        return metric_predictor(self, support_x, support_y, self.embed, self.score)
