"""The shared base of the meta-RL algorithms: evaluation on fixed seeded tasks against baselines.

`MetaRLLearner` is a sibling of `MetaLearner`, not a subclass: `MetaLearner`'s step is "adapt
on a `TaskBatch`'s support set, score its query set" (one abstract `task_loss`, vmap/loop task
batching, the BatchNorm evaluation protocols, gradient-based evaluation under
`inference_mode=False`), and none of it applies to an agent that collects its own data by
acting: a meta-RL batch is a `TaskSpecBatch` of tasks to roll out, the loss needs the
rollouts first, and RL² "adapts" in its recurrent state, with no gradient at evaluation. What
the two share is kept the same by sharing functions and the data layer: the task stream seeded
by global task index with DDP shares (`RLTaskDataModule`), the injected optimizer and
scheduler, and the evaluation report (mean ± 95% CI over fixed tasks, gathered over ranks).

Validation and test roll out one trial of every fixed task (`episode_returns`: one return per
episode, in order) and log, ± 95% CI: `{stage}/return_before` (the first episode's return,
before any adaptation), `{stage}/return` (what the algorithm is scored by: the whole trial's
return for RL², whose trial is the adaptation; the last episode's, after adaptation, for an
algorithm that sets `reports_last_episode`, e.g. MAML-RL's post-update episode),
`{stage}/return_first` and `{stage}/return_last` (the first and last episode's return), and the
family's baselines (`lightning_meta.envs.baselines`) on the same tasks and noise as
`{stage}/baseline/<name>`, on `{stage}/return`'s scale: trial returns, or, for an algorithm that
sets `reports_last_episode`, the trial return divided by the episodes per trial (the mean episode
return), so that PEARL's per-episode `return` is not set beside 3-episode totals. An algorithm
that adapts by gradient steps at evaluation (`adapts_with_gradients`) runs `episode_returns` with
gradients enabled and needs `Trainer(inference_mode=False)`.
"""

from __future__ import annotations

import contextlib
from abc import abstractmethod

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lightning_meta.algorithms.base import gather_per_task, mean_and_ci95, refuse_inference_mode
from lightning_meta.envs.baselines import baselines
from lightning_meta.envs.families import TaskFamily, TaskSpecBatch


class MetaRLLearner(pl.LightningModule):
    """Shared evaluation, optimizer and checks of the meta-RL algorithms; see the module docstring.

    Args:
        family: the task family the agent is built for (its observation and action sizes);
            must equal the DataModule's.
        optimizer: builds the optimizer from the parameters; default Adam(1e-3).
        lr_scheduler: builds an optional learning-rate scheduler, stepped once per training step.
    """

    adapts_with_gradients: bool = False
    """Whether evaluation takes gradients (an inner step): `episode_returns` then runs with
    autograd on, and inference mode is refused with a clear error."""

    reports_last_episode: bool = False
    """Whether `{stage}/return` is the last episode's return (after adaptation) instead of the trial's."""

    uses_output_head: bool = False

    def __init__(
        self,
        family: TaskFamily,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.family = family
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self._eval_outputs: list[dict[str, Tensor]] = []
        self._baseline_cache: dict[tuple, dict[str, Tensor]] = {}  # see `_baselines`
        self.eval_per_task: dict[str, Tensor] = {}  # the last validation's or test's `eval_stats`, all tasks

    @abstractmethod
    def episode_returns(self, batch: TaskSpecBatch) -> Tensor:
        """Roll out one trial of every task of `batch`: the return of each episode, `[tasks, episodes]`."""

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        family = getattr(datamodule, "family", None)
        if family is not None and family != self.family:
            raise ValueError(
                f"the model is built for {self.family!r} but the data holds {family!r}: give "
                "model.init_args.family and data.init_args.family the same family"
            )

    def _eval_step(self, batch: TaskSpecBatch, stage: str = "evaluation") -> None:
        refuse_inference_mode(self, stage)
        self._eval_outputs.append(self.eval_stats(batch))

    def eval_stats(self, batch: TaskSpecBatch) -> dict[str, Tensor]:
        """Each task's evaluation statistics on `batch`, `{name: [tasks]}`: what validation and
        test average into `{stage}/<name>` ± 95% CI (`return`, `return_before`, `return_first`,
        `return_last`, `baseline/<name>` on the same tasks and noise and on `return`'s scale). Per
        task, so that two methods scored on the same seeded tasks can be compared by paired differences."""
        with contextlib.nullcontext() if self.adapts_with_gradients else torch.no_grad():
            episodes = self.episode_returns(batch).detach().float()
        with torch.no_grad():
            stats = {
                "return": episodes[:, -1] if self.reports_last_episode else episodes.sum(1),
                "return_before": episodes[:, 0],
                "return_first": episodes[:, 0],
                "return_last": episodes[:, -1],
            }
            # On `return`'s scale: a per-episode `return` beside per-episode baselines.
            per = self.family.episodes if self.reports_last_episode else 1
            for name, values in self._baselines(batch).items():
                stats[f"baseline/{name}"] = values.to(episodes.device) / per
        return stats

    def _baselines(self, batch: TaskSpecBatch) -> dict[str, Tensor]:
        """The family's baselines on the batch's tasks and noise. Evaluation tasks are fixed, so
        each batch's baselines are computed once and kept (keyed by the tasks' and noise's
        exact contents): a MuJoCo family's baselines take seconds per validation otherwise."""
        tensors = sorted({**batch.tasks, **{f"noise/{k}": v for k, v in batch.noise.items()}}.items())
        key = tuple((name, tuple(v.shape), v.cpu().numpy().tobytes()) for name, v in tensors)
        if key not in self._baseline_cache:
            tasks = {name: value.cpu() for name, value in batch.tasks.items()}
            noise = {name: value.cpu() for name, value in batch.noise.items()}
            self._baseline_cache[key] = {name: run(tasks, noise) for name, run in baselines(self.family).items()}
        return self._baseline_cache[key]

    def validation_step(self, batch: TaskSpecBatch, batch_idx: int) -> None:
        self._eval_step(batch, "validation")

    def test_step(self, batch: TaskSpecBatch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def gather(self, values: Tensor) -> Tensor:
        """All ranks' values concatenated along the first dimension (equal counts per rank)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return values
        return self.all_gather(values).flatten(0, 1)

    def _eval_epoch_end(self, stage: str) -> None:
        outputs, self._eval_outputs = self._eval_outputs, []
        if not outputs:
            return
        # Kept per task (every rank's, in task order) for paired comparisons of methods scored on
        # the same seeded tasks, e.g. by benchmarks after `trainer.test`, without rolling out again.
        self.eval_per_task = {key: gather_per_task(self, torch.cat([o[key] for o in outputs])) for key in outputs[0]}
        for key, values in self.eval_per_task.items():
            mean, ci95 = mean_and_ci95(values)
            self.log(f"{stage}/{key}", mean, prog_bar=key == "return")
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
