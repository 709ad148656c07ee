"""Inner-loop losses (torch only): the candidate losses a selector chooses among per task.

`CANDIDATES["classification"]` and `CANDIDATES["regression"]` map a name to a loss
`(predictions, targets) -> scalar` (the mean over examples). `inner.py` makes the inner loss a
component of the gradient-based learners (`inner_loss`): the task's own (`TaskLoss`, the
default, unchanged numbers), a fixed candidate (`CandidateLoss`) or a learned one (`ML3Loss`);
`metal.py` holds MeTAL's task-adaptive loss (`MeTALLoss`).
"""

from lightning_meta.losses.candidates import (
    CANDIDATES,
    cauchy,
    consistency_filtered_cross_entropy,
    consistency_weights,
    cross_entropy,
    focal,
    generalised_cross_entropy,
    huber,
    l1,
    label_smoothed_cross_entropy,
    log_cosh,
    mse,
    mse_one_hot,
)
from lightning_meta.losses.inner import CandidateLoss, InnerLoss, ML3Loss, TaskLoss
from lightning_meta.losses.metal import MeTALLoss
from lightning_meta.losses.selection import BanditLoss, MixtureLoss, PolicyLoss

__all__ = [
    "CANDIDATES",
    "BanditLoss",
    "CandidateLoss",
    "InnerLoss",
    "ML3Loss",
    "MeTALLoss",
    "MixtureLoss",
    "PolicyLoss",
    "TaskLoss",
    "cauchy",
    "consistency_filtered_cross_entropy",
    "consistency_weights",
    "cross_entropy",
    "focal",
    "generalised_cross_entropy",
    "huber",
    "l1",
    "label_smoothed_cross_entropy",
    "log_cosh",
    "mse",
    "mse_one_hot",
]
