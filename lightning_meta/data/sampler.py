"""Deterministic episodic sampling: task i of a stream is a pure function of (seed, stream, i).

Every task draws from its own generator, seeded by `(seed, stream, global task index)`, never
from a global RNG: `seed_everything` gives every DDP rank the same global stream, and a
worker's RNG depends on the worker count. So the tasks do not depend on the number of
processes or data-loader workers, and a run can be resumed from a batch index alone.

Under DDP, global meta-batch b holds tasks `b·T·W .. (b+1)·T·W - 1` (T tasks per rank, W
ranks) and rank r takes the contiguous share starting at `b·T·W + r·T`; so 2 processes × 16
tasks train on exactly the tasks of 1 process × 32, and DDP's gradient average over ranks
equals the single-process average over the union. Evaluation uses a fixed list of tasks
`0 .. N-1`, dealt to ranks round-robin.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from lightning_meta.data.base import TaskSource
from lightning_meta.task import Task, TaskBatch

TRAIN, VAL, TEST = 0, 1, 2
"""Stream ids: the three splits draw from disjoint random streams even with equal seeds."""


def task_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """The generator of task `index` of `stream`; numpy's SeedSequence mixes the three keys."""
    return np.random.default_rng([seed, stream, index])


class TaskStream(Dataset):
    """Map-style dataset whose key is a tuple of global task indices and whose item is their batch.

    Args:
        source: draws one task from a generator.
        seed: the stream's seed.
        stream: TRAIN, VAL or TEST.
    """

    def __init__(self, source: TaskSource, seed: int, stream: int) -> None:
        self.source, self.seed, self.stream = source, seed, stream

    def task(self, index: int) -> Task:
        return self.source.sample(task_rng(self.seed, self.stream, index))

    def __getitem__(self, indices: Sequence[int]) -> TaskBatch:
        typed = getattr(self.source, "sample_with_type", None)
        if typed is None or getattr(self.source, "task_types", None) is None:
            return TaskBatch.stack([self.task(i) for i in indices])
        # A family with task types (clean / corrupted) says each task's, for per-type reports;
        # `sample` is `sample_with_type(...)[0]`, so the tasks are the same either way.
        drawn = [typed(task_rng(self.seed, self.stream, i)) for i in indices]
        task_type = torch.tensor([int(kind) for _, kind in drawn], dtype=torch.long)
        return TaskBatch.stack([task for task, _ in drawn]).with_types(task_type, self.source.task_types)


# Subclassing DistributedSampler is how this sampler tells Lightning that it already shards
# across ranks: Lightning wraps any other sampler in a DistributedSampler of its own under DDP
# (use_distributed_sampler=True, its default), which would deal out whole meta-batches instead
# of each rank's share of every one. DistributedSampler.__init__ is skipped: it needs a sized
# dataset and does nothing this class uses.
class MetaBatchSampler(DistributedSampler):
    """Yields, per training step, the global task indices of this rank's share of the meta-batch.

    Args:
        tasks_per_batch: tasks per rank per step (T).
        batches_per_epoch: steps per epoch.
        num_replicas: number of ranks (W).
        rank: this rank.
    """

    def __init__(self, tasks_per_batch: int, batches_per_epoch: int, num_replicas: int = 1, rank: int = 0) -> None:
        Sampler.__init__(self)
        self.tasks_per_batch, self.batches_per_epoch = tasks_per_batch, batches_per_epoch
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0
        self.shuffle, self.drop_last = False, False  # what DistributedSampler's readers look at
        self.resume_at: int | None = None
        """Global meta-batch index to start at on the next iteration (once), set on resume."""

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        per_step = self.tasks_per_batch * self.num_replicas
        start = 0
        if self.resume_at is not None:
            # The epoch too: with worker processes the first indices are drawn before Lightning
            # calls set_epoch on a resumed run.
            self.epoch, start = divmod(self.resume_at, self.batches_per_epoch)
            self.resume_at = None
        for b in range(start, self.batches_per_epoch):
            first = (self.epoch * self.batches_per_epoch + b) * per_step + self.rank * self.tasks_per_batch
            yield tuple(range(first, first + self.tasks_per_batch))


class FixedTaskSampler(DistributedSampler):
    """Yields the fixed evaluation tasks `0 .. num_tasks-1`: rank r takes r, r+W, ..., in batches.

    The same tasks every epoch and every run; with W ranks the union of their shares is the
    whole list, each task once.
    """

    def __init__(self, num_tasks: int, tasks_per_batch: int, num_replicas: int = 1, rank: int = 0) -> None:
        Sampler.__init__(self)
        self.indices = list(range(rank, num_tasks, num_replicas))
        self.tasks_per_batch, self.num_replicas, self.rank, self.epoch = tasks_per_batch, num_replicas, rank, 0
        self.shuffle, self.drop_last = False, False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch  # evaluation tasks do not change with the epoch

    def __len__(self) -> int:
        return -(-len(self.indices) // self.tasks_per_batch)

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        for start in range(0, len(self.indices), self.tasks_per_batch):
            yield tuple(self.indices[start : start + self.tasks_per_batch])
