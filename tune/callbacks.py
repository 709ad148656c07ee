"""Lightning callbacks that connect a trial's `Trainer` to Ray, added to a trial by class path.

A trial is a plain `lightning-meta fit` run; the sweep appends these callbacks with
`--trainer.callbacks+=...`, so nothing in `lightning_meta` knows about Ray.

- `TuneReportCallback`: single-process trials. After every validation it reports all logged
  metrics (plus `step`, `epoch`) to Tune with a Lightning checkpoint, which is what lets ASHA
  stop a trial and PBT pause, clone and resume one. Ray's `TuneReportCheckpointCallback` does the
  reporting; this adds the step so each report can be matched to a replay's metrics.
- Both end a trial whose sweep metric is NaN or infinite, after reporting it, as training does
  on a non-finite loss: schedulers cannot rank NaN (ASHA never stops such a trial), so a
  diverged trial would otherwise run its whole budget.
- `TrainReportCallback`: multi-process trials under Ray Train (`TorchTrainer`). Ray's own
  `RayTrainReportCallback` reports at the end of each training epoch; meta-learning validates
  every `val_check_interval` meta-steps inside one long epoch, so this reports after every
  validation instead, from every rank (Ray Train's report is a barrier), checkpoint from rank 0.
- `ApplyConfiguredOptimizer`: under PBT a trial resumes from another trial's checkpoint with
  mutated hyperparameters; Lightning restores the optimizer's state, learning rate included,
  which would silently undo a mutated outer learning rate. This re-applies the configured
  optimizer hyperparameters (not its moments) after the restore.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from typing import Any

import pytorch_lightning as pl
import ray.train
from pytorch_lightning.callbacks import Callback
from ray.tune.integration.pytorch_lightning import TuneReportCheckpointCallback

CHECKPOINT_NAME = "checkpoint.ckpt"
"""File name of the Lightning checkpoint inside every Ray checkpoint directory of a trial."""


def _metrics(trainer: pl.Trainer) -> dict[str, float]:
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    metrics["step"] = trainer.global_step
    metrics["epoch"] = trainer.current_epoch
    return metrics


def _stop_if_diverged(metrics: dict[str, float], metric: str | None) -> None:
    value = metrics.get(metric) if metric else None
    if value is not None and not math.isfinite(value):
        raise FloatingPointError(
            f"{metric} is {value} at step {metrics['step']}: the trial diverged (the usual cause is an inner "
            "or outer learning rate too high); ending it rather than spending its budget"
        )


class TuneReportCallback(TuneReportCheckpointCallback):
    """Report every validation's metrics and a checkpoint to Ray Tune (single-process trials).

    Args:
        metric: the sweep's metric; a non-finite value ends the trial (after it is reported).
        save_checkpoints: also report a Lightning checkpoint (needed for PBT and `--resume`).
    """

    def __init__(self, metric: str | None = None, save_checkpoints: bool = True) -> None:
        super().__init__(metrics=None, filename=CHECKPOINT_NAME, save_checkpoints=save_checkpoints, on="validation_end")
        self.metric = metric

    def _get_report_dict(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float] | None:
        if trainer.sanity_checking:
            return None
        return _metrics(trainer)

    def _handle(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super()._handle(trainer, pl_module)
        if not trainer.sanity_checking:
            _stop_if_diverged(_metrics(trainer), self.metric)


class TrainReportCallback(Callback):
    """Report every validation's metrics and a checkpoint to Ray Train (multi-process trials).

    Every rank must call `ray.train.report` the same number of times; only rank 0 writes the
    checkpoint (Lightning's `save_checkpoint` is collective and writes on rank 0).

    Args:
        metric: the sweep's metric; a non-finite value ends the trial (after it is reported).
    """

    def __init__(self, metric: str | None = None) -> None:
        super().__init__()
        self.metric = metric

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = _metrics(trainer)
        directory = tempfile.mkdtemp(prefix="lightning-meta-ckpt-")
        try:
            trainer.save_checkpoint(os.path.join(directory, CHECKPOINT_NAME))
            checkpoint = ray.train.Checkpoint.from_directory(directory) if trainer.global_rank == 0 else None
            ray.train.report(metrics, checkpoint=checkpoint)
            trainer.strategy.barrier("lightning-meta-train-report")
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        _stop_if_diverged(metrics, self.metric)


class ApplyConfiguredOptimizer(Callback):
    """After a checkpoint restore, set the optimizers' hyperparameters back to the configured ones.

    Only the hyperparameters in each param group (lr, betas, weight decay, ...) are replaced; the
    optimizer state (Adam moments, step counts) from the checkpoint is kept.
    """

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        configured = pl_module.configure_optimizers()
        fresh = _optimizers(configured)
        if len(fresh) != len(trainer.optimizers):
            return
        for live, new in zip(trainer.optimizers, fresh, strict=True):
            for live_group, new_group in zip(live.param_groups, new.param_groups, strict=False):
                live_group.update({key: value for key, value in new_group.items() if key != "params"})


def _optimizers(configured: Any) -> list[Any]:
    """The optimizers in any of the return forms of `configure_optimizers`."""
    if isinstance(configured, dict):
        return [configured["optimizer"]]
    if isinstance(configured, tuple) and len(configured) == 2 and isinstance(configured[0], list):
        return list(configured[0])  # ([optimizers], [schedulers])
    if isinstance(configured, (list, tuple)):
        return [item["optimizer"] if isinstance(item, dict) else item for item in configured]
    return [configured]
