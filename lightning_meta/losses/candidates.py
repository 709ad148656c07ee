"""Candidate inner losses for loss selection (issue 15): robust and noise-tolerant variants of
the two task losses, each `(predictions, targets) -> mean over examples`.

Classification (logits `[N, ways]`, integer labels `[N]`):

- `cross_entropy`: the task loss.
- `label_smoothed_cross_entropy`: targets (1 − ε)·one-hot + ε/ways (Szegedy et al. 2016).
- `focal`: −(1 − p_y)^γ log p_y (Lin et al. 2017); γ = 0 is cross-entropy.
- `generalised_cross_entropy`: (1 − p_y^q)/q (Zhang & Sabuncu 2018), between cross-entropy
  (q → 0) and mean absolute error (q = 1), robust to flipped labels.
- `mse_one_hot`: squared error between the softmax probabilities and the one-hot targets,
  summed over classes (bounded, so also robust to flipped labels).
- `consistency_filtered_cross_entropy`: cross-entropy with each support example weighted by
  whether its label agrees with where it lies among the other support examples (leave-one-out
  nearest class mean of the detached logits): 1 where its own label's mean is the nearest, less
  the farther it is. Unlike the losses above it can tell a flipped label from a hard example, so
  it is meant for the flipped tasks of a label-noise family (and to be chosen per task); it is
  not in the default candidate set (`EXTRA_CANDIDATES`).

Regression (predictions and targets of the same shape, residual d = prediction − target):

- `mse`: the task loss; `l1`: |d|; `huber`: quadratic below δ, linear above (δ = 1);
- `log_cosh`: log cosh d, quadratic near 0 and linear far out;
- `cauchy`: (c²/2)·log(1 + (d/c)²) (c = 1), whose gradient vanishes for large residuals, so
  heavy-tailed outliers barely move the fit.

Losses that also read the parameters being adapted (`PARAM_CANDIDATES`, called as
`(predictions, targets, params)`; chosen by name like the others but never part of a default
candidate set):

- `mse_l1`: MSE + 0.2·Σ|w| over the weight tensors (names ending in `weight`; biases are not
  penalised): AutoLoss's second candidate for its linear-regression task (Xu et al., ICLR 2019).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of `logits` `[N, C]` against integer `labels` `[N]`."""
    return F.cross_entropy(logits, labels)


def label_smoothed_cross_entropy(logits: Tensor, labels: Tensor, smoothing: float = 0.1) -> Tensor:
    """Cross-entropy against (1 − smoothing)·one-hot + smoothing/C."""
    return F.cross_entropy(logits, labels, label_smoothing=smoothing)


def _log_p_true(logits: Tensor, labels: Tensor) -> Tensor:
    return F.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def focal(logits: Tensor, labels: Tensor, gamma: float = 2.0) -> Tensor:
    """Mean −(1 − p_y)^γ · log p_y."""
    log_p = _log_p_true(logits, labels)
    return (-((1 - log_p.exp()) ** gamma) * log_p).mean()


def generalised_cross_entropy(logits: Tensor, labels: Tensor, q: float = 0.7) -> Tensor:
    """Mean (1 − p_y^q)/q, computed as (1 − exp(q·log p_y))/q for stability."""
    if not 0 < q <= 1:
        raise ValueError(f"generalised cross-entropy q={q} must be in (0, 1]")
    return (-torch.expm1(q * _log_p_true(logits, labels)) / q).mean()


