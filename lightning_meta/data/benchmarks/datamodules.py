"""Task-batch DataModules of the few-shot image benchmarks: mini-ImageNet, tiered-ImageNet,
CIFAR-FS, FC100 and CUB-200-2011.

Each lists the shared arguments again on purpose (the typed signature is the YAML schema and the
`--help`, as `OmniglotDataModule`); what they share is `ImageTaskArgs` and `few_shot_sources`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lightning_meta.data.augment import Augmentation
from lightning_meta.data.base import TaskSource
from lightning_meta.data.benchmarks.cifar import cifar_fs_splits, fc100_splits
from lightning_meta.data.benchmarks.cub import cub_splits
from lightning_meta.data.benchmarks.miniimagenet import miniimagenet_splits
from lightning_meta.data.benchmarks.tiered import tiered_imagenet_splits
from lightning_meta.data.datamodule import EpisodicDataModule, check_positive, few_shot_sources
from lightning_meta.data.images import ImageClasses

__all__ = [
    "CIFARFSDataModule",
    "CUBDataModule",
    "FC100DataModule",
    "ImageTaskArgs",
    "MiniImageNetDataModule",
    "TieredImageNetDataModule",
]

SplitsFn = Callable[..., dict[str, ImageClasses]]


@dataclass(frozen=True)
class ImageTaskArgs:
    """The task and reader settings every benchmark DataModule takes, checked once."""

    root: str | None
    ways: int
    shots: int
    query_shots: int
    eval_query_shots: int
    train_ways: int
    download: bool
    cache_dir: str | None
    image_size: int
    augment: Augmentation | None

    def __post_init__(self) -> None:
        check_positive(
            ways=self.ways,
            shots=self.shots,
            query_shots=self.query_shots,
            eval_query_shots=self.eval_query_shots,
            train_ways=self.train_ways,
            image_size=self.image_size,
        )

    def sources(self, reader: SplitsFn, name: str) -> dict[str, TaskSource]:
        """Read the benchmark's splits with `reader` and make their task sources."""
        splits = reader(root=self.root, cache_dir=self.cache_dir, download=self.download, image_size=self.image_size)
        return few_shot_sources(
            {split: splits[split] for split in ("train", "val", "test")},
            f"{name} {{split}} split",
            self.ways,
            self.train_ways,
            self.shots,
            self.query_shots,
            self.eval_query_shots,
            self.augment,
        )


_ARGS_DOC = """
    Args:
        root: folder holding `{folder}/` (default: `$LIGHTNING_META_DATA`, else `./data`).
        ways: classes per validation/test task (N), and per training task unless `train_ways`.
        shots: support examples per class (K).
        query_shots: query examples per class in training tasks.
        eval_query_shots: query examples per class in validation and test tasks (default:
            `query_shots`).
        train_ways: classes per training task when it differs from `ways` (Prototypical
            Networks train 30-way 1-shot and 20-way 5-shot on mini-ImageNet, test 5-way).
        download: fetch the dataset (URL and md5 in the reader's module) when it is missing.
        cache_dir: where the decoded tensor is cached (default: `$LIGHTNING_META_CACHE`, else
            `~/.cache/lightning_meta`).
        image_size: side of the square images the backbone sees.
        augment: per-image augmentation of training tasks (`Augmentation`, e.g. a random
            resized crop, a flip and colour jitter), drawn from each task's own generator;
            validation and test tasks only with its `eval_tasks: true`. Default: none.
        tasks_per_batch: see `EpisodicDataModule`.
        batches_per_epoch: see `EpisodicDataModule`.
        val_tasks: see `EpisodicDataModule`.
        test_tasks: see `EpisodicDataModule`.
        eval_tasks_per_batch: see `EpisodicDataModule`.
        seed: see `EpisodicDataModule`.
        eval_seed: see `EpisodicDataModule`.
        num_workers: see `EpisodicDataModule`.
"""


