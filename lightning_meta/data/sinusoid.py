"""The sinusoid regression task family of MAML (Finn et al. 2017, §5.1)."""

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
