"""`MetaLearner`: the LightningModule every meta-algorithm derives from.

It owns what all algorithms share: the loop over the tasks of a batch, logging (with
`batch_size` = number of tasks), the outer optimizer and scheduler (injected, so YAML chooses
them), and the evaluation protocol: every fixed validation/test task scored once, reported
as the mean over tasks ± the 95% confidence interval (1.96 standard errors), gathered across
DDP ranks. A subclass implements one method, `task_loss`: adapt on the support set, return
the query loss and predictions.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import NamedTuple

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_meta.task import Task, TaskBatch


class TaskOutput(NamedTuple):
    """What an algorithm returns for one task.

    Attributes:
        loss: the query loss after adaptation (a scalar, differentiable w.r.t. the
            meta-parameters during training).
        predictions: query logits (classification) or outputs (regression).
        loss_before: the query loss before adaptation, where the algorithm has one; reported
            at evaluation to show what adaptation gained.
    """

    loss: Tensor
    predictions: Tensor
    loss_before: Tensor | None = None


def supervised_loss(predictions: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy for integer class labels, mean squared error for float targets."""
    if torch.is_floating_point(targets):
        return F.mse_loss(predictions, targets)
    return F.cross_entropy(predictions, targets)


def mean_and_ci95(values: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and half-width of its 95% normal confidence interval (1.96 × standard error)."""
    n = values.numel()
    if n < 2:
        return values.mean(), torch.zeros((), dtype=values.dtype, device=values.device)
    return values.mean(), 1.96 * values.std(unbiased=True) / math.sqrt(n)


class MetaLearner(pl.LightningModule):
    """Shared train/validation/test steps of a meta-learner over `TaskBatch`es.

    Args:
        backbone: the network (a plain `nn.Module`), chosen in YAML.
        optimizer: builds the outer (meta) optimizer from the parameters; default Adam(1e-3).
        lr_scheduler: builds an optional learning-rate scheduler; it steps every training
            step (every meta-batch), as meta-learning schedules count meta-iterations.
    """

    adapts_with_gradients: bool = True
    """Whether evaluation takes gradients (so needs `Trainer(inference_mode=False)`)."""

    uses_output_head: bool = False
    """Whether the backbone's output size must equal the number of ways (the CLI links them)."""

    def __init__(
        self,
        backbone: nn.Module,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler"])
        self.backbone = backbone
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self._eval_outputs: list[dict[str, Tensor]] = []

    @abstractmethod
    def task_loss(self, task: Task) -> TaskOutput:
        """Adapt to `task`'s support set and score its query set (`self.training` tells the phase)."""

    def forward(self, batch: TaskBatch) -> list[TaskOutput]:
        return [self.task_loss(task) for task in batch]

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """The meta-loss (mean query loss over tasks) and per-task statistics (`[tasks]` each)."""
        outputs = self(batch)
        losses = torch.stack([o.loss for o in outputs])
        stats = {"loss": losses.detach()}
        if batch.is_classification:
            stats["acc"] = torch.stack(
                [(o.predictions.argmax(-1) == t.query_y).float().mean() for o, t in zip(outputs, batch, strict=True)]
            )
        if outputs[0].loss_before is not None:
            stats["loss_before"] = torch.stack([o.loss_before.detach() for o in outputs])
        return losses.mean(), stats

    def training_step(self, batch: TaskBatch, batch_idx: int) -> Tensor:
        loss, stats = self.meta_loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{type(self).__name__}: meta-loss is {loss.item()} at global step {self.global_step} "
                f"(batch {batch_idx}); the usual cause is an inner or outer learning rate too high: "
                "lower model.init_args.inner_lr or the optimizer's lr"
            )
        for key, value in stats.items():
            self.log(f"train/{key}", value.mean(), prog_bar=key in ("loss", "acc"), batch_size=len(batch))
        return loss

    def _eval_step(self, batch: TaskBatch, stage: str) -> None:
        if self.adapts_with_gradients and torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"{type(self).__name__} adapts with gradients during {stage}, which inference mode "
                "forbids: use Trainer(inference_mode=False) (`--trainer.inference_mode=false`; the "
                "lightning-meta CLI sets it by default)"
            )
        _, stats = self.meta_loss(batch)
        self._eval_outputs.append(stats)

    def validation_step(self, batch: TaskBatch, batch_idx: int) -> None:
        self._eval_step(batch, "validation")

    def test_step(self, batch: TaskBatch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _gather(self, values: Tensor) -> Tensor:
        """All ranks' per-task values, concatenated (ranks may hold different counts)."""
        if self.trainer.world_size == 1:
            return values
        counts = self.all_gather(torch.tensor([values.numel()], device=values.device)).flatten()
        padded = torch.full((int(counts.max()),), float("nan"), dtype=values.dtype, device=values.device)
        padded[: values.numel()] = values
        gathered = self.all_gather(padded)
        return torch.cat([gathered[r, : int(n)] for r, n in enumerate(counts)])

    def _eval_epoch_end(self, stage: str) -> None:
        outputs, self._eval_outputs = self._eval_outputs, []
        if not outputs:
            return
        for key in outputs[0]:
            values = self._gather(torch.cat([o[key] for o in outputs]))
            mean, ci95 = mean_and_ci95(values)
            # Values are already gathered from every rank, so every rank logs the same number.
            self.log(f"{stage}/{key}", mean, prog_bar=key in ("loss", "acc"))
            self.log(f"{stage}/{key}_ci95", ci95)
        self.log(f"{stage}/tasks", float(values.numel()))

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def configure_optimizers(self):  # noqa: ANN201 - Lightning's union of return types
        optimizer = self.optimizer(self.parameters())
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
