"""Datasets without code: a folder of images per class, or any labelled torch `Dataset`, as a
`ClassDataset` that `FewShotDataModule` draws N-way K-shot tasks from (chosen in YAML).

`ImageFolderClasses` reads `<root>/<class name>/*.png|jpg|...` (one folder per class, the most
common way people keep their own images), decodes every image once with Pillow (greyscale or
RGB, Lanczos resize) into one uint8 tensor and caches it as Omniglot and the benchmarks are
(`images.py`; it is an `ImageClasses`, as the benchmarks' splits), so sampling a task is
indexing and later runs start in seconds. `DatasetClasses` wraps any
`torch.utils.data.Dataset` that yields `(x, label)`, grouping its indices by label.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_meta.data.base import ClassDataset
from lightning_meta.data.images import (
    IMAGE_SUFFIXES,
    ImageClasses,
    ImageFormat,
    cache_key,
    decode_files,
    default_cache_dir,
    files_fingerprint,
    image_files,
    is_uint8_images,
    read_cache,
    write_cache,
)

__all__ = ["DatasetClasses", "ImageFolderClasses", "class_folders"]

_CACHE_FORMAT = 1
"""Bump when the decoding or the cache's contents change, so old caches are not read."""


def class_folders(root: Path, what: str = "class folders") -> dict[str, list[Path]]:
    """`{class name: sorted image files}` of the subfolders of `root`, sorted by name; a missing
    root, no subfolder, or a subfolder without images is refused, naming the path and the fix.

    Args:
        root: the folder holding one folder per class.
        what: how to call the folders in errors (e.g. "support classes").
    """
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root} is not a folder: give the folder that holds one folder of images per class ({what})"
        )
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(
            f"{root} has no {what}: put the images of each class in a folder of their own, "
            f"{root}/<class name>/*.png (or .jpg)"
        )
    classes = {}
    for folder in folders:
        files = image_files(folder)
        if not files:
            raise ValueError(
                f"the class folder {folder} holds no images (endings {', '.join(IMAGE_SUFFIXES)}): add its "
                "images, or remove the folder"
            )
        classes[folder.name] = files
    return classes


class ImageFolderClasses(ImageClasses):
    """One class per subfolder of `root`, every image decoded once and cached as uint8.

    An `ImageClasses` (as the benchmarks' splits) whose tensor is decoded, or read from the
    cache, on first use, so building a DataModule from YAML reads no file.

    Args:
        root: the folder holding `<class name>/<image files>`.
        image_size: side of the square images after the resize (84 for mini-ImageNet-like data,
            28 for Omniglot-like drawings); give the backbone the same (Conv4's `image_size`).
        channels: 1 (greyscale) or 3 (RGB); give the backbone the same `in_channels`.
        invert: store 255 − v (ink high), for dark drawings on a white background as Omniglot's.
        classes: use only these class folders (e.g. a split), in this order; default: all, sorted.
        cache_dir: where the decoded tensor is cached (default: `$LIGHTNING_META_CACHE`, else
            `~/.cache/lightning_meta`).
        num_workers: decoding processes; None picks the usable CPUs, 0 or 1 decodes in-process.
    """

    def __init__(
        self,
        root: str,
        image_size: int = 84,
        channels: int = 3,
        invert: bool = False,
        classes: list[str] | None = None,
        cache_dir: str | None = None,
        num_workers: int | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        self.image_format = ImageFormat(image_size, channels, invert)
        self.classes, self.cache_dir, self.num_workers = classes, cache_dir, num_workers
        self._images = None
        self.from_cache = False

    def _load(self) -> None:
        found = class_folders(self.root)
        if self.classes is not None:
            missing = [c for c in self.classes if c not in found]
            if missing:
                raise ValueError(
                    f"classes {missing[:5]} have no folder in {self.root} (it has {sorted(found)[:10]}"
                    f"{' ...' if len(found) > 10 else ''}): fix the names in `classes`"
                )
            found = {c: found[c] for c in self.classes}
        files = [f for fs in found.values() for f in fs]
        counts = torch.tensor([len(fs) for fs in found.values()], dtype=torch.long)
        self.files = [f.relative_to(self.root).as_posix() for f in files]
        fmt = self.image_format
        description = {
            "format": _CACHE_FORMAT,
            "root": str(self.root.resolve()),
            "image": [fmt.image_size, fmt.channels, fmt.invert],
            "files": files_fingerprint(self.root, files),
        }
        cache_dir = Path(self.cache_dir).expanduser() if self.cache_dir is not None else default_cache_dir()
        self.cache_path = cache_dir / f"folder-{self.root.name}-{fmt.image_size}px-{cache_key(description)}.pt"
        shape = (len(files), fmt.channels, fmt.image_size, fmt.image_size)

        def valid(payload: dict) -> bool:
            return (
                payload.get("format") == _CACHE_FORMAT
                and is_uint8_images(payload["images"], 4)
                and tuple(payload["images"].shape) == shape
                and payload["files"] == self.files
            )

        payload = read_cache(self.cache_path, valid, "image folder") if self.cache_path.is_file() else None
        self.from_cache = payload is not None
        if payload is None:
            images = decode_files(files, fmt, self.num_workers, str(self.root))
            payload = {"format": _CACHE_FORMAT, "images": images, "files": self.files}
            write_cache(self.cache_path, payload, "image folder")
        self._hold(payload["images"], torch.cumsum(counts, 0) - counts, counts, list(found))


def _as_tensor(x: object) -> Tensor:
    """An example as a float tensor: tensors and arrays as they are; a PIL image as `[C, H, W]` in [0, 1]."""
    if isinstance(x, Tensor):
        return x.float()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x).float()
    if hasattr(x, "getbands"):  # a PIL image, without importing PIL for it
        array = np.asarray(x, dtype=np.uint8)
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        return torch.from_numpy(array.copy()).float().div_(255.0)
    raise TypeError(f"DatasetClasses: an example is a {type(x).__name__}; give tensors, numpy arrays or PIL images")


