"""The inner loss as a component (issue 15, point 1): what the inner loop descends on a task's support set.

An `InnerLoss` is called once per inner step as `loss(params, task, predict, step)`, where
`predict(x)` runs the network under the parameters being adapted, `task` is the task whose
support set is adapted on (its query inputs are there too, unlabelled use only: the query
*labels* must never reach an inner loss), and `step` is the 0-based inner step. A loss may
have parameters of its own (ML3's loss network): it is an `nn.Module`, so when a learner holds
it (`learner.inner_loss`) its parameters are in the learner's `state_dict` and the outer
optimizer meta-trains them through the unrolled inner loop.

The outer (query) loss is never this: it stays the task's true loss (`supervised_loss`).

- `TaskLoss` (the default): cross-entropy for class labels, mean squared error for float
  targets — exactly the loss every algorithm used before, so their numbers are unchanged.
- `CandidateLoss`: one fixed loss of `CANDIDATES` by name (a robust loss for noisy tasks).
- `ML3Loss` (Bechtle et al., ICPR 2021): a learned loss network L_φ(ŷ, y).

Torch only (`DESIGN.md`: the inner loop's components sit below `algorithms/`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_meta.losses.candidates import candidate_fn, known_candidates
from lightning_meta.task import Params, Task

__all__ = ["CandidateLoss", "InnerLoss", "ML3Loss", "TaskLoss", "task_kind"]

Predict = Callable[[Tensor], Tensor]


def task_kind(targets: Tensor) -> str:
    """ "regression" for float targets, "classification" for integer labels."""
    return "regression" if torch.is_floating_point(targets) else "classification"


class InnerLoss(nn.Module):
    """The support loss of one inner step: `loss(params, task, predict, step) -> scalar`.

    Subclasses implement `forward`. It must be a pure tensor function of its inputs for the
    task-parallel (vmapped) path; a loss not proven equal to the loop under vmap says why in
    `vmap_blocker`.
    """

    vmap_blocker: str | None = None
    """Why this loss may not run under `torch.func.vmap`, or None."""

    def forward(self, params: Params, task: Task, predict: Predict, step: int) -> Tensor:
        raise NotImplementedError


class TaskLoss(InnerLoss):
    """The task's own loss: cross-entropy for class labels, mean squared error for float targets."""

    def forward(self, params: Params, task: Task, predict: Predict, step: int) -> Tensor:
        predictions = predict(task.support_x)
        if torch.is_floating_point(task.support_y):
            return F.mse_loss(predictions, task.support_y)
        return F.cross_entropy(predictions, task.support_y)


class CandidateLoss(InnerLoss):
    """One fixed candidate loss (`lightning_meta.losses.CANDIDATES`), e.g. `huber` for tasks with outliers.

    Args:
        name: a candidate of the task's kind: classification `cross_entropy`,
            `label_smoothed_cross_entropy`, `focal`, `generalised_cross_entropy`, `mse_one_hot`,
            `consistency_filtered_cross_entropy` (not in the default candidate set);
            regression `mse`, `l1`, `huber`, `log_cosh`, `cauchy`, and `mse_l1` (MSE + 0.2·Σ|w|
            over the weights, AutoLoss's).
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        known = {n: kind for kind in ("classification", "regression") for n in known_candidates(kind)}
        if name not in known:
            raise ValueError(f"inner_loss name={name!r} is not a candidate loss; choose one of {sorted(known)}")
        self.name, self.kind = name, known[name]

    def forward(self, params: Params, task: Task, predict: Predict, step: int) -> Tensor:
        kind = task_kind(task.support_y)
        if kind != self.kind:
            raise ValueError(
                f"inner_loss {self.name!r} is a {self.kind} loss but these tasks are {kind}: choose one of "
                f"{sorted(known_candidates(kind))}"
            )
        return candidate_fn(self.kind, self.name)(predict(task.support_x), task.support_y, params)


class ML3Loss(InnerLoss):
    """ML3's learned loss (Bechtle et al., ICPR 2021): L_φ(ŷ, y) = mean over examples of an MLP.

    The network takes each support example's prediction and target (for classification the
    logits and the one-hot label, concatenated) through `hidden` ReLU layers (50-50 as in its
    reference code) to a softplus output (non-negative), averaged over the support set. φ is
    meta-trained by the outer loop so that the adapted model minimises the true task loss on the
    queries; the outer loss never sees φ's output.

    As in the reference code (`ML3_SineRegressionLoss`), the linear layers have no biases and
    Xavier-uniform weights. Without biases the value under the softplus is positively homogeneous
    in (ŷ, y) — scaling both by c > 0 scales it by c — so a loss learned on small targets
    extrapolates linearly to larger ones. In the sine benchmark (`benchmarks/ml3_sine.py`, loss
    learned at A = 1, tested up to A = 5) `bias=True` ended 0.3-0.5 higher in final MSE
    (`benchmarks/results/ml3_sine_ablations/`).

    Args:
        hidden: widths of the hidden layers.
        outputs: the size of a prediction (1 for sine regression, `ways` for classification);
            the input of the network is `2 × outputs`.
        bias: give the linear layers biases (zero-initialised); the reference has none.
    """

    def __init__(self, outputs: int = 1, hidden: tuple[int, ...] = (50, 50), bias: bool = False) -> None:
        super().__init__()
        if outputs < 1:
            raise ValueError(f"ML3Loss outputs={outputs} must be the size of a prediction (1 for sines, ways)")
        layers: list[nn.Module] = []
        width = 2 * outputs
        for h in hidden:
            layers += [nn.Linear(width, h, bias=bias), nn.ReLU()]
            width = h
        layers += [nn.Linear(width, 1, bias=bias), nn.Softplus()]
        for layer in layers:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
        self.network = nn.Sequential(*layers)
        self.outputs = outputs

    def forward(self, params: Params, task: Task, predict: Predict, step: int) -> Tensor:
        predictions = predict(task.support_x)
        targets = task.support_y
        if not torch.is_floating_point(targets):
            targets = F.one_hot(targets, predictions.shape[-1]).to(predictions.dtype)
        if predictions.shape[-1] != self.outputs:
            raise ValueError(
                f"ML3Loss was built for predictions of size {self.outputs} but got {predictions.shape[-1]}: set "
                f"its `outputs` to {predictions.shape[-1]}"
            )
        return self.network(torch.cat([predictions, targets.to(predictions.dtype)], dim=-1)).mean()
