"""CUB-200-2011 (Wah et al. 2011) with the few-shot split of Chen et al. ("A Closer Look at
Few-shot Classification", ICLR 2019).

200 bird species, 11,788 photographs (41-60 per class). Chen et al. sort the class folders and
take every second one for training (100), every fourth from the second for validation (50) and
every fourth from the fourth for testing (50); the lists ship with the package
(`splits/cub.json`). Images are read from the official archive's folders,
`<root>/cub/CUB_200_2011/images/<NNN.Class_name>/*.jpg`, and resized to `image_size` square
(84 as in Chen et al.'s Conv4 experiments; the whole photograph is squashed, not cropped).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lightning_meta.data.benchmarks.common import (
    BenchmarkData,
    check_class_counts,
    decode_cached,
    load_split_file,
    prepare_archive,
    root_hint,
    split_classes,
)
from lightning_meta.data.images import ImageClasses, ImageFormat, decode_files, locate_data_root

__all__ = ["CUB_CLASSES", "cub_splits", "load_cub"]

FOLDER = "cub"
IMAGES = Path("CUB_200_2011") / "images"
CUB_CLASSES = {"train": 100, "val": 50, "test": 50}
# The official archive on CaltechDATA, md5 as in torchmeta/datasets/cub.py (`tgz_md5`,
# tristandeleu/pytorch-meta @ d55d89ebd47f, which fetched a Google Drive copy of the same file)
# and in other readers of CaltechDATA's record 65de6-vp158 (found with the code search).
ARCHIVE = "CUB_200_2011.tgz"
ARCHIVE_URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1"
ARCHIVE_MD5 = "97eceeb196236b17998738112f37df78"
EXTENSIONS = (".jpg", ".jpeg", ".png")


def _decode(folder: Path, classes: list[str], image_size: int) -> dict[str, object]:
    files, counts = [], []
    for name in classes:
        found = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in EXTENSIONS)
        files += found
        counts.append(len(found))
    split_of = {c: s for s, names in load_split_file("cub").items() for c in names}
    return {
        "images": decode_files(files, ImageFormat(image_size), None, "CUB-200-2011"),
        "counts": torch.tensor(counts),
        "class_names": classes,
        "class_splits": [split_of[c] for c in classes],
    }


def load_cub(
    root: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    image_size: int = 84,
) -> BenchmarkData:
    """Decode the 200 classes of CUB-200-2011 from `<root>/cub/CUB_200_2011/images/`, or read the cache.

    Args:
        root: the folder that holds `cub/` (default: `$LIGHTNING_META_DATA`, else `./data`).
        cache_dir: where the decoded tensor is cached (default: `$LIGHTNING_META_CACHE`).
        download: fetch and extract the official archive (md5 checked) when the images are missing.
        image_size: side of the square images.

    Raises:
        FileNotFoundError: the image folders are missing or a class folder is empty; the path is named.
        RuntimeError: a local archive or a download fails its md5.
        ValueError: a damaged image (named).
    """
    data_root, origin = locate_data_root(root)
    base = data_root / FOLDER
    folder = base / IMAGES
    if not folder.is_dir():
        prepare_archive(
            base / ARCHIVE,
            ARCHIVE_URL,
            ARCHIVE_MD5,
            "CUB-200-2011",
            download,
            [folder],
            f"{root_hint(FOLDER)} (the data root came from {origin})",
        )
    classes = sorted(c for names in load_split_file("cub").values() for c in names)
    missing = [folder / c for c in classes if not (folder / c).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of CUB's 200 class folders are missing, e.g. {missing[0]}: the copy is incomplete; "
            f"extract the official {ARCHIVE} into {base}/"
        )
    per_class = {c: [p for p in (folder / c).iterdir() if p.suffix.lower() in EXTENSIONS] for c in classes}
    empty = [folder / c for c, files in per_class.items() if not files]
    if empty:
        raise FileNotFoundError(f"the class folder {empty[0]} holds no images: the copy is incomplete")
    return decode_cached(
        f"cub-{image_size}px",
        [folder / c for c in classes],
        {"image_size": image_size, "files": sum(map(len, per_class.values()))},
        lambda: _decode(folder, classes, image_size),
        cache_dir,
    )


def cub_splits(
    root: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    image_size: int = 84,
) -> dict[str, ImageClasses]:
    """The 100 / 50 / 50 train / validation / test classes of Chen et al. (see `load_cub`)."""
    data = load_cub(root, cache_dir, download, image_size)
    splits = split_classes(data, load_split_file("cub"))
    check_class_counts(splits, CUB_CLASSES, "CUB-200-2011", locate_data_root(root)[0] / FOLDER, "")
    return splits