class DatasetClasses(ClassDataset):
    """Any `torch.utils.data.Dataset` yielding `(x, label)`, grouped by label into classes.

    Labels (ints, or 0-d tensors) are read once: from the dataset's `targets` attribute when it
    has one (as torchvision's datasets), else by iterating over it. Class `c` is the `c`-th
    distinct label in sorted order.

    Args:
        dataset: the dataset (in YAML, its own `class_path` and `init_args`).
        labels: restrict to these labels (e.g. a split of the classes); default: all.
        preload: hold every example in memory as one tensor (fast tasks; for datasets that fit),
            else index the dataset on every task.
    """

    def __init__(self, dataset: Dataset, labels: Sequence[int] | None = None, preload: bool = True) -> None:
        self.dataset = dataset
        targets = getattr(dataset, "targets", None)
        if targets is None:
            targets = [dataset[i][1] for i in range(len(dataset))]  # type: ignore[arg-type]
        all_labels = np.array([int(t) for t in targets], dtype=np.int64)
        chosen = sorted(set(all_labels.tolist())) if labels is None else list(labels)
        absent = [label for label in chosen if label not in set(all_labels.tolist())]
        if not chosen or absent:
            raise ValueError(
                f"DatasetClasses: labels {absent or chosen} have no example in the {type(dataset).__name__} "
                f"of {len(all_labels)} examples: choose labels it has"
            )
        self.labels = chosen
        self.indices = [np.flatnonzero(all_labels == label) for label in chosen]
        self._num_examples = np.array([len(i) for i in self.indices], dtype=np.int64)
        self.data: Tensor | None = None
        if preload:
            order = np.concatenate(self.indices)
            self.data = torch.stack([_as_tensor(dataset[int(i)][0]) for i in order])
            self.offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(self._num_examples)[:-1]]))

    @property
    def num_examples(self) -> np.ndarray:
        """Examples per class, `[num_classes]`."""
        return self._num_examples

    def examples(self, class_ids: Tensor, example_ids: Tensor) -> Tensor:
        """float `[C, E, *x.shape]`."""
        class_ids = torch.as_tensor(class_ids, dtype=torch.long)
        example_ids = torch.as_tensor(example_ids, dtype=torch.long)
        if self.data is not None:
            return self.data[self.offsets[class_ids].unsqueeze(1) + example_ids]
        rows = [
            torch.stack([_as_tensor(self.dataset[int(self.indices[c][e])][0]) for e in es.tolist()])
            for c, es in zip(class_ids.tolist(), example_ids, strict=True)
        ]
        return torch.stack(rows)

    def class_names(self) -> list[str]:
        """The labels, as text, in class order."""
        return [str(label) for label in self.labels]
