"""Readers of the standard few-shot image benchmarks and their task-batch DataModules.

mini-ImageNet, tiered-ImageNet, CIFAR-FS, FC100 and CUB-200-2011: each reader decodes its
dataset once into one cached uint8 tensor (`common.decode_cached`, over the shared image layer
`lightning_meta.data.images`) and returns one `ImageClasses` per split (the type
`ImageFolderClasses` is too); each has its download code (URL and md5) for machines with a network.
The readers import torch only; `datamodules.py` holds the Lightning DataModules.
"""

from lightning_meta.data.benchmarks.cifar import cifar_fs_splits, fc100_splits, load_cifar100
from lightning_meta.data.benchmarks.common import BenchmarkData, decode_cached
from lightning_meta.data.benchmarks.cub import cub_splits, load_cub
from lightning_meta.data.benchmarks.datamodules import (
    CIFARFSDataModule,
    CUBDataModule,
    FC100DataModule,
    ImageBenchmarkDataModule,
    MiniImageNetDataModule,
    TieredImageNetDataModule,
)
from lightning_meta.data.benchmarks.miniimagenet import load_miniimagenet, miniimagenet_splits
from lightning_meta.data.benchmarks.tiered import load_tiered_imagenet, tiered_imagenet_splits
from lightning_meta.data.images import ImageClasses

__all__ = [
    "BenchmarkData",
    "CIFARFSDataModule",
    "CUBDataModule",
    "FC100DataModule",
    "ImageBenchmarkDataModule",
    "ImageClasses",
    "MiniImageNetDataModule",
    "TieredImageNetDataModule",
    "cifar_fs_splits",
    "cub_splits",
    "decode_cached",
    "fc100_splits",
    "load_cifar100",
    "load_cub",
    "load_miniimagenet",
    "load_tiered_imagenet",
    "miniimagenet_splits",
    "tiered_imagenet_splits",
]
