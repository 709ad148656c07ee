"""What the few-shot image benchmarks share: the decode-once cache of a benchmark, its splits,
archive checks and downloads, and the class-split files shipped with the package.

Every benchmark is decoded once into one uint8 tensor `[N, 3, H, W]` (images sorted by class) and
cached with the shared image layer (`lightning_meta.data.images`: its decoding, cache key,
atomic write and memory-mapped read, as Omniglot's and the image folders'); sampling an episode
is tensor indexing into one `ImageClasses` per split. The whole decode-and-cache step of a
reader is one function, `decode_cached`.

Nothing here imports Lightning.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lightning_meta.data.images import (
    DATA_ENV,
    ImageClasses,
    cache_key,
    default_cache_dir,
    download,
    files_fingerprint,
    is_uint8_images,
    locate_data_root,
    read_cache,
    write_cache,
)

__all__ = [
    "SPLITS",
    "BenchmarkData",
    "decode_cached",
    "fetch",
    "gdrive_url",
    "load_split_file",
    "md5_of",
    "prepare_archive",
    "split_classes",
]

SPLITS = ("train", "val", "test")
DOWNLOAD_TIMEOUT_S = 10.0
_CACHE_FORMAT = 2
"""Bump when decoding or the cache's contents change, so old caches are not read (2: the key of
`images.cache_key`)."""


def root_hint(folder: str) -> str:
    """How to point the readers at a copy of a dataset: the settings, named."""
    return (
        f"pass `--data.root /path/to/folder` (the folder that holds `{folder}/`), set {DATA_ENV}=/path/to/folder, "
        "or pass `--data.download true` on a machine with a network"
    )


def benchmark_dir(root: str | os.PathLike[str] | None, folder: str) -> tuple[Path, str]:
    """`<data root>/<folder>` and a phrase saying where the data root came from."""
    data_root, origin = locate_data_root(root)
    return data_root / folder, origin


# ---------------------------------------------------------------------------------- archives


def gdrive_url(file_id: str) -> str:
    """A direct-download URL of a public Google Drive file (large files need `confirm=t`)."""
    return f"https://drive.usercontent.google.com/download?id={file_id}&export=download&confirm=t"


def md5_of(path: Path) -> str:
    """The md5 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(url: str, dest: Path, md5: str | None, what: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Download `url` to `dest` (atomically, md5 checked) or raise an error naming both and the fix.

    Uses the shared download helper (`lightning_meta.data.images.download`).
    """
    try:
        download(url, dest, md5, timeout)
    except RuntimeError as e:  # the checksum did not match: the message names the URL and dest
        raise RuntimeError(f"{what}: {e}") from e
    except Exception as e:  # URLError, timeouts, a read-only folder, ...
        raise RuntimeError(
            f"could not download {what} from {url} to {dest}: {e}. Without a network, fetch it by hand and put "
            f"it at {dest} (or its extracted files beside it), or point `--data.root` (or {DATA_ENV}) at a folder "
            "that holds them."
        ) from e


def _extract(archive: Path, dest: Path) -> None:
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: refuse links and paths outside dest
            tar.extractall(dest, filter="data")
        else:  # pragma: no cover - older Pythons
            tar.extractall(dest)


def prepare_archive(
    archive: Path,
    url: str,
    md5: str,
    what: str,
    download: bool,
    looked_for: Sequence[Path],
    hint: str,
) -> None:
    """Make the extracted files of `archive` exist: extract a local archive after checking its md5,
    or download it first when `download` is set; otherwise raise a `FileNotFoundError` naming
    `looked_for` and the fix.

    A local archive is checked because a damaged or truncated one would fail later with an
    obscure unpickling or decoding error; extracted files are never checked (they may have been
    repackaged).
    """
    if archive.is_file():
        found = md5_of(archive)
        if found != md5:
            raise RuntimeError(
                f"{archive} has md5 {found}, expected {md5} ({what}, from {url}): the file is damaged, "
                "truncated or a different release. Delete it and download it again (`--data.download true`), "
                "or extract a good copy beside it."
            )
    elif download:
        fetch(url, archive, md5, what)
    else:
        listed = "\n  ".join(str(p) for p in [*looked_for, archive])
        raise FileNotFoundError(f"{what} not found; looked for:\n  {listed}\nTo fix it: {hint}")
    _extract(archive, archive.parent)


def load_split_file(name: str) -> dict[str, list[str]]:
    """A class split shipped with the package (`splits/<name>.json`): class names per split."""
    text = resources.files("lightning_meta.data.benchmarks").joinpath("splits", f"{name}.json").read_text()
    data = json.loads(text)
    return {split: list(data[split]) for split in SPLITS}


def read_pickle(path: Path, encoding: str = "latin1") -> object:
    """Unpickle a dataset file (Python 2 pickles need `encoding`), naming the file on failure."""
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding=encoding)
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError, IndexError) as e:
        raise ValueError(f"{path} is not a readable pickle ({e}): the file is damaged; replace it") from e


# ---------------------------------------------------------------------------------------- cache


@dataclass(frozen=True)
class BenchmarkData:
    """A decoded benchmark.

    Attributes:
        images: uint8 `[N, 3, H, W]`, sorted by class.
        counts: long `[num_classes]`: images per class, in the order of `class_names`.
        class_names: every class's name.
        class_splits: the split ("train", "val" or "test") of each class, or "" when the split is
            applied later (CIFAR-FS and FC100 share one decode of CIFAR-100).
        from_cache: whether this load read the cache instead of the source files.
        cache_path: the cache file read or written (None if it could not be written).
    """

    images: Tensor
    counts: Tensor
    class_names: list[str]
    class_splits: list[str]
    from_cache: bool
    cache_path: Path | None


def decode_cached(
    name: str,
    sources: Sequence[Path],
    params: dict[str, object],
    decode: Callable[[], dict[str, object]],
    cache_dir: str | os.PathLike[str] | None = None,
) -> BenchmarkData:
    """Decode a benchmark once and cache it; later calls with the same sources read the cache.

    The one place where a reader's decoded tensor is cached, with the shared cache of
    `lightning_meta.data.images`: the key is the sources' paths, sizes and modification times
    with `params` (e.g. the image size); the file is written atomically (`write_cache`), so
    concurrent runs never read half a cache; it is loaded memory-mapped (`read_cache`), so a
    large benchmark is paged in as used.

    Args:
        name: the cache file's prefix, e.g. "miniimagenet-84px".
        sources: the files the decode reads (their stats make the key).
        params: decoding settings that change the result.
        decode: returns `{"images": uint8 [N, 3, H, W], "counts": long [C], "class_names": [...],
            "class_splits": [...]}`.
        cache_dir: the cache's folder (default: `$LIGHTNING_META_CACHE`, else `~/.cache/lightning_meta`).
    """
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = cache_key({"format": _CACHE_FORMAT, **params, "files": files_fingerprint(None, sources)})
    path = folder / f"{name}-{key}.pt"

    def valid(payload: dict) -> bool:
        return payload.get("format") == _CACHE_FORMAT and is_uint8_images(payload["images"], 4)

    payload = read_cache(path, valid, name, mmap=True) if path.is_file() else None
    from_cache = payload is not None
    written = True
    if payload is None:
        payload = {"format": _CACHE_FORMAT, **decode()}
        written = write_cache(path, payload, name)
    return BenchmarkData(
        payload["images"],
        torch.as_tensor(payload["counts"], dtype=torch.long),
        list(payload["class_names"]),
        list(payload["class_splits"]),
        from_cache,
        path if written else None,
    )


def group_by_class(images: Tensor, labels: np.ndarray, num_classes: int) -> tuple[Tensor, Tensor]:
    """Images reordered so each class is contiguous (stable), and the count of each class."""
    labels = np.asarray(labels, dtype=np.int64)
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=num_classes)
    return images[torch.from_numpy(order)], torch.from_numpy(counts)


# ------------------------------------------------------------------------------------------ splits


def split_classes(data: BenchmarkData, split_names: dict[str, Sequence[str]] | None = None) -> dict[str, ImageClasses]:
    """One `ImageClasses` per split, sharing the decoded tensor.

    Args:
        data: the decoded benchmark.
        split_names: class names per split; None takes each class's `data.class_splits`.

    Raises:
        ValueError: a class named in `split_names` is not among the decoded classes.
    """
    starts = torch.cumsum(data.counts, 0) - data.counts
    index = {name: i for i, name in enumerate(data.class_names)}
    out = {}
    for split in SPLITS:
        if split_names is None:
            ids = [i for i, s in enumerate(data.class_splits) if s == split]
        else:
            missing = [n for n in split_names[split] if n not in index]
            if missing:
                raise ValueError(
                    f"the {split} split names classes that are not in the data: {missing[:3]}"
                    f"{' ...' if len(missing) > 3 else ''}: the copy is incomplete or another release"
                )
            ids = [index[n] for n in split_names[split]]
        ids_t = torch.tensor(ids, dtype=torch.long)
        out[split] = ImageClasses(data.images, starts[ids_t], data.counts[ids_t], [data.class_names[i] for i in ids])
    return out


def check_class_counts(
    splits: dict[str, ImageClasses], expected: dict[str, int], what: str, where: Path | str, hint: str
) -> None:
    """Refuse a copy whose splits do not have the benchmark's numbers of classes."""
    found = {s: len(splits[s]) for s in SPLITS}
    if found != expected:
        raise ValueError(
            f"{what} under {where} has {found['train']}/{found['val']}/{found['test']} train/val/test classes; "
            f"the benchmark has {expected['train']}/{expected['val']}/{expected['test']}: the copy is incomplete "
            f"or another release. {hint}"
        )
