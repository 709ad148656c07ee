"""Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra, NeurIPS 2016).

A query is classified by attention over the support set: a softmax over the cosine similarities
between its embedding and each support embedding, the prediction being the attention-weighted
sum of the support examples' one-hot labels, trained with the negative log-likelihood of the
true class. Training episodes mirror the test ones ("test and train conditions must match").

Full-context embeddings (`fce`, §2.1.2) make each embedding depend on the whole support set:
a bidirectional LSTM over the support embeddings (g), and an attention LSTM that reads the
support set K times for each query (f). The paper found them to help on miniImageNet, not on
Omniglot, so they are off by default. As in most public re-implementations, the attention LSTM's
hidden state is the sum h + r of the previous state and the read-out (the paper concatenates
them), so one LSTM cell of the embedding size serves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_meta.algorithms.base import MetaLearner, TaskOutput, embedding_size, scores_by_class
from lightning_meta.algorithms.predictor import Predictor, metric_predictor
from lightning_meta.task import Task


def cosine_similarities(query: Tensor, support: Tensor) -> Tensor:
    """cos(f(x̂), g(x_i)) for every query and support embedding: `[Q, S]`."""
    return F.normalize(query, dim=-1) @ F.normalize(support, dim=-1).T


def attention(query: Tensor, support: Tensor) -> Tensor:
    """a(x̂, x_i) = softmax_i(cos(f(x̂), g(x_i))): `[Q, S]`, each row summing to 1."""
    return cosine_similarities(query, support).softmax(-1)


def class_log_probabilities(log_attention: Tensor, support_y: Tensor, ways: int) -> Tensor:
    """log Σ_{i: y_i = c} a_i per class c, `[Q, ways]`, computed as a masked logsumexp (stable)."""
    return scores_by_class(log_attention, support_y, ways).logsumexp(-1)


class FullContextEmbeddings(nn.Module):
    """g: bidirectional LSTM over the support set (with a skip connection); f: attention LSTM.

    Args:
        dim: embedding size (the LSTMs' input and hidden size).
        steps: K, how many times the attention LSTM reads the support set.
    """

    def __init__(self, dim: int, steps: int) -> None:
        super().__init__()
        self.steps = steps
        self.support_lstm = nn.LSTM(dim, dim, bidirectional=True, batch_first=True)
        self.query_cell = nn.LSTMCell(dim, dim)

    def forward(self, query: Tensor, support: Tensor) -> tuple[Tensor, Tensor]:
        out, _ = self.support_lstm(support.unsqueeze(0))  # [1, S, 2·dim]: forward, backward halves
        forward_h, backward_h = out.squeeze(0).chunk(2, dim=-1)
        support = support + forward_h + backward_h
        h, c = torch.zeros_like(query), torch.zeros_like(query)
        for _ in range(self.steps):
            readout = (h @ support.T).softmax(-1) @ support
            h_hat, c = self.query_cell(query, (h + readout, c))
            h = h_hat + query
        return h, support


class MatchingNetworks(MetaLearner):
    """Matching Networks: cosine attention over the support set, NLL of the true class.

    Args:
        backbone: the embedding network (e.g. Conv4 without a head), shared by support and queries.
        fce: full-context embeddings (bidirectional support LSTM, attention LSTM for queries).
        fce_steps: K, the attention LSTM's reads of the support set (with `fce`).
        embedding_dim: the embedding size, for the FCE LSTMs (default: the backbone's
            `embedding_size`).
        optimizer: the outer optimizer (default Adam).
        lr_scheduler: optional learning-rate schedule, stepped every episode batch.
    """

    adapts_with_gradients = False

    def __init__(
        self,
        backbone: nn.Module,
        fce: bool = False,
        fce_steps: int = 5,
        embedding_dim: int | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(backbone, optimizer, lr_scheduler)
        self.context: FullContextEmbeddings | None = None
        if fce:  # only then: unused LSTM parameters would break DDP
            if fce_steps < 1:
                raise ValueError(f"model.init_args.fce_steps={fce_steps} must be at least 1 (the paper's K)")
            self.context = FullContextEmbeddings(
                embedding_size(backbone, embedding_dim, "fce=True", "LSTMs"), fce_steps
            )

    def task_loss(self, task: Task) -> TaskOutput:
        if not task.is_classification:
            raise TypeError("MatchingNetworks classifies: its tasks need integer class labels")
        n_support = task.support_x.shape[0]
        embeddings = self.embed(torch.cat([task.support_x, task.query_x]))
        ways = int(task.support_y.max()) + 1
        log_probs = self.score(embeddings[:n_support], task.support_y, embeddings[n_support:], ways)
        return TaskOutput(F.nll_loss(log_probs, task.query_y), log_probs)

    def embed(self, x: Tensor) -> Tensor:
        """Flat embeddings `[N, dim]` (before the full-context embeddings)."""
        return self.backbone(x).flatten(1)

    def score(self, support: Tensor, support_y: Tensor, query: Tensor, ways: int) -> Tensor:
        """Class log-probabilities `[Q, ways]` by attention over the support set."""
        if self.context is not None:
            query, support = self.context(query, support)
        return class_log_probabilities(cosine_similarities(query, support).log_softmax(-1), support_y, ways)

    def adapt_to(self, support_x: Tensor, support_y: Tensor) -> Predictor:
        """The support embeddings; the predictor attends over them (`MetaLearner.adapt_to`)."""
        return metric_predictor(self, support_x, support_y, self.embed, self.score)
