"""Task families where the choice of inner loss matters (issue 15, point 5), besides the corrupted
sinusoids of `sinusoid.py`: classification tasks with flipped support labels in a seeded share of
the tasks, and the linear-regression tasks of AutoLoss (Xu et al., ICLR 2019) where an L1 term
may or may not help.

Each family draws everything from the task's generator, after the clean task is drawn, so a task
is still a pure function of its global index (DDP shares, exact resume) and a family with no
corruption gives exactly the clean family's tasks.
"""

from __future__ import annotations

import numpy as np
import torch

from lightning_meta.data.base import TaskSource
from lightning_meta.task import Task

__all__ = ["LabelNoiseTasks", "LinearRegressionTasks"]


class LabelNoiseTasks(TaskSource):
    """Classification tasks of which a seeded share has flipped support labels; queries stay clean.

    Each task is drawn by `source` (e.g. Omniglot's `FewShotTasks`); then, from the same
    generator, whether it is corrupted (probability `corrupt_fraction`), and in a corrupted task
    each support label, with probability `flip_rate`, is replaced by another class drawn
    uniformly from the task's other classes. At 5-shot a flipped example is outvoted within its
    class; at 1-shot it would erase a class, so use at least 2 shots.

    Args:
        source: a classification task source.
        corrupt_fraction: the share of corrupted tasks, in [0, 1].
        flip_rate: the share of a corrupted task's support labels that are flipped, in (0, 1].
    """

    task_types = ("clean", "corrupted")
    """The names of `sample_with_type`'s flag (False, True): per-task-type logs and reports."""

    def __init__(self, source: TaskSource, corrupt_fraction: float = 0.5, flip_rate: float = 0.2) -> None:
        self.check(corrupt_fraction, flip_rate)
        self.source, self.corrupt_fraction, self.flip_rate = source, corrupt_fraction, flip_rate

    @staticmethod
    def check(corrupt_fraction: float, flip_rate: float) -> None:
        """Refuse shares outside their ranges, naming the DataModule's keys."""
        if not 0.0 <= corrupt_fraction <= 1.0:
            raise ValueError(f"data.label_noise={corrupt_fraction} must be in [0, 1] (the share of corrupted tasks)")
        if not 0.0 < flip_rate <= 1.0:
            raise ValueError(f"data.flip_rate={flip_rate} must be in (0, 1] (the share of flipped support labels)")

    def sample_with_type(self, rng: np.random.Generator) -> tuple[Task, bool]:
        """The task and whether its support labels were flipped (for per-task-type reports)."""
        task = self.source.sample(rng)
        if task.support_y.is_floating_point():
            raise ValueError("LabelNoiseTasks flips class labels: its source must give classification tasks")
        if self.corrupt_fraction == 0.0 or not rng.random() < self.corrupt_fraction:
            return task, False
        labels = task.support_y.numpy().copy()
        ways = int(max(labels.max(), task.query_y.max())) + 1
        hit = rng.random(len(labels)) < self.flip_rate
        # Another class, uniformly: add 1..ways-1 modulo ways.
        offset = rng.integers(1, ways, size=len(labels))
        flipped = np.where(hit, (labels + offset) % ways, labels)
        support_y = torch.from_numpy(flipped).to(task.support_y.dtype)
        return Task(task.support_x, support_y, task.query_x, task.query_y), True

    def sample(self, rng: np.random.Generator) -> Task:
        return self.sample_with_type(rng)[0]


class LinearRegressionTasks(TaskSource):
    """AutoLoss's regression family as the issue states it: y = w·x + ε, x ~ N(0, I_dim), ε ~ N(0, noise_var).

    Per task a new weight vector w ~ N(0, I) of which only `active` coordinates are non-zero
    (the others exactly 0: the setting where an L1 term on the weights can help; `active=dim`
    makes every coordinate active). The support set is the task's training sample (`shots`
    points, AutoLoss's 200), the query set fresh points from the same task with the same noise.

    With `sparse_fraction` > 0 the family has two task types (ours, not AutoLoss's): a seeded share
    of the tasks is "sparse" (`sparse_active` non-zero weights), the others "dense" (`active`), so
    a per-task loss selector has something to tell apart. At 0 (the default) no type is drawn and
    every task is the first type, with exactly the tasks of before.

    Args:
        dim: input dimension (16).
        shots: support points per task (200).
        query_shots: query points per task.
        noise_var: variance of the target noise (2).
        active: non-zero weights per task (default: dim, dense).
        sparse_fraction: the share of "sparse" tasks, in [0, 1].
        sparse_active: non-zero weights of a sparse task.
    """

    def __init__(
        self,
        dim: int = 16,
        shots: int = 200,
        query_shots: int = 200,
        noise_var: float = 2.0,
        active: int | None = None,
        sparse_fraction: float = 0.0,
        sparse_active: int = 2,
    ) -> None:
        for key, value in (("dim", dim), ("shots", shots), ("query_shots", query_shots)):
            if value < 1:
                raise ValueError(f"data.{key}={value} must be a positive integer")
        if noise_var < 0:
            raise ValueError(f"data.noise_var={noise_var} must be >= 0")
        active = dim if active is None else active
        for key, value in (("active", active), ("sparse_active", sparse_active)):
            if not 1 <= value <= dim:
                raise ValueError(f"data.{key}={value} must be in 1..dim={dim}")
        if not 0.0 <= sparse_fraction <= 1.0:
            raise ValueError(f"data.sparse_fraction={sparse_fraction} must be in [0, 1] (the share of sparse tasks)")
        self.dim, self.shots, self.query_shots, self.noise_var, self.active = dim, shots, query_shots, noise_var, active
        self.sparse_fraction, self.sparse_active = sparse_fraction, sparse_active

    @property
    def task_types(self) -> tuple[str, ...] | None:
        """The names of `sample_with_type`'s flag (False, True), or None with a single type
        (`sparse_fraction=0`: batches are then not tagged)."""
        return ("dense", "sparse") if self.sparse_fraction else None

    def sample_with_weights(self, rng: np.random.Generator) -> tuple[Task, np.ndarray]:
        """The task and its true weight vector."""
        task, w, _ = self._draw(rng)
        return task, w

    def sample_with_type(self, rng: np.random.Generator) -> tuple[Task, bool]:
        """The task and whether it is a sparse one (always False at `sparse_fraction=0`)."""
        task, _, sparse = self._draw(rng)
        return task, sparse

    def _draw(self, rng: np.random.Generator) -> tuple[Task, np.ndarray, bool]:
        # The type is drawn only when there are two, so sparse_fraction=0 keeps the old stream.
        sparse = bool(self.sparse_fraction) and bool(rng.random() < self.sparse_fraction)
        active = self.sparse_active if sparse else self.active
        w = np.zeros(self.dim)
        keep = rng.choice(self.dim, size=active, replace=False)
        w[keep] = rng.standard_normal(active)
        n = self.shots + self.query_shots
        x = rng.standard_normal((n, self.dim))
        y = x @ w + np.sqrt(self.noise_var) * rng.standard_normal(n)
        x_t, y_t = torch.from_numpy(x).float(), torch.from_numpy(y).float().unsqueeze(-1)
        k = self.shots
        return Task(support_x=x_t[:k], support_y=y_t[:k], query_x=x_t[k:], query_y=y_t[k:]), w, sparse

    def sample(self, rng: np.random.Generator) -> Task:
        return self._draw(rng)[0]
