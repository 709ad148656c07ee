"""Small builders shared by the tests (and by the DDP script they launch)."""

from __future__ import annotations

import torch

from lightning_meta.data import EpisodicDataModule, FewShotTasks, TaskSource, TensorClasses


class SyntheticClassesDataModule(EpisodicDataModule):
    """Few-shot tasks over random 'images' with a per-class signal, so a model can learn something.

    Args:
        ways: classes per task.
        shots: support examples per class.
        query_shots: query examples per class.
        num_classes: classes in each split.
        image_size: side of the square single-channel images.
        tasks_per_batch: see `EpisodicDataModule`.
        val_tasks: see `EpisodicDataModule`.
        seed: see `EpisodicDataModule`.
        batches_per_epoch: see `EpisodicDataModule`.
    """

    def __init__(
        self,
        ways: int = 3,
        shots: int = 2,
        query_shots: int = 2,
        num_classes: int = 10,
        image_size: int = 28,
        tasks_per_batch: int = 2,
        val_tasks: int = 4,
        seed: int = 0,
        batches_per_epoch: int = 10,
    ) -> None:
        super().__init__(tasks_per_batch, batches_per_epoch, val_tasks, val_tasks, None, seed, 0, 0)
        self.ways, self.shots, self.query_shots = ways, shots, query_shots
        g = torch.Generator().manual_seed(1234)
        centres = torch.randn(num_classes, 1, 1, image_size, image_size, generator=g)
        noise = 0.5 * torch.randn(3, num_classes, 8, 1, image_size, image_size, generator=g)
        self.splits = [TensorClasses(centres + noise[i]) for i in range(3)]

    def build_sources(self) -> dict[str, TaskSource]:
        return {
            name: FewShotTasks(split, self.ways, self.shots, self.query_shots)
            for name, split in zip(("train", "val", "test"), self.splits, strict=True)
        }
