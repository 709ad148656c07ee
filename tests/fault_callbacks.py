"""Faults the resume and non-finite tests inject into a `lightning-meta fit` subprocess (the repo
on its path)."""

from __future__ import annotations

import os
import signal

import pytorch_lightning as pl


class SigkillAt(pl.Callback):
    """SIGKILL this process when the training batch after global step `step` starts: no
    handler, no cleanup, no flush, as when a node is preempted.

    Args:
        step: the global step (optimizer steps done) at which to die.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: object, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class NanOnRank(pl.Callback):
    """Make one rank's meta-loss NaN at one global step (a NaN in every support input there).

    Args:
        step: the global step.
        rank: the rank whose batch is poisoned.
    """

    def __init__(self, step: int, rank: int) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: object, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            batch.support_x.fill_(float("nan"))
