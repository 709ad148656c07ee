"""tiered-ImageNet (Ren et al., "Meta-Learning for Semi-Supervised Few-Shot Classification", ICLR 2018).

608 ImageNet classes grouped by 34 high-level categories of the ImageNet hierarchy, split by
category (20 / 6 / 8) so that test classes are semantically far from training ones: 351 train,
97 validation, 160 test classes, 779,165 images at 84×84 RGB.

Read from `<root>/tieredimagenet/` (or its `tiered-imagenet/` subfolder, as Ren et al.'s tar
extracts), per split `{split}_labels.pkl` (`label_specific` [N] class indices,
`label_specific_str` class names; RFS-style `labels` is accepted too) and the images in either
of the two layouts readers use:

- `{split}_images_png.pkl`: Ren et al.'s release, a list of PNG-encoded images.
- `{split}_images.npz`: the same images decoded, key `images`, uint8 [N, 84, 84, 3] (the
  repackaging of MetaOptNet / RFS and others).

The whole dataset decoded is 16.5 GB of uint8 at 84×84: the first decode needs that much memory;
later runs memory-map the cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lightning_meta.data.benchmarks.common import (
    SPLITS,
    BenchmarkData,
    check_class_counts,
    decode_cached,
    gdrive_url,
    prepare_archive,
    read_pickle,
    root_hint,
    split_classes,
)
from lightning_meta.data.images import ImageClasses, locate_data_root, read_image_file, resize_uint8

__all__ = ["TIERED_CLASSES", "load_tiered_imagenet", "tiered_imagenet_splits"]

FOLDER = "tieredimagenet"
TIERED_CLASSES = {"train": 351, "val": 97, "test": 160}
# Ren et al.'s tar as torchmeta downloads it: Google Drive id (from
# github.com/renmengye/few-shot-ssl-public) and md5, torchmeta/datasets/tieredimagenet.py
# (`gdrive_id`, `tar_md5`, tristandeleu/pytorch-meta @ d55d89ebd47f).
ARCHIVE = "tiered-imagenet.tar"
ARCHIVE_URL = gdrive_url("1g1aIDy2Ar_MViF2gDXFYDBTR-HYecV07")
ARCHIVE_MD5 = "e07e811b9f29362d159a9edd0d838c62"
SUBFOLDER = "tiered-imagenet"


def _find(base: Path) -> tuple[Path, dict[str, Path]] | None:
    """The folder holding every split's labels and images, and each split's images file."""
    for folder in (base, base / SUBFOLDER):
        images = {}
        for split in SPLITS:
            if not (folder / f"{split}_labels.pkl").is_file():
                break
            for name in (f"{split}_images.npz", f"{split}_images_png.pkl"):
                if (folder / name).is_file():
                    images[split] = folder / name
                    break
        if len(images) == len(SPLITS):
            return folder, images
    return None


def _labels(path: Path) -> tuple[np.ndarray, list[str]]:
    data = read_pickle(path)
    if not isinstance(data, dict) or not ({"label_specific", "labels"} & set(data)):
        raise ValueError(f"{path} has no `label_specific` (or `labels`): not a tiered-ImageNet labels pickle")
    labels = np.asarray(data["label_specific"] if "label_specific" in data else data["labels"], dtype=np.int64)
    count = int(labels.max()) + 1 if len(labels) else 0
    names = data.get("label_specific_str")
    names = [str(n) for n in names] if names is not None else [f"class{i:03d}" for i in range(count)]
    if len(names) < count:
        raise ValueError(f"{path}: {len(names)} class names for labels up to {count - 1}")
    return labels, names[:count]


_CHUNK = 4096
"""Images converted at a time from an npz array, so the conversion never copies a whole split."""


def _fill(out: Tensor, path: Path, order: np.ndarray, image_size: int) -> None:
    """Write the images of `path` into `out` (uint8 [n, 3, S, S]) in the order `order`, one image
    or one chunk at a time: tiered-ImageNet decoded is 16.5 GB, so no second copy is made."""
    if path.suffix == ".npz":
        with np.load(path) as f:
            if "images" not in f:
                raise ValueError(f"{path} has no `images` array (keys: {list(f)}): not a tiered-ImageNet npz")
            array = f["images"]
        if array.ndim != 4 or array.shape[-1] != 3 or len(array) != len(out):
            raise ValueError(f"{path}: images has shape {array.shape}, expected [{len(out)}, H, W, 3]")
        for i in range(0, len(order), _CHUNK):
            chunk = np.ascontiguousarray(array[order[i : i + _CHUNK]].transpose(0, 3, 1, 2))
            out[i : i + _CHUNK] = resize_uint8(torch.from_numpy(chunk), image_size)
        return
    encoded = read_pickle(path, encoding="bytes")
    if len(encoded) != len(out):
        raise ValueError(f"{path} holds {len(encoded)} images, its labels {len(out)}")
    for i, k in enumerate(order.tolist()):
        data = bytes(np.asarray(encoded[k], dtype=np.uint8))
        out[i] = torch.from_numpy(read_image_file(data, image_size, "RGB", where=f"image {k} of {path}"))


def _decode(folder: Path, images: dict[str, Path], image_size: int) -> dict[str, object]:
    labels = {split: _labels(folder / f"{split}_labels.pkl") for split in SPLITS}
    total = sum(len(lab) for lab, _ in labels.values())
    out = torch.empty((total, 3, image_size, image_size), dtype=torch.uint8)
    counts, names, splits, start = [], [], [], 0
    for split in SPLITS:
        split_labels, class_names = labels[split]
        order = np.argsort(split_labels, kind="stable")  # each class contiguous, file order kept within
        _fill(out[start : start + len(order)], images[split], order, image_size)
        start += len(order)
        counts.append(torch.from_numpy(np.bincount(split_labels, minlength=len(class_names))))
        names += class_names
        splits += [split] * len(class_names)
    return {"images": out, "counts": torch.cat(counts), "class_names": names, "class_splits": splits}


def load_tiered_imagenet(
    root: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    image_size: int = 84,
) -> BenchmarkData:
    """Decode tiered-ImageNet from `<root>/tieredimagenet/`, or read the cache of an earlier decode.

    Args:
        root: the folder that holds `tieredimagenet/` (default: `$LIGHTNING_META_DATA`, else `./data`).
        cache_dir: where the decoded tensor is cached (default: `$LIGHTNING_META_CACHE`).
        download: fetch and extract Ren et al.'s tar (md5 checked) when the files are missing.
        image_size: side of the square images.

    Raises:
        FileNotFoundError: the files are missing; the message lists the paths looked for.
        RuntimeError: a local archive or a download fails its md5.
        ValueError: a damaged file (named).
    """
    data_root, origin = locate_data_root(root)
    base = data_root / FOLDER
    found = _find(base)
    if found is None:
        looked = [base / SUBFOLDER / f"{s}_{kind}" for s in SPLITS for kind in ("labels.pkl", "images_png.pkl")]
        prepare_archive(
            base / ARCHIVE,
            ARCHIVE_URL,
            ARCHIVE_MD5,
            "tiered-ImageNet",
            download,
            looked,
            f"{root_hint(FOLDER)} (the data root came from {origin}); `{{split}}_images.npz` may replace "
            "`{split}_images_png.pkl`.",
        )
        found = _find(base)
        if found is None:
            raise FileNotFoundError(f"{base / ARCHIVE} was extracted but {base / SUBFOLDER} lacks the split files")
    folder, images = found
    sources = [p for s in SPLITS for p in (folder / f"{s}_labels.pkl", images[s])]
    return decode_cached(
        f"tieredimagenet-{image_size}px",
        sources,
        {"image_size": image_size},
        lambda: _decode(folder, images, image_size),
        cache_dir,
    )


def tiered_imagenet_splits(
    root: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    image_size: int = 84,
) -> dict[str, ImageClasses]:
    """The 351 / 97 / 160 train / validation / test classes of tiered-ImageNet (see `load_tiered_imagenet`)."""
    data = load_tiered_imagenet(root, cache_dir, download, image_size)
    splits = split_classes(data)
    base = locate_data_root(root)[0] / FOLDER
    check_class_counts(splits, TIERED_CLASSES, "tiered-ImageNet", base, "Use Ren et al.'s release.")
    return splits
