"""The sinusoid regression task family of MAML (Finn et al. 2017, §5.1), and a variant whose
support targets carry heavy-tailed outliers in a seeded share of the tasks (issue 15: a family
where the choice of inner loss matters)."""

from __future__ import annotations

import numpy as np
import torch

from lightning_meta.data.base import TaskSource
from lightning_meta.task import Task


class SinusoidTasks(TaskSource):
    """Tasks y = A·sin(x − φ) with A, φ and the inputs x drawn uniformly from their ranges.

    Args:
        shots: support points per task (K).
        query_shots: query points per task.
        amplitude: range of A.
        phase: range of φ.
        x_range: range of x.
    """

    def __init__(
        self,
        shots: int,
        query_shots: int,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, np.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
    ) -> None:
        for key, (low, high) in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range)):
            if not low <= high:
                raise ValueError(f"data.{key}={[low, high]} must be [low, high] with low <= high")
        self.shots, self.query_shots = shots, query_shots
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range

    def sample(self, rng: np.random.Generator) -> Task:
        amplitude = rng.uniform(*self.amplitude)
        phase = rng.uniform(*self.phase)
        x = rng.uniform(*self.x_range, size=(self.shots + self.query_shots, 1))
        y = amplitude * np.sin(x - phase)
        x, y = torch.from_numpy(x).float(), torch.from_numpy(y).float()
        k = self.shots
        return Task(support_x=x[:k], support_y=y[:k], query_x=x[k:], query_y=y[k:])


class CorruptedSinusoidTasks(SinusoidTasks):
    """Sinusoid tasks of which a seeded share has outlier-corrupted support targets; queries stay clean.

    Each task is drawn exactly as by `SinusoidTasks` (so `corrupt_fraction=0` gives the same
    tasks); then, from the same generator, whether it is corrupted (probability
    `corrupt_fraction`), and in a corrupted task each support target, with probability
    `outlier_rate`, gets `outlier_scale` × Cauchy noise (Student's t with one degree of
    freedom: heavy-tailed, no finite variance). The query targets are never touched, so the
    query loss measures how well adaptation ignored the outliers.

    Args:
        shots: support points per task (K).
        query_shots: query points per task.
        corrupt_fraction: the share of corrupted tasks, in [0, 1].
        outlier_rate: the share of a corrupted task's support targets that get noise, in (0, 1].
        outlier_scale: the noise's scale (the sines' amplitude is at most 5).
        amplitude: range of A.
        phase: range of φ.
        x_range: range of x.
    """

    task_types = ("clean", "corrupted")
    """The names of `sample_with_type`'s flag (False, True): per-task-type logs and reports."""

    def __init__(
        self,
        shots: int,
        query_shots: int,
        corrupt_fraction: float = 0.5,
        outlier_rate: float = 0.3,
        outlier_scale: float = 5.0,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, np.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
    ) -> None:
        super().__init__(shots, query_shots, amplitude, phase, x_range)
        if not 0.0 <= corrupt_fraction <= 1.0:
            raise ValueError(f"data.corrupt_fraction={corrupt_fraction} must be in [0, 1]")
        if not 0.0 < outlier_rate <= 1.0:
            raise ValueError(f"data.outlier_rate={outlier_rate} must be in (0, 1]")
        if not outlier_scale > 0:
            raise ValueError(f"data.outlier_scale={outlier_scale} must be positive")
        self.corrupt_fraction, self.outlier_rate, self.outlier_scale = corrupt_fraction, outlier_rate, outlier_scale

    def sample_with_type(self, rng: np.random.Generator) -> tuple[Task, bool]:
        """The task and whether its support set was corrupted (for per-task-type reports)."""
        task = super().sample(rng)
        if self.corrupt_fraction == 0.0 or not rng.random() < self.corrupt_fraction:
            return task, False
        hit = rng.random(self.shots) < self.outlier_rate
        noise = self.outlier_scale * rng.standard_t(1, size=self.shots) * hit
        support_y = task.support_y + torch.from_numpy(noise).float().unsqueeze(-1)
        return Task(task.support_x, support_y, task.query_x, task.query_y), True

    def sample(self, rng: np.random.Generator) -> Task:
        return self.sample_with_type(rng)[0]
