"""mini-ImageNet (Vinyals et al. 2016) with the class split of Ravi & Larochelle (2017).

100 ImageNet classes of 600 images each, 84×84 RGB: 64 train, 16 validation, 20 test classes.
The split of Ravi & Larochelle is the one MAML, Prototypical Networks and nearly all later work
report on (Vinyals et al.'s own split was never published in full).

Two layouts are read from `<root>/miniimagenet/`:

- The split CSVs of Ravi & Larochelle (`train.csv`, `val.csv`, `test.csv`, lines
  `filename,label`) with the images in `images/` (e.g. `n0153282900000005.jpg`). Images of any
  size are resized to `image_size` (Lanczos, as Ravi & Larochelle's preprocessing script).
- The pickled cache of Ren et al. (2018) that most readers download (torchmeta, learn2learn):
  `mini-imagenet-cache-{train,val,test}.pkl`, each `{"image_data": uint8 [N, 84, 84, 3],
  "class_dict": {wnid: [indices]}}` (`...-validation.pkl` is accepted for the validation split).
  Same classes and images; used when present, since it needs no JPEG decoding.

`download=True` fetches the pickled cache (the CSV layout's images are not redistributable with a
checksum).
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

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
from lightning_meta.data.images import ImageClasses, ImageFormat, decode_files, locate_data_root, resize_uint8

__all__ = ["MINIIMAGENET_CLASSES", "load_miniimagenet", "miniimagenet_splits"]

FOLDER = "miniimagenet"
MINIIMAGENET_CLASSES = {"train": 64, "val": 16, "test": 20}
# The pickled cache as torchmeta downloads it: Google Drive id (from Ren et al.'s
# github.com/renmengye/few-shot-ssl-public) and md5, torchmeta/datasets/miniimagenet.py
# (`gdrive_id`, `gz_md5`, tristandeleu/pytorch-meta @ d55d89ebd47f).
ARCHIVE = "mini-imagenet.tar.gz"
ARCHIVE_URL = gdrive_url("16V_ZlkW4SsnNDtnGmaBRq2OoPmUOc5mY")
ARCHIVE_MD5 = "b38f1eb4251fb9459ecc8e7febf9b2eb"
# The split CSVs, for the images-folder layout: github.com/twitter/meta-learning-lstm (Ravi &
# Larochelle's code), data/miniImagenet/; no checksum is published (not downloaded by the reader).
CSV_URL = "https://raw.githubusercontent.com/twitter/meta-learning-lstm/master/data/miniImagenet/{split}.csv"
PICKLE_NAMES = {
    "train": ("mini-imagenet-cache-train.pkl",),
    "val": ("mini-imagenet-cache-val.pkl", "mini-imagenet-cache-validation.pkl"),
    "test": ("mini-imagenet-cache-test.pkl",),
}


def _pickles(base: Path) -> dict[str, Path] | None:
    found = {}
    for split, names in PICKLE_NAMES.items():
        paths = [base / n for n in names if (base / n).is_file()]
        if not paths:
            return None
        found[split] = paths[0]
    return found


def _read_csv(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        raise ValueError(f"{path} does not start with the header `filename,label`: not a Ravi & Larochelle split CSV")
    out = []
    for lineno, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 2:
            raise ValueError(f"{path}:{lineno}: expected `filename,label`, got {row!r}")
        out.append((row[0].strip(), row[1].strip()))
    return out


def _decode_pickles(paths: dict[str, Path], image_size: int) -> dict[str, object]:
    images, counts, names, splits = [], [], [], []
    for split in SPLITS:
        data = read_pickle(paths[split])
        if not isinstance(data, dict) or "image_data" not in data or "class_dict" not in data:
            raise ValueError(f"{paths[split]} lacks `image_data` and `class_dict`: not a mini-ImageNet cache pickle")
        array = np.asarray(data["image_data"], dtype=np.uint8)
        if array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"{paths[split]}: image_data has shape {array.shape}, expected [N, H, W, 3]")
        for name in sorted(data["class_dict"]):
            index = np.asarray(data["class_dict"][name], dtype=np.int64)
            chw = torch.from_numpy(np.ascontiguousarray(array[index].transpose(0, 3, 1, 2)))
            images.append(resize_uint8(chw, image_size))
            counts.append(len(index))
            names.append(str(name))
            splits.append(split)
    return {"images": torch.cat(images), "counts": torch.tensor(counts), "class_names": names, "class_splits": splits}


def _decode_csvs(base: Path, rows: dict[str, list[tuple[str, str]]], image_size: int) -> dict[str, object]:
    names, splits, files, counts = [], [], [], []
    for split in SPLITS:
        by_class: dict[str, list[str]] = defaultdict(list)
        for filename, label in rows[split]:
            by_class[label].append(filename)
        for label in sorted(by_class):  # each class contiguous, CSV order kept within
            names.append(label)
            splits.append(split)
            files += by_class[label]
            counts.append(len(by_class[label]))
    missing = [base / "images" / f for f in files if not (base / "images" / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} images listed in {base}/*.csv are missing, e.g. {missing[0]}: put the mini-ImageNet "
            f"images in {base / 'images'}/ (or use the pickled cache: `--data.download true`)"
        )
    return {
        "images": decode_files([base / "images" / f for f in files], ImageFormat(image_size), None, "mini-ImageNet"),
        "counts": torch.tensor(counts),
        "class_names": names,
        "class_splits": splits,
    }


def load_miniimagenet(
    root: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    image_size: int = 84,
) -> BenchmarkData:
    """Decode mini-ImageNet from `<root>/miniimagenet/` (either layout), or read the cache of an earlier decode.

    Args:
        root: the folder that holds `miniimagenet/` (default: `$LIGHTNING_META_DATA`, else `./data`).
        cache_dir: where the decoded tensor is cached (default: `$LIGHTNING_META_CACHE`).
        download: fetch and extract the pickled cache (md5 checked) when no layout is found.
        image_size: side of the square images.

    Raises:
        FileNotFoundError: neither layout is present; the message lists the paths looked for.
        RuntimeError: a local archive or a download fails its md5.
        ValueError: a damaged file (named), a CSV image that is missing, or the wrong class counts.
    """
    data_root, origin = locate_data_root(root)
    base = data_root / FOLDER
    csvs = {s: base / f"{s}.csv" for s in SPLITS}
    pickles = _pickles(base)
    if pickles is None and not all(p.is_file() for p in csvs.values()):
        looked = [base / PICKLE_NAMES[s][0] for s in SPLITS] + list(csvs.values()) + [base / "images"]
        prepare_archive(
            base / ARCHIVE,
            ARCHIVE_URL,
            ARCHIVE_MD5,
            "mini-ImageNet",
            download,
            looked,
            f"{root_hint(FOLDER)} (the data root came from {origin}). Either layout works: the Ravi & Larochelle "
            f"CSVs ({CSV_URL.format(split='{train,val,test}')}) with the images in images/, or the pickled cache.",
        )
        pickles = _pickles(base)
        if pickles is None:
            raise FileNotFoundError(f"{base / ARCHIVE} was extracted but holds no mini-imagenet-cache-*.pkl files")
    if pickles is not None:
        data = decode_cached(
            f"miniimagenet-{image_size}px",
            [pickles[s] for s in SPLITS],
            {"layout": "pickle", "image_size": image_size},
            lambda: _decode_pickles(pickles, image_size),
            cache_dir,
        )
    else:
        rows = {s: _read_csv(csvs[s]) for s in SPLITS}
        data = decode_cached(
            f"miniimagenet-{image_size}px",
            list(csvs.values()),
            {"layout": "csv", "image_size": image_size, "images": len(os.listdir(base / "images"))},
            lambda: _decode_csvs(base, rows, image_size),
            cache_dir,
        )
    return data


def miniimagenet_splits(
    root: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    image_size: int = 84,
) -> dict[str, ImageClasses]:
    """The 64 / 16 / 20 train / validation / test classes of mini-ImageNet (see `load_miniimagenet`)."""
    data = load_miniimagenet(root, cache_dir, download, image_size)
    splits = split_classes(data)
    base = locate_data_root(root)[0] / FOLDER
    check_class_counts(splits, MINIIMAGENET_CLASSES, "mini-ImageNet", base, "Use the Ravi & Larochelle split.")
    return splits
