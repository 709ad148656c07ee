"""Inner-loop losses (torch only): the candidate losses a selector chooses among per task.

`CANDIDATES["classification"]` and `CANDIDATES["regression"]` map a name to a loss
`(predictions, targets) -> scalar` (the mean over examples). The default inner loss of every
algorithm is the task's own (`cross_entropy` / `mse`), unchanged.
"""

from lightning_meta.losses.candidates import (
    CANDIDATES,
    cauchy,
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

__all__ = [
    "CANDIDATES",
    "cauchy",
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