def mse_one_hot(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean over examples of Σ_c (softmax(logits)_c − one-hot_c)²."""
    one_hot = F.one_hot(labels, logits.shape[-1]).to(logits.dtype)
    return (F.softmax(logits, dim=-1) - one_hot).pow(2).sum(-1).mean()


def loo_class_distances(z: Tensor, y: Tensor, classes: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Leave-one-out class geometry of a support set `z` `[N, D]` with labels `y` `[N]`: `d2[i, c]`,
    the squared distance from example i to the mean of class c's examples with i left out of its
    own class (inf where that class has no other example); `scale`, the mean squared distance
    between two examples; the class `sums` `[C, D]` and `counts` `[C]`. The one-hot is built by
    comparison, not `F.one_hot` (which reads the labels' max: data-dependent, no vmap)."""
    n = len(y)
    one_hot = (y.unsqueeze(-1) == torch.arange(classes, device=y.device)).to(z.dtype)  # [N, C]
    sums, counts = one_hot.T @ z, one_hot.sum(0)  # [C, D], [C]
    # Leave-one-out class sums and counts for every (example, class): only the own class changes.
    loo_sums = sums.unsqueeze(0) - one_hot.unsqueeze(-1) * z.unsqueeze(1)  # [N, C, D]
    loo_counts = counts.unsqueeze(0) - one_hot  # [N, C]
    means = loo_sums / loo_counts.clamp_min(1).unsqueeze(-1)
    d2 = (z.unsqueeze(1) - means).pow(2).sum(-1).masked_fill(loo_counts == 0, float("inf"))
    scale = torch.cdist(z, z).pow(2).sum() / max(n * (n - 1), 1)
    return d2, scale, sums, counts


def consistency_weights(logits: Tensor, labels: Tensor, temperature: float = 0.1) -> Tensor:
    """`[N]` detached weights in [0, 1] of a classification support set: how well each example's
    label agrees with where its logits lie among the other examples'.

    For example i and class c let d²_ic be the squared distance from i's logits to the mean logits
    of the class-c examples, i left out of its own class's mean (as
    `lightning_meta.losses.selection.consistency_features`). The weight is
    exp(−(d²_i,y_i − min_c d²_ic) / (temperature · s)), s the mean squared distance between two
    examples: 1 when its own label's mean is the nearest, → 0 for an example that sits among
    another class's. An example alone in its class has no leave-one-out mean: weight 0. The
    geometry is the model's own (the labels of an N-way task are a permutation of the classes,
    so at θ0 the probability of the label says nothing; whether look-alike examples share the
    label does). If every weight is 0 (one example per class) all are 1: cross-entropy.
    """
    with torch.no_grad():
        z = logits.detach().flatten(1).to(torch.float64)
        y = labels.detach().long()
        d2, scale, _, _ = loo_class_distances(z, y, logits.shape[-1])
        own = d2.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        gap = torch.where(torch.isfinite(own), own - d2.min(-1).values, torch.full_like(own, float("inf")))
        weights = torch.exp(-gap / (temperature * scale).clamp_min(1e-12))
        weights = torch.where(weights.sum() > 0, weights, torch.ones_like(weights))
    return weights.to(logits.dtype)


def consistency_filtered_cross_entropy(logits: Tensor, labels: Tensor, temperature: float = 0.1) -> Tensor:
    """Σ_i w_i·CE_i / Σ_i w_i with w = `consistency_weights(logits, labels, temperature)` (detached:
    the weights choose which examples to fit, the gradient is cross-entropy's on those). Equal to
    cross-entropy when every example's nearest leave-one-out class mean is its own label's."""
    if temperature <= 0:
        raise ValueError(f"consistency-filtered cross-entropy temperature={temperature} must be > 0")
    weights = consistency_weights(logits, labels, temperature)
    per_example = F.cross_entropy(logits, labels, reduction="none")
    return (weights * per_example).sum() / weights.sum()


def mse(predictions: Tensor, targets: Tensor) -> Tensor:
    """Mean squared residual."""
    return F.mse_loss(predictions, targets)


def l1(predictions: Tensor, targets: Tensor) -> Tensor:
    """Mean absolute residual."""
    return F.l1_loss(predictions, targets)


def huber(predictions: Tensor, targets: Tensor, delta: float = 1.0) -> Tensor:
    """Mean Huber loss: d²/2 for |d| ≤ δ, δ(|d| − δ/2) beyond."""
    return F.huber_loss(predictions, targets, delta=delta)


def log_cosh(predictions: Tensor, targets: Tensor) -> Tensor:
    """Mean log cosh d, as |d| + softplus(−2|d|) − log 2 (no overflow for large d)."""
    d = (predictions - targets).abs()
    return (d + F.softplus(-2 * d) - math.log(2.0)).mean()


def cauchy(predictions: Tensor, targets: Tensor, scale: float = 1.0) -> Tensor:
    """Mean (c²/2)·log(1 + (d/c)²)."""
    d = (predictions - targets) / scale
    return (scale**2 / 2 * torch.log1p(d * d)).mean()


CANDIDATES: dict[str, dict[str, Callable[[Tensor, Tensor], Tensor]]] = {
    "classification": {
        "cross_entropy": cross_entropy,
        "label_smoothed_cross_entropy": label_smoothed_cross_entropy,
        "focal": focal,
        "generalised_cross_entropy": generalised_cross_entropy,
        "mse_one_hot": mse_one_hot,
    },
    "regression": {"mse": mse, "l1": l1, "huber": huber, "log_cosh": log_cosh, "cauchy": cauchy},
}
"""The candidate sets of issue 15 (point 4), by task kind; the first of each is the task's own loss."""

EXTRA_CANDIDATES: dict[str, dict[str, Callable[[Tensor, Tensor], Tensor]]] = {
    "classification": {"consistency_filtered_cross_entropy": consistency_filtered_cross_entropy},
    "regression": {},
}
"""Candidates chosen by name only, never part of a default candidate set (so the default sets,
and every number measured with them, stay as they were)."""


def mse_l1(predictions: Tensor, targets: Tensor, params: Mapping[str, Tensor], weight: float = 0.2) -> Tensor:
    """MSE + weight·Σ|w| over the tensors of `params` whose name ends in `weight`."""
    penalty = sum(p.abs().sum() for n, p in params.items() if n.endswith("weight"))
    return F.mse_loss(predictions, targets) + weight * penalty


PARAM_CANDIDATES: dict[str, dict[str, Callable[[Tensor, Tensor, Mapping[str, Tensor]], Tensor]]] = {
    "classification": {},
    "regression": {"mse_l1": mse_l1},
}
"""Candidates that also read the parameters being adapted (a penalty on the weights), by task kind."""

CandidateFn = Callable[[Tensor, Tensor, Mapping[str, Tensor]], Tensor]


def candidate_fn(kind: str, name: str) -> CandidateFn:
    """The candidate `name` of `kind` as `(predictions, targets, params) -> loss` (a loss of
    `CANDIDATES` ignores the params)."""
    if name in PARAM_CANDIDATES[kind]:
        return PARAM_CANDIDATES[kind][name]
    loss = CANDIDATES[kind][name] if name in CANDIDATES[kind] else EXTRA_CANDIDATES[kind][name]
    return lambda predictions, targets, params: loss(predictions, targets)


def known_candidates(kind: str) -> list[str]:
    """Every candidate name of `kind`: `CANDIDATES`, `EXTRA_CANDIDATES`, then `PARAM_CANDIDATES`."""
    return [*CANDIDATES[kind], *EXTRA_CANDIDATES[kind], *PARAM_CANDIDATES[kind]]
