"""The shared image layer: decode once with Pillow, cache as one uint8 tensor, read by indexing.

Every image reader (Omniglot, `ImageFolderClasses`, the `predict` folders, the benchmark readers
of `lightning_meta.data.benchmarks`) goes through here, so they decode alike (mode first, then a
Lanczos resize: Pillow resizes a 1-bit image nearest-neighbour whatever filter is asked) and
cache alike: the decoded tensor is saved with `torch.save` under a key of the source files'
names, sizes and modification times, written atomically, and a stale, truncated or foreign
cache is ignored with a warning and decoded again (a large one may be memory-mapped). Decoding
thousands of images runs in a process pool; a damaged file is named in the error. Classes held
in one such tensor are an `ImageClasses`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import pickle
import sys
import tempfile
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from lightning_meta.data.base import ClassDataset

__all__ = [
    "CACHE_ENV",
    "DATA_ENV",
    "IMAGE_SUFFIXES",
    "ImageClasses",
    "ImageFormat",
    "cache_key",
    "decode_files",
    "decode_image",
    "decode_in_pool",
    "default_cache_dir",
    "default_workers",
    "download",
    "files_fingerprint",
    "image_files",
    "locate_data_root",
    "read_cache",
    "read_image_file",
    "resize_uint8",
    "write_cache",
]

log = logging.getLogger(__name__)

DATA_ENV = "LIGHTNING_META_DATA"
CACHE_ENV = "LIGHTNING_META_CACHE"

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
"""File endings read as images (case-insensitive)."""

T = TypeVar("T")
R = TypeVar("R")


def locate_data_root(root: str | os.PathLike[str] | None) -> tuple[Path, str]:
    """The data root and a phrase saying where it came from: `root` if given (`--data.root`), else
    the environment variable `LIGHTNING_META_DATA`, else `./data`.

    The phrase names the setting to change, so an error about missing data can say how to fix it.
    """
    if root is not None and str(root) != "":
        return Path(root).expanduser(), "the `root` argument (`--data.root`)"
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser(), f"the environment variable {DATA_ENV}"
    return Path("data"), f"the default `data` (neither `--data.root` nor {DATA_ENV} is set)"


def default_cache_dir() -> Path:
    """Where decoded datasets are cached: `LIGHTNING_META_CACHE`, else `~/.cache/lightning_meta`."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/lightning_meta").expanduser()


