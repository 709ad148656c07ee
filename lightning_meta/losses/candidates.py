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
    loss = CANDIDATES[kind][name]
    return lambda predictions, targets, params: loss(predictions, targets)


def known_candidates(kind: str) -> list[str]:
    """Every candidate name of `kind`: `CANDIDATES` then `PARAM_CANDIDATES`."""
    return [*CANDIDATES[kind], *PARAM_CANDIDATES[kind]]
