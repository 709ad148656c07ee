"""CIFAR-FS and FC100: two few-shot splits of CIFAR-100's 100 classes (600 images each, 32×32).

- CIFAR-FS (Bertinetto et al., "Meta-learning with differentiable closed-form solvers", ICLR
  2019): 64 / 16 / 20 classes drawn at random, ignoring superclasses.
- FC100 (Oreshkin et al., "TADAM", NeurIPS 2018): split by CIFAR-100's 20 superclasses, 12 / 4 /
  4, so 60 / 20 / 20 classes, and test classes share no superclass with training ones (harder).

Both read CIFAR-100's python pickles from `<root>/cifar100/cifar-100-python/{train,test,meta}`
(the official archive, extracted); the train and test pickles are pooled (500 + 100 images per
class). The class lists ship with the package (`splits/cifar_fs.json`, `splits/fc100.json`).
One decode of CIFAR-100 serves both benchmarks.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from lightning_meta.data.benchmarks.common import (
    BenchmarkData,
    check_class_counts,
    decode_cached,
    group_by_class,
    load_split_file,
    prepare_archive,
    read_pickle,
    root_hint,
    split_classes,
)
from lightning_meta.data.images import ImageClasses, locate_data_root, resize_uint8

__all__ = ["CIFAR_FS_CLASSES", "FC100_CLASSES", "cifar_fs_splits", "fc100_splits", "load_cifar100"]

FOLDER = "cifar100"
SUBFOLDER = "cifar-100-python"
CIFAR_FS_CLASSES = {"train": 64, "val": 16, "test": 20}
FC100_CLASSES = {"train": 60, "val": 20, "test": 20}
# The official archive (Krizhevsky 2009): URL and md5 as in torchvision's CIFAR100 and
# torchmeta/datasets/cifar100/base.py (`download_url`, `gz_md5`, tristandeleu/pytorch-meta @ d55d89ebd47f).
ARCHIVE = "cifar-100-python.tar.gz"
ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
ARCHIVE_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
FILES = ("train", "test", "meta")


def _decode(folder: Path, image_size: int) -> dict[str, object]:
    images, fine, coarse = [], [], []
    for part in ("train", "test"):
        data = read_pickle(folder / part, encoding="bytes")
        if not isinstance(data, dict) or not {b"data", b"fine_labels", b"coarse_labels"} <= set(data):
            raise ValueError(f"{folder / part} lacks data/fine_labels/coarse_labels: not a CIFAR-100 python pickle")
        images.append(np.asarray(data[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        fine.append(np.asarray(data[b"fine_labels"], dtype=np.int64))
        coarse.append(np.asarray(data[b"coarse_labels"], dtype=np.int64))
    meta = read_pickle(folder / "meta")
    if not isinstance(meta, dict) or "fine_label_names" not in meta:
        raise ValueError(f"{folder / 'meta'} lacks fine_label_names: not CIFAR-100's meta pickle")
    fine_names, coarse_names = list(meta["fine_label_names"]), list(meta["coarse_label_names"])
    fine_all, coarse_all = np.concatenate(fine), np.concatenate(coarse)
    x = resize_uint8(torch.from_numpy(np.concatenate(images)), image_size)
    grouped, counts = group_by_class(x, fine_all, len(fine_names))
    # Each fine class has one superclass; keep it with the class for FC100's split.
    superclass = [""] * len(fine_names)
    for f, c in zip(fine_all.tolist(), coarse_all.tolist(), strict=True):
        superclass[f] = coarse_names[c]
    return {"images": grouped, "counts": counts, "class_names": fine_names, "class_splits": superclass}


def load_cifar100(
    root: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    image_size: int = 32,
) -> BenchmarkData:
    """Decode CIFAR-100 from `<root>/cifar100/cifar-100-python/`, or read the cache of an earlier decode.

    The result's `class_splits` holds each class's superclass (coarse label name), which FC100's
    split is made of.

    Args:
        root: the folder that holds `cifar100/` (default: `$LIGHTNING_META_DATA`, else `./data`).
        cache_dir: where the decoded tensor is cached (default: `$LIGHTNING_META_CACHE`).
        download: fetch and extract the official archive (md5 checked) when the pickles are missing.
        image_size: side of the square images (32, CIFAR's own, in both papers).

    Raises:
        FileNotFoundError: the pickles are missing; the message lists the paths looked for.
        RuntimeError: a local archive or a download fails its md5.
        ValueError: a damaged pickle (named).
    """
    data_root, origin = locate_data_root(root)
    base = data_root / FOLDER
    folder = base / SUBFOLDER
    if not all((folder / f).is_file() for f in FILES):
        prepare_archive(
            base / ARCHIVE,
            ARCHIVE_URL,
            ARCHIVE_MD5,
            "CIFAR-100",
            download,
            [folder / f for f in FILES],
            f"{root_hint(FOLDER)} (the data root came from {origin})",
        )
    return decode_cached(
        f"cifar100-{image_size}px",
        [folder / f for f in FILES],
        {"image_size": image_size},
        lambda: _decode(folder, image_size),
        cache_dir,
    )


def cifar_fs_splits(
    root: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    image_size: int = 32,
) -> dict[str, ImageClasses]:
    """CIFAR-FS: the 64 / 16 / 20 classes of Bertinetto et al. (see `load_cifar100`)."""
    data = load_cifar100(root, cache_dir, download, image_size)
    splits = split_classes(data, load_split_file("cifar_fs"))
    check_class_counts(splits, CIFAR_FS_CLASSES, "CIFAR-FS", locate_data_root(root)[0] / FOLDER, "")
    return splits


def fc100_splits(
    root: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    image_size: int = 32,
) -> dict[str, ImageClasses]:
    """FC100: the classes of Oreshkin et al.'s 12 / 4 / 4 superclasses, 60 / 20 / 20 (see `load_cifar100`)."""
    data = load_cifar100(root, cache_dir, download, image_size)
    superclasses = load_split_file("fc100")
    names = {
        split: [n for n, s in zip(data.class_names, data.class_splits, strict=True) if s in set(supers)]
        for split, supers in superclasses.items()
    }
    splits = split_classes(data, names)
    check_class_counts(splits, FC100_CLASSES, "FC100", locate_data_root(root)[0] / FOLDER, "")
    return splits
