"""Using a meta-trained learner on a task of one's own: a support set with labels, queries without.

`MetaLearner.adapt_to(support_x, support_y)` adapts once and returns a `Predictor`, a callable
from query inputs to the predictions the evaluation path (`task_loss` in eval mode) gives for
them: logits for classification (Matching Networks: class log-probabilities; Relation
Networks: relation scores in [0, 1]), outputs for regression. Gradient-based learners keep
their adapted parameters (detached: nothing is trained through a predictor); metric-based ones
keep the support set and, under the per-example protocol, its embeddings.

Why the support set is kept, not only prototypes: under the default transductive protocol
BatchNorm normalises support and queries together (as evaluation does), so a metric learner's
support embeddings depend on the queries they are batched with, and are recomputed on every
call. Under `eval_protocol = "per_example"` they do not, and are computed once. Either way a
call gives what evaluation gives for the same support set and the same queries in one batch
(`tests/test_predict.py`, float64).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lightning_meta.models.norm import support_statistics
from lightning_meta.task import Params, Task

if TYPE_CHECKING:
    from lightning_meta.algorithms.base import MetaLearner


@contextlib.contextmanager
def evaluating(learner: MetaLearner, support_x: Tensor, protocol: str) -> Iterator[None]:
    """`learner` in eval mode (restored after), under `protocol` for this support set."""
    was_training = learner.training
    learner.eval()
    try:
        if protocol == "per_example":
            with support_statistics(learner, learner.backbone, support_x):
                yield
        else:
            yield
    finally:
        learner.train(was_training)


def check_support(learner: nn.Module, support_x: Tensor, support_y: Tensor, classifies_only: bool) -> int | None:
    """Refuse a support set the learner cannot adapt to; return its number of classes (None for
    regression targets). Classes must be the integers 0..ways-1, every one with an example."""
    name = type(learner).__name__
    if support_x.shape[0] != support_y.shape[0] or support_x.shape[0] == 0:
        raise ValueError(
            f"{name}.adapt_to: support_x has {support_x.shape[0]} rows and support_y {support_y.shape[0]}: "
            "give one label per support example, and at least one example"
        )
    if torch.is_floating_point(support_y):
        if classifies_only:
            raise TypeError(f"{name} classifies: support_y must be integer class labels, not float targets")
        return None
    if support_y.dim() != 1 or int(support_y.min()) < 0:
        raise ValueError(f"{name}.adapt_to: support_y must be a 1-d tensor of class indices 0..ways-1")
    ways = int(support_y.max()) + 1
    missing = sorted(set(range(ways)) - set(support_y.tolist()))
    if missing:
        raise ValueError(
            f"{name}.adapt_to: classes {missing} have no support example; number the classes 0..{ways - 1} "
            "with an example of each (or renumber them without gaps)"
        )
    return ways


class Predictor:
    """A learner adapted to one support set: `predictor(query_x)` gives the query predictions.

    Args:
        learner: the meta-trained learner (a metric learner's weights are read at call time; a
            gradient-based one's adapted parameters were fixed by `adapt_to`).
        support_x: the support inputs it adapted on (kept for the per-example protocol, and by
            metric learners under the transductive one).
        ways: the support set's number of classes (None for regression).
        predict: query inputs → predictions, run in eval mode, without gradients, under the
            protocol of `learner.eval_protocol` at adaptation time.
    """

    def __init__(
        self, learner: MetaLearner, support_x: Tensor, ways: int | None, predict: Callable[[Tensor], Tensor]
    ) -> None:
        self.learner, self.support_x, self.ways = learner, support_x, ways
        self.protocol = learner.eval_protocol
        self._predict = predict

    def __call__(self, query_x: Tensor) -> Tensor:
        with evaluating(self.learner, self.support_x, self.protocol), torch.no_grad():
            predictions = self._predict(query_x)
        if self.ways is not None and predictions.shape[-1] != self.ways:
            raise ValueError(
                f"{type(self.learner).__name__} predicts {predictions.shape[-1]} classes but the support set has "
                f"{self.ways}: a learner with an output head classifies as many classes as it was meta-trained "
                f"on (data.ways); give {predictions.shape[-1]} support classes, or use a metric-based learner "
                "(ProtoNet, Matching, Relation, Siamese), which takes any number"
            )
        return predictions

    def probabilities(self, query_x: Tensor) -> Tensor:
        """Class probabilities `[Q, ways]` (classification only): the softmax of the logits;
        Relation Networks' scores normalised to sum to 1."""
        if self.ways is None:
            raise TypeError("probabilities are for classification; this predictor was adapted to regression targets")
        return prediction_probabilities(self.learner, self(query_x))


def prediction_probabilities(learner: nn.Module, predictions: Tensor) -> Tensor:
    """Class probabilities from a learner's classification predictions (see `Predictor.probabilities`)."""
    to_probabilities = getattr(learner, "prediction_probabilities", None)
    if to_probabilities is not None:
        return to_probabilities(predictions)
    return predictions.softmax(-1)


def metric_predictor(
    learner: MetaLearner,
    support_x: Tensor,
    support_y: Tensor,
    embed: Callable[[Tensor], Tensor],
    score: Callable[[Tensor, Tensor, Tensor, int], Tensor],
) -> Predictor:
    """The predictor of a metric-based learner.

    Args:
        learner: the learner.
        support_x: support inputs.
        support_y: support labels.
        embed: inputs → embeddings (or feature maps), as `task_loss` computes them.
        score: (support embeddings, support labels, query embeddings, ways) → query predictions,
            as `task_loss` computes them.
    """
    ways = check_support(learner, support_x, support_y, classifies_only=True)
    n_support = support_x.shape[0]
    if learner.eval_protocol == "per_example":
        with evaluating(learner, support_x, "per_example"), torch.no_grad():
            support = embed(support_x)  # normalised on its own statistics, whatever the queries

        def predict(query_x: Tensor) -> Tensor:
            return score(support, support_y, embed(query_x), ways)

    else:

        def predict(query_x: Tensor) -> Tensor:
            embeddings = embed(torch.cat([support_x, query_x]))
            return score(embeddings[:n_support], support_y, embeddings[n_support:], ways)

    return Predictor(learner, support_x, ways, predict)


def support_task(support_x: Tensor, support_y: Tensor) -> Task:
    """A task of the support set and no queries: what an algorithm's `adapt` reads."""
    return Task(support_x, support_y, support_x[:0], support_y[:0])


def adapted_predictor(
    learner: MetaLearner, support_x: Tensor, support_y: Tensor, adapt: Callable[[], Callable[[Tensor], Tensor]]
) -> Predictor:
    """The predictor of a gradient-based learner.

    Args:
        learner: the learner.
        support_x: support inputs.
        support_y: support labels or regression targets.
        adapt: runs the inner loop (in eval mode, under the learner's evaluation protocol) and
            returns query inputs → predictions under the adapted parameters.
    """
    ways = check_support(learner, support_x, support_y, classifies_only=False)
    with evaluating(learner, support_x, learner.eval_protocol):
        predict = adapt()
    return Predictor(learner, support_x, ways, predict)


def detached(params: Params) -> Params:
    """Adapted parameters cut from the meta-parameters' graph (a predictor trains nothing)."""
    return {name: p.detach() for name, p in params.items()}