def download(url: str, dest: Path, md5: str | None, timeout: float) -> None:
    """Fetch `url` into `dest` through a temporary file in the same folder; check `md5` if given.

    Raises:
        RuntimeError: the md5 differs (nothing is saved).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        digest = hashlib.md5()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if md5 is not None and digest.hexdigest() != md5:
            raise RuntimeError(
                f"the download of {url} has md5 {digest.hexdigest()}, expected {md5}: the file is damaged "
                f"or has changed upstream; nothing was saved to {dest}. Try again, or fetch it by hand."
            )
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------- decoding


def decode_image(data: bytes, image_size: int, mode: str = "L", invert: bool = False) -> np.ndarray:
    """One image as uint8 `[S, S]` ("L") or `[S, S, 3]` ("RGB"): converted to `mode` first, then
    resized with Lanczos to `image_size` square, then inverted (255 − v) if `invert` (ink high,
    for drawings on white)."""
    image = Image.open(io.BytesIO(data)).convert(mode).resize((image_size, image_size), Image.LANCZOS)
    array = np.asarray(image, dtype=np.uint8)
    return 255 - array if invert else array


def image_files(folder: Path) -> list[Path]:
    """The image files directly in `folder` (by ending, case-insensitive; hidden files skipped), sorted."""
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def read_image_file(
    path: Path | bytes, image_size: int, mode: str = "L", invert: bool = False, where: str = "an image's bytes"
) -> np.ndarray:
    """`decode_image` of a file (or of a file's bytes, e.g. held in a pickle), as uint8 `[C, S, S]`
    (contiguous); an image Pillow cannot read is named in a ValueError with the fix (the path, else
    `where`)."""
    try:
        array = decode_image(path if isinstance(path, bytes) else path.read_bytes(), image_size, mode, invert)
    except Exception as e:
        raise ValueError(
            f"could not read {where if isinstance(path, bytes) else path} as an image ({type(e).__name__}: {e}): "
            f"replace or remove the file (readable endings: {', '.join(IMAGE_SUFFIXES)})"
        ) from e
    return array[None] if array.ndim == 2 else np.ascontiguousarray(array.transpose(2, 0, 1))


def resize_uint8(images: Tensor, size: int) -> Tensor:
    """uint8 `[N, C, h, w]` already decoded (e.g. arrays from a pickle) resized to `size` square
    (bilinear, antialiased); unchanged if it already is."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def default_workers() -> int:
    """Usable CPUs, at most 16: the decoding pool's default size."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 16))


def decode_in_pool(fn: Callable[[T], R], jobs: Sequence[T], num_workers: int, use_pool: bool, what: str) -> list[R]:
    """`[fn(job) for job in jobs]`, in a process pool of `num_workers` when `use_pool` (the caller
    knows whether the job is big enough to pay for the pool's start). `fn` must be a module-level
    function (it is pickled); `what` names the data in a log line."""
    return list(_map_in_pool(fn, jobs, num_workers, use_pool, what))


def _map_in_pool(fn: Callable[[T], R], jobs: Sequence[T], num_workers: int, use_pool: bool, what: str) -> Iterator[R]:
    """`decode_in_pool`, one result at a time, in order (so a caller can copy each away)."""
    if num_workers <= 1 or not use_pool:
        yield from map(fn, jobs)
        return
    # fork starts workers instantly; spawn re-imports torch in each (seconds), still worth it.
    import multiprocessing

    method = "fork" if sys.platform == "linux" else "spawn"
    try:
        pool = multiprocessing.get_context(method).Pool(num_workers)
    except (AssertionError, OSError, ValueError) as e:  # e.g. inside a daemonic DataLoader worker
        log.info("decoding %s without a process pool (%s)", what, e)
        yield from map(fn, jobs)
        return
    with pool:
        yield from pool.imap(fn, jobs, chunksize=1)


_MIN_IMAGES_FOR_POOL = 2000
"""Below this many images a process pool costs more than it saves."""


def _decode_files(job: tuple[list[str], ImageFormat]) -> np.ndarray:
    """Decode some image files (runs in a worker process): uint8 `[n, C, S, S]`."""
    paths, image_format = job
    size = image_format.image_size
    out = np.empty((len(paths), image_format.channels, size, size), dtype=np.uint8)
    for i, path in enumerate(paths):
        out[i] = image_format.read(Path(path))
    return out


def decode_files(files: Sequence[Path], image_format: ImageFormat, num_workers: int | None, what: str) -> Tensor:
    """Image files decoded as `image_format` says, in order: uint8 `[len(files), C, S, S]`.

    In a process pool of `num_workers` (None: the usable CPUs) when there are thousands of files;
    each chunk is copied into the result as it arrives, so no second copy of the whole is made.
    A damaged file is named in a ValueError; `what` names the data in a log line.
    """
    size = image_format.image_size
    out = torch.empty((len(files), image_format.channels, size, size), dtype=torch.uint8)
    workers = default_workers() if num_workers is None else num_workers
    chunk = max(1, math.ceil(len(files) / (max(workers, 1) * 4)))
    jobs = [([str(f) for f in files[i : i + chunk]], image_format) for i in range(0, len(files), chunk)]
    start = 0
    for decoded in _map_in_pool(_decode_files, jobs, workers, len(files) >= _MIN_IMAGES_FOR_POOL, what):
        out[start : start + len(decoded)] = torch.from_numpy(decoded)
        start += len(decoded)
    return out


# ------------------------------------------------------------------------------------------- cache


def cache_key(description: Any) -> str:
    """A short key for a JSON-able description of what was decoded and how."""
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:24]


def files_fingerprint(base: Path | None, files: Sequence[Path]) -> list:
    """Names (relative to `base`; absolute, links resolved, when None), sizes and modification
    times: what a cache key depends on."""
    out = []
    for file in files:
        st = file.stat()
        name = file.resolve().as_posix() if base is None else file.relative_to(base).as_posix()
        out.append([name, st.st_size, st.st_mtime_ns])
    return out


_CACHE_READ_ERRORS = (
    OSError,
    EOFError,
    RuntimeError,
    ValueError,
    KeyError,
    TypeError,
    pickle.UnpicklingError,
)
"""What a truncated, foreign or outdated cache file raises on loading."""


def read_cache(path: Path, valid: Callable[[dict], bool], what: str, mmap: bool = False) -> dict | None:
    """The cached payload, or None (with a warning naming `what`, e.g. "Omniglot") when it is
    unreadable or `valid(payload)` is false. `mmap` maps the file's tensors instead of reading
    them, so a large dataset is paged in as it is used."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        if not isinstance(payload, dict) or not valid(payload):
            raise ValueError("unexpected contents")
        return payload
    except _CACHE_READ_ERRORS as e:
        warnings.warn(f"ignoring the unreadable {what} cache {path} ({e}); decoding again", stacklevel=3)
        return None


def write_cache(path: Path, payload: dict, what: str) -> bool:
    """Save atomically (temporary file in the same folder, then rename); warn and go on on failure."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache may be shared by a team
        os.replace(tmp, path)
        return True
    except OSError as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        warnings.warn(
            f"could not write the {what} cache {path} ({e}); the next run will decode again. Set "
            f"{CACHE_ENV} to a writable folder.",
            stacklevel=3,
        )
        return False
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise


@dataclass(frozen=True)
class ImageFormat:
    """How a dataset's images are decoded, so new images (`lightning-meta predict`) are decoded as
    the model's training images were.

    Attributes:
        image_size: side of the square images.
        channels: 1 (greyscale, Pillow mode "L") or 3 (RGB).
        invert: 255 − v (ink high, as Omniglot's drawings).
    """

    image_size: int
    channels: int = 3
    invert: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"image_size={self.image_size!r} must be a positive integer, e.g. 84")
        if self.channels not in (1, 3):
            raise ValueError(f"channels={self.channels!r} must be 1 (greyscale) or 3 (RGB)")

    @property
    def mode(self) -> str:
        """The Pillow mode images are converted to."""
        return "L" if self.channels == 1 else "RGB"

    def read(self, path: Path) -> np.ndarray:
        """One image file as uint8 `[C, S, S]` (`read_image_file`)."""
        return read_image_file(path, self.image_size, self.mode, self.invert)


def is_uint8_images(images: Any, dims: int) -> bool:
    """Whether `images` is a uint8 tensor of `dims` dimensions (a cache's sanity check)."""
    return isinstance(images, Tensor) and images.dtype == torch.uint8 and images.dim() == dims


# ---------------------------------------------------------------------------------- class dataset


class ImageClasses(ClassDataset):
    """Classes of images held in one shared uint8 tensor in which each class is contiguous: every
    decoded image reader's `ClassDataset` (the benchmarks' splits, `ImageFolderClasses`).

    A task's examples are one indexing of the tensor, converted to float in [0, 1]. A subclass
    that reads its tensor on first use (so building a DataModule from YAML reads no file) leaves
    `__init__` out, sets `_images = None` and implements `_load`, which calls `_hold`; its
    `starts`, `counts` and `names` exist once `images` has been read.

    Args:
        images: uint8 `[N, C, H, W]`; shared, not copied.
        starts: long `[num_classes]`: the index in `images` of each class's first image.
        counts: long `[num_classes]`: images per class.
        class_names: one name per class.
    """

    _images: Tensor | None = None

    def __init__(self, images: Tensor, starts: Tensor, counts: Tensor, class_names: Sequence[str]) -> None:
        self._hold(images, starts, counts, class_names)

    def _hold(self, images: Tensor, starts: Tensor, counts: Tensor, class_names: Sequence[str]) -> None:
        """Check and keep the tensor and the classes' places in it."""
        if not is_uint8_images(images, 4):
            raise ValueError(
                f"images must be uint8 [N, C, H, W], got {getattr(images, 'dtype', type(images).__name__)} "
                f"{tuple(getattr(images, 'shape', ()))}"
            )
        starts, counts = torch.as_tensor(starts, dtype=torch.long), torch.as_tensor(counts, dtype=torch.long)
        if len(starts) != len(counts) or len(counts) != len(class_names):
            raise ValueError(f"{len(starts)} starts, {len(counts)} counts and {len(class_names)} names differ")
        if len(counts) and (int(counts.min()) < 1 or int((starts + counts).max()) > len(images)):
            raise ValueError("every class needs at least one image, inside the image tensor")
        self.starts, self.counts, self.names = starts, counts, list(class_names)
        self._num_examples = counts.numpy().astype(np.int64)
        self._images = images

    def _load(self) -> None:
        """Read the tensor (lazy subclasses): call `_hold`."""
        raise NotImplementedError(f"{type(self).__name__} holds no images")

    @property
    def images(self) -> Tensor:
        """uint8 `[N, C, H, W]`, class after class (read on first use by lazy subclasses)."""
        if self._images is None:
            self._load()
        assert self._images is not None
        return self._images

    @property
    def num_examples(self) -> np.ndarray:
        """Images per class, `[num_classes]`."""
        self.images  # noqa: B018 - loads on first use
        return self._num_examples

    def examples(self, class_ids: Tensor, example_ids: Tensor) -> Tensor:
        """Images `example_ids[i, j]` of class `class_ids[i]`: float32 `[C, E, channels, H, W]` in [0, 1]."""
        images = self.images  # loads on first use, and with it the starts
        index = self.starts[torch.as_tensor(class_ids, dtype=torch.long)].unsqueeze(1)
        return images[index + torch.as_tensor(example_ids, dtype=torch.long)].to(torch.float32).div_(255.0)

    def class_names(self) -> list[str]:
        """The classes' names, in class order."""
        self.images  # noqa: B018 - loads on first use
        return list(self.names)
