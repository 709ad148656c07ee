"""Task specs for meta-RL: the DataModule yields tasks to roll out, not data.

A meta-RL batch is a `TaskSpecBatch`: the parameters of this rank's tasks, the noise of one
trial of each, and the noise of the agent's action sampling, all drawn from the generator of
the task's global index (`sampler.task_rng`). The algorithm collects its rollouts from these in
`training_step`. So the sampling protocol is the supervised family's, unchanged: ranks take
contiguous shares of each global meta-batch (`MetaBatchSampler`: 2 processes × 8 tasks roll out
exactly the trials of 1 × 16, including the agent's sampled actions), evaluation uses fixed
seeded tasks (drawn from `family.held_out()`: the family itself, or a benchmark's held-out
tasks such as Meta-World ML1's test goals), and a resumed run continues from the meta-batch
index alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_meta.data.base import TaskSource
from lightning_meta.data.datamodule import EpisodicDataModule, ResumableLoader
from lightning_meta.data.sampler import TRAIN, FixedTaskSampler, MetaBatchSampler, task_rng
from lightning_meta.envs.families import TaskFamily, TaskSpecBatch


def sample_spec(family: TaskFamily, rng: np.random.Generator) -> TaskSpecBatch:
    """One task, its trial noise and its action noise, in that order from `rng`."""
    tasks = family.sample_tasks(1, rng)
    noise = family.sample_noise(1, rng)
    action_noise = torch.from_numpy(rng.random((1, family.episodes, family.horizon)).astype(np.float32))
    return TaskSpecBatch(tasks, noise, action_noise, torch.zeros(1, dtype=torch.long))


def stack_specs(specs: Sequence[TaskSpecBatch]) -> TaskSpecBatch:
    """Concatenate batches along the task dimension."""
    return TaskSpecBatch(
        {key: torch.cat([s.tasks[key] for s in specs]) for key in specs[0].tasks},
        {key: torch.cat([s.noise[key] for s in specs]) for key in specs[0].noise},
        torch.cat([s.action_noise for s in specs]),
        torch.cat([s.index for s in specs]),
    )


class TaskSpecStream(Dataset):
    """Map-style dataset: a tuple of global task indices -> their `TaskSpecBatch`.

    Args:
        family: the task family.
        seed: the stream's seed.
        stream: TRAIN, VAL or TEST.
        pool: None: a fresh task for every index. N: the stream cycles through a fixed pool of
            N tasks (PEARL's protocol: a finite set of training tasks, each visited again and
            again, so per-task replay buffers fill up): index i gets the task of index i mod N
            and keeps its own trial and action noise.
    """

    def __init__(self, family: TaskFamily, seed: int, stream: int, pool: int | None = None) -> None:
        if pool is not None and pool < 1:
            raise ValueError(f"pool={pool} must be a positive number of tasks, or None for a fresh task per index")
        self.family, self.seed, self.stream, self.pool = family, seed, stream, pool

    def __getitem__(self, indices: Sequence[int]) -> TaskSpecBatch:
        specs = []
        for i in indices:
            spec = sample_spec(self.family, task_rng(self.seed, self.stream, i))
            if self.pool is not None and i >= self.pool:
                spec.tasks = sample_spec(self.family, task_rng(self.seed, self.stream, i % self.pool)).tasks
            spec.index[0] = i
            specs.append(spec)
        return stack_specs(specs)


class RLTaskDataModule(EpisodicDataModule):
    """Meta-RL tasks of one family, for every split (disjoint seeded streams).

    Args:
        family: the task family (`lightning_meta.envs`), the same as the algorithm's.
        tasks_per_batch: see `EpisodicDataModule` (here: trials rolled out per step per rank).
        batches_per_epoch: see `EpisodicDataModule`.
        val_tasks: see `EpisodicDataModule`.
        test_tasks: see `EpisodicDataModule`.
        eval_tasks_per_batch: see `EpisodicDataModule`.
        seed: see `EpisodicDataModule`.
        eval_seed: see `EpisodicDataModule`.
        num_workers: see `EpisodicDataModule`.
        train_pool: None: every training index a fresh task. N: training cycles through a fixed
            pool of N tasks (`TaskSpecStream`'s `pool`; PEARL). Validation and test always use
            their own fixed seeded tasks.
    """

    def __init__(
        self,
        family: TaskFamily,
        tasks_per_batch: int = 64,
        batches_per_epoch: int = 100,
        val_tasks: int = 200,
        test_tasks: int = 1000,
        eval_tasks_per_batch: int | None = 500,
        seed: int = 0,
        eval_seed: int = 0,
        num_workers: int = 0,
        train_pool: int | None = None,
    ) -> None:
        super().__init__(
            tasks_per_batch,
            batches_per_epoch,
            val_tasks,
            test_tasks,
            eval_tasks_per_batch,
            seed,
            eval_seed,
            num_workers,
        )
        self.family = family
        if train_pool is not None and train_pool < 1:
            raise ValueError(f"train_pool={train_pool} must be a positive number of tasks, or None")
        self.train_pool = train_pool

    def build_sources(self) -> dict[str, TaskSource]:
        return {}  # tasks come from `family` (`_loader`), not from a supervised task source

    def _loader(self, split: str, stream: int, sampler: MetaBatchSampler | FixedTaskSampler) -> DataLoader:
        # EpisodicDataModule._loader, over task specs instead of `TaskStream`.
        trainer = self.trainer
        loader_class, extra = DataLoader, {}
        if isinstance(sampler, MetaBatchSampler):
            loader_class, extra = ResumableLoader, {"trainer": trainer}
        return loader_class(
            TaskSpecStream(
                self.family if stream == TRAIN else self.family.held_out(),
                self.eval_seed if stream != TRAIN else self.seed,
                stream,
                self.train_pool if stream == TRAIN else None,
            ),
            batch_size=None,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            **extra,
        )
