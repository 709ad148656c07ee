"""Task-batch DataModules of the few-shot image benchmarks: mini-ImageNet, tiered-ImageNet,
CIFAR-FS, FC100 and CUB-200-2011.

All five are `ImageBenchmarkDataModule` with their own reader, name, folder and native image
size: the typed signature of the base's `__init__` is the YAML schema and the `--help` of each
(jsonargparse reads an inherited `__init__`), and `image_size: null` means the benchmark's own
size (84 for the ImageNet subsets and CUB, 32 for the CIFAR ones).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

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
    "ImageBenchmarkDataModule",
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
        image_size: side of the square images the backbone sees (default: the benchmark's own,
            {size}).
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


class ImageBenchmarkDataModule(EpisodicDataModule):
    """The shared DataModule of the few-shot image benchmarks; use one of its subclasses."""

    splits_reader: ClassVar[SplitsFn]
    display_name: ClassVar[str]
    folder: ClassVar[str]
    native_size: ClassVar[int]

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
        image_size: int | None = None,
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
        if type(self) is ImageBenchmarkDataModule:
            raise TypeError(
                "ImageBenchmarkDataModule is the shared base: use MiniImageNetDataModule, "
                "TieredImageNetDataModule, CIFARFSDataModule, FC100DataModule or CUBDataModule"
            )
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
        size = self.native_size if image_size is None else image_size
        self.args = ImageTaskArgs(
            root,
            ways,
            shots,
            query_shots,
            eval_query_shots or query_shots,
            train_ways or ways,
            download,
            cache_dir,
            size,
            augment,
        )
        self.ways, self.train_ways, self.image_shape = ways, train_ways or ways, (3, size, size)

    def build_sources(self) -> dict[str, TaskSource]:
        return self.args.sources(type(self).splits_reader, self.display_name)


class MiniImageNetDataModule(ImageBenchmarkDataModule):
    splits_reader = staticmethod(miniimagenet_splits)
    display_name, folder, native_size = "mini-ImageNet", "miniimagenet", 84


class TieredImageNetDataModule(ImageBenchmarkDataModule):
    splits_reader = staticmethod(tiered_imagenet_splits)
    display_name, folder, native_size = "tiered-ImageNet", "tieredimagenet", 84


class CIFARFSDataModule(ImageBenchmarkDataModule):
    splits_reader = staticmethod(cifar_fs_splits)
    display_name, folder, native_size = "CIFAR-FS", "cifar100", 32


class FC100DataModule(ImageBenchmarkDataModule):
    splits_reader = staticmethod(fc100_splits)
    display_name, folder, native_size = "FC100", "cifar100", 32


class CUBDataModule(ImageBenchmarkDataModule):
    splits_reader = staticmethod(cub_splits)
    display_name, folder, native_size = "CUB-200-2011", "cub", 84


_SUMMARIES = {
    MiniImageNetDataModule: (
        "N-way K-shot mini-ImageNet tasks (Ravi & Larochelle split: 64 / 16 / 20 classes, 84×84 RGB)."
    ),
    TieredImageNetDataModule: (
        "N-way K-shot tiered-ImageNet tasks (Ren et al. 2018: 351 / 97 / 160 classes, 84×84 RGB)."
    ),
    CIFARFSDataModule: "N-way K-shot CIFAR-FS tasks (Bertinetto et al. 2019: 64 / 16 / 20 classes, 32×32).",
    FC100DataModule: "N-way K-shot FC100 tasks (Oreshkin et al. 2018: superclass split, 60 / 20 / 20 classes, 32×32).",
    CUBDataModule: "N-way K-shot CUB-200-2011 tasks (Chen et al. 2019 split: 100 / 50 / 50 classes, 84×84).",
}
# One argument list documented once for the five classes (jsonargparse reads `__doc__` for `--help`).
for _cls, _summary in _SUMMARIES.items():
    _cls.__doc__ = _summary + "\n" + _ARGS_DOC.format(folder=_cls.folder, size=_cls.native_size)
