"""Sources of tasks: class-indexed datasets turned into N-way K-shot tasks, and task families.

A `TaskSource` turns a random generator into one `Task`. Seeding lives one layer up (in
`sampler.py`), so every source is deterministic given the generator it is handed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
from torch import Tensor

from lightning_meta.data.augment import Augmentation
from lightning_meta.task import Task


class TaskSource(ABC):
    """Draws one task from a numpy random generator; same generator state, same task."""

    @abstractmethod
    def sample(self, rng: np.random.Generator) -> Task:
        """Return one task drawn with `rng` (and no other source of randomness)."""


class ClassDataset(ABC):
    """A class-indexed collection: class `c` holds examples `0 .. num_examples[c] - 1`."""

    @property
    @abstractmethod
    def num_examples(self) -> np.ndarray:
        """Examples per class, shape `[num_classes]`."""

    def __len__(self) -> int:
        return len(self.num_examples)

    @abstractmethod
    def examples(self, class_ids: Tensor, example_ids: Tensor) -> Tensor:
        """Examples `example_ids[i, j]` of class `class_ids[i]`: float `[C, E, *example_shape]`."""


class FewShotTasks(TaskSource):
    """N-way K-shot classification tasks drawn from a `ClassDataset`.

    Each task picks `ways` distinct classes and, within each class, `shots + query_shots`
    distinct examples; the classes' order is random, so labels 0..ways-1 carry no meaning
    across tasks.

    Args:
        dataset: the classes to draw from (one split: train, validation or test).
        ways: classes per task (N).
        shots: support examples per class (K).
        query_shots: query examples per class.
        name: what to call the split in error messages, e.g. "omniglot train split".
        augment: per-image augmentation drawn from the task's generator after its examples are
            chosen (`lightning_meta.data.augment.Augmentation`), or None.
    """

    def __init__(
        self,
        dataset: ClassDataset,
        ways: int,
        shots: int,
        query_shots: int,
        name: str = "dataset",
        augment: Augmentation | None = None,
    ) -> None:
        for key, value in (("ways", ways), ("shots", shots), ("query_shots", query_shots)):
            if value < 1:
                raise ValueError(f"{key}={value} must be at least 1")
        if ways > len(dataset):
            raise ValueError(
                f"ways={ways} is larger than the {len(dataset)} classes of the {name}: "
                f"lower `data.ways` to at most {len(dataset)}"
            )
        fewest = int(np.min(dataset.num_examples))
        if shots + query_shots > fewest:
            raise ValueError(
                f"shots + query_shots = {shots} + {query_shots} = {shots + query_shots} is more than the "
                f"{fewest} examples of the smallest class of the {name}: lower `data.shots` or "
                f"`data.query_shots`"
            )
        self.dataset, self.ways, self.shots, self.query_shots = dataset, ways, shots, query_shots
        self.augment = augment

    def sample(self, rng: np.random.Generator) -> Task:
        per_class = self.shots + self.query_shots
        class_ids = rng.choice(len(self.dataset), size=self.ways, replace=False)
        counts = self.dataset.num_examples[class_ids]
        example_ids = np.stack([rng.choice(int(n), size=per_class, replace=False) for n in counts])
        x = self.dataset.examples(torch.from_numpy(class_ids), torch.from_numpy(example_ids))
        y = torch.arange(self.ways).unsqueeze(1).expand(self.ways, per_class)
        shots = self.shots
        support_x, query_x = x[:, :shots].reshape(-1, *x.shape[2:]), x[:, shots:].reshape(-1, *x.shape[2:])
        if self.augment is not None:
            # Drawn last, from the same generator: the classes and examples do not change.
            support_x, query_x = self.augment.task_images(support_x, query_x, rng)
        return Task(
            support_x=support_x,
            support_y=y[:, :shots].reshape(-1),
            query_x=query_x,
            query_y=y[:, shots:].reshape(-1),
        )


class TensorClasses(ClassDataset):
    """A class-indexed dataset held in one tensor `[num_classes, examples_per_class, ...]`.

    For data already in memory (and for tests): `TensorClasses(torch.randn(20, 10, 1, 28, 28))`.
    """

    def __init__(self, data: Tensor) -> None:
        if data.dim() < 2:
            raise ValueError(f"data must be [classes, examples, ...], got shape {tuple(data.shape)}")
        self.data = data
        self._num_examples = np.full(data.shape[0], data.shape[1])

    @property
    def num_examples(self) -> np.ndarray:
        return self._num_examples

    def examples(self, class_ids: Tensor, example_ids: Tensor) -> Tensor:
        return self.data[class_ids.unsqueeze(1), example_ids].float()