class MiniImageNetDataModule(EpisodicDataModule):
    def __init__(
        self,
        root: str | None = None,
        ways: int = 5,
        shots: int = 1,
        query_shots: int = 15,
        eval_query_shots: int | None = None,
        train_ways: int | None = None,
        download: bool = False,
        cache_dir: str | None = None,
        image_size: int = 84,
        augment: Augmentation | None = None,
        tasks_per_batch: int = 4,
        batches_per_epoch: int = 100,
        val_tasks: int = 100,
        test_tasks: int = 600,
        eval_tasks_per_batch: int | None = None,
        seed: int = 0,
        eval_seed: int = 0,
        num_workers: int = 0,
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
        self.args = ImageTaskArgs(
            root,
            ways,
            shots,
            query_shots,
            eval_query_shots or query_shots,
            train_ways or ways,
            download,
            cache_dir,
            image_size,
            augment,
        )
        self.ways, self.train_ways, self.image_shape = ways, train_ways or ways, (3, image_size, image_size)

    def build_sources(self) -> dict[str, TaskSource]:
        return self.args.sources(miniimagenet_splits, "mini-ImageNet")


class TieredImageNetDataModule(EpisodicDataModule):
    def __init__(
        self,
        root: str | None = None,
        ways: int = 5,
        shots: int = 1,
        query_shots: int = 15,
        eval_query_shots: int | None = None,
        train_ways: int | None = None,
        download: bool = False,
        cache_dir: str | None = None,
        image_size: int = 84,
        augment: Augmentation | None = None,
        tasks_per_batch: int = 4,
        batches_per_epoch: int = 100,
        val_tasks: int = 100,
        test_tasks: int = 600,
        eval_tasks_per_batch: int | None = None,
        seed: int = 0,
        eval_seed: int = 0,
        num_workers: int = 0,
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
        self.args = ImageTaskArgs(
            root,
            ways,
            shots,
            query_shots,
            eval_query_shots or query_shots,
            train_ways or ways,
            download,
            cache_dir,
            image_size,
            augment,
        )
        self.ways, self.train_ways, self.image_shape = ways, train_ways or ways, (3, image_size, image_size)

    def build_sources(self) -> dict[str, TaskSource]:
        return self.args.sources(tiered_imagenet_splits, "tiered-ImageNet")


class CIFARFSDataModule(EpisodicDataModule):
    def __init__(
        self,
        root: str | None = None,
        ways: int = 5,
        shots: int = 1,
        query_shots: int = 15,
        eval_query_shots: int | None = None,
        train_ways: int | None = None,
        download: bool = False,
        cache_dir: str | None = None,
        image_size: int = 32,
        augment: Augmentation | None = None,
        tasks_per_batch: int = 4,
        batches_per_epoch: int = 100,
        val_tasks: int = 100,
        test_tasks: int = 600,
        eval_tasks_per_batch: int | None = None,
        seed: int = 0,
        eval_seed: int = 0,
        num_workers: int = 0,
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
        self.args = ImageTaskArgs(
            root,
            ways,
            shots,
            query_shots,
            eval_query_shots or query_shots,
            train_ways or ways,
            download,
            cache_dir,
            image_size,
            augment,
        )
        self.ways, self.train_ways, self.image_shape = ways, train_ways or ways, (3, image_size, image_size)

    def build_sources(self) -> dict[str, TaskSource]:
        return self.args.sources(cifar_fs_splits, "CIFAR-FS")


class FC100DataModule(EpisodicDataModule):
    def __init__(
        self,
        root: str | None = None,
        ways: int = 5,
        shots: int = 1,
        query_shots: int = 15,
        eval_query_shots: int | None = None,
        train_ways: int | None = None,
        download: bool = False,
        cache_dir: str | None = None,
        image_size: int = 32,
        augment: Augmentation | None = None,
        tasks_per_batch: int = 4,
        batches_per_epoch: int = 100,
        val_tasks: int = 100,
        test_tasks: int = 600,
        eval_tasks_per_batch: int | None = None,
        seed: int = 0,
        eval_seed: int = 0,
        num_workers: int = 0,
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
        self.args = ImageTaskArgs(
            root,
            ways,
            shots,
            query_shots,
            eval_query_shots or query_shots,
            train_ways or ways,
            download,
            cache_dir,
            image_size,
            augment,
        )
        self.ways, self.train_ways, self.image_shape = ways, train_ways or ways, (3, image_size, image_size)

    def build_sources(self) -> dict[str, TaskSource]:
        return self.args.sources(fc100_splits, "FC100")


class CUBDataModule(EpisodicDataModule):
    def __init__(
        self,
        root: str | None = None,
        ways: int = 5,
        shots: int = 1,
        query_shots: int = 15,
        eval_query_shots: int | None = None,
        train_ways: int | None = None,
        download: bool = False,
        cache_dir: str | None = None,
        image_size: int = 84,
        augment: Augmentation | None = None,
        tasks_per_batch: int = 4,
        batches_per_epoch: int = 100,
        val_tasks: int = 100,
        test_tasks: int = 600,
        eval_tasks_per_batch: int | None = None,
        seed: int = 0,
        eval_seed: int = 0,
        num_workers: int = 0,
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
        self.args = ImageTaskArgs(
            root,
            ways,
            shots,
            query_shots,
            eval_query_shots or query_shots,
            train_ways or ways,
            download,
            cache_dir,
            image_size,
            augment,
        )
        self.ways, self.train_ways, self.image_shape = ways, train_ways or ways, (3, image_size, image_size)

    def build_sources(self) -> dict[str, TaskSource]:
        return self.args.sources(cub_splits, "CUB-200-2011")


_SUMMARIES = {
    MiniImageNetDataModule: (
        "N-way K-shot mini-ImageNet tasks (Ravi & Larochelle split: 64 / 16 / 20 classes, 84×84 RGB).",
        "miniimagenet",
    ),
    TieredImageNetDataModule: (
        "N-way K-shot tiered-ImageNet tasks (Ren et al. 2018: 351 / 97 / 160 classes, 84×84 RGB).",
        "tieredimagenet",
    ),
    CIFARFSDataModule: (
        "N-way K-shot CIFAR-FS tasks (Bertinetto et al. 2019: 64 / 16 / 20 classes, 32×32).",
        "cifar100",
    ),
    FC100DataModule: (
        "N-way K-shot FC100 tasks (Oreshkin et al. 2018: superclass split, 60 / 20 / 20 classes, 32×32).",
        "cifar100",
    ),
    CUBDataModule: ("N-way K-shot CUB-200-2011 tasks (Chen et al. 2019 split: 100 / 50 / 50 classes, 84×84).", "cub"),
}
# One argument list documented once for the five classes (jsonargparse reads `__doc__` for `--help`).
for _cls, (_summary, _folder) in _SUMMARIES.items():
    _cls.__doc__ = _summary + "\n" + _ARGS_DOC.format(folder=_folder)
