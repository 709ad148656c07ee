"""The shared image layer: decode once with Pillow, cache as one uint8 tensor, read by indexing.

Every image reader (Omniglot, `ImageFolderClasses`, the `predict` folders) goes through here, so
they decode alike (mode first, then a Lanczos resize: Pillow resizes a 1-bit image
nearest-neighbour whatever filter is asked) and cache alike: the decoded tensor is saved with
`torch.save` under a key of the source files' names, sizes and modification times, written
atomically, and a stale, truncated or foreign cache is ignored with a warning and decoded again.
Decoding thousands of images runs in a process pool; a damaged file is named in the error.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import pickle
import sys
import tempfile
import urllib.request
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = [
    "CACHE_ENV",
    "DATA_ENV",
    "IMAGE_SUFFIXES",
    "ImageFormat",
    "cache_key",
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


def read_image_file(path: Path, image_size: int, mode: str = "L", invert: bool = False) -> np.ndarray:
    """`decode_image` of a file, as uint8 `[C, S, S]`; a file Pillow cannot read is named in a
    ValueError with the fix."""
    try:
        array = decode_image(path.read_bytes(), image_size, mode, invert)
    except Exception as e:
        raise ValueError(
            f"could not read {path} as an image ({type(e).__name__}: {e}): replace or remove the file "
            f"(readable endings: {', '.join(IMAGE_SUFFIXES)})"
        ) from e
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


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
    if num_workers <= 1 or not use_pool:
        return [fn(job) for job in jobs]
    # fork starts workers instantly; spawn re-imports torch in each (seconds), still worth it.
    import multiprocessing

    method = "fork" if sys.platform == "linux" else "spawn"
    try:
        pool = multiprocessing.get_context(method).Pool(num_workers)
    except (AssertionError, OSError, ValueError) as e:  # e.g. inside a daemonic DataLoader worker
        log.info("decoding %s without a process pool (%s)", what, e)
        return [fn(job) for job in jobs]
    with pool:
        return pool.map(fn, jobs, chunksize=1)


# ------------------------------------------------------------------------------------------- cache


def cache_key(description: Any) -> str:
    """A short key for a JSON-able description of what was decoded and how."""
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:24]


def files_fingerprint(base: Path, files: Sequence[Path]) -> list:
    """Names (relative to `base`), sizes and modification times: what a cache key depends on."""
    out = []
    for file in files:
        st = file.stat()
        out.append([file.relative_to(base).as_posix(), st.st_size, st.st_mtime_ns])
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


def read_cache(path: Path, valid: Callable[[dict], bool], what: str) -> dict | None:
    """The cached payload, or None (with a warning naming `what`, e.g. "Omniglot") when it is
    unreadable or `valid(payload)` is false."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
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
