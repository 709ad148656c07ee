"""Omniglot as a class-indexed dataset: 1623 handwritten characters, 20 drawings each.

Why this data and this protocol:

- Omniglot (Lake, Salakhutdinov & Tenenbaum, "Human-level concept learning through probabilistic
  program induction", Science 2015) has many classes with few examples each, the "transpose of
  MNIST", which made it the standard few-shot benchmark. Its two official archives are
  `images_background` (30 alphabets, 964 characters) and `images_evaluation` (20 alphabets,
  659 characters), 105x105 1-bit PNGs.
- Vinyals et al. (Matching Networks, 2016) resized the drawings to 28x28, split the characters
  1200 (train + validation) / 423 (test) and made every rotation by a multiple of 90 degrees a
  class of its own; MAML and Prototypical Networks kept that protocol, and the published numbers
  are comparable only under it. The split files of Prototypical Networks (1028 train / 172 val /
  423 test characters, `Alphabet/characterNN/rotDDD` per line) fix that split; without them a
  seeded split of the same sizes is drawn, ignoring alphabets.

The whole dataset is decoded once into a single uint8 tensor `[1623, 20, S, S]` (ink high),
cached by the shared decode-once layer (`images.py`) under a key of the source files' names, sizes
and modification times, so sampling an episode is tensor indexing and later runs load in well
under a second. This file keeps only what is Omniglot's: its archives, layout, splits and rotations.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import math
import os
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lightning_meta.data.base import ClassDataset
from lightning_meta.data.images import (
    DATA_ENV,
    cache_key,
    decode_image,
    decode_in_pool,
    default_cache_dir,
    default_workers,
    download,
    files_fingerprint,
    is_uint8_images,
    locate_data_root,
    read_cache,
    write_cache,
)

__all__ = [
    "OMNIGLOT_CHARACTERS",
    "OmniglotClasses",
    "OmniglotData",
    "decode_png",
    "default_cache_dir",
    "download_omniglot",
    "load_omniglot",
    "locate_data_root",
    "omniglot_splits",
    "resolve_data_root",
    "with_rotations",
]

log = logging.getLogger(__name__)

PARTS = ("images_background", "images_evaluation")
"""The two official archives, in the order their characters are stacked."""
OMNIGLOT_CHARACTERS = 1623
"""Characters in the full dataset (964 background + 659 evaluation)."""
DRAWINGS_PER_CHARACTER = 20
ROTATIONS = 4
SPLIT_NAMES = ("train", "val", "trainval", "test")
TRAIN_SPLITS = ("train", "trainval")
FALLBACK_SIZES = {"train": 1028, "val": 172, "test": 423}
"""Characters per split of the seeded fallback: the sizes of the Vinyals split."""

ZIP_RESOURCES: dict[str, tuple[str, str]] = {
    "images_background": (
        "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/images_background.zip",
        "68d2efa1b9178cc56df9314c21c6e718",
    ),
    "images_evaluation": (
        "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/images_evaluation.zip",
        "6b91aef0f799c5bb55b94e3f2daec811",
    ),
}
"""(URL, md5) of the official archives; the md5s are torchvision's `Omniglot.zips_md5`."""
SPLIT_URL = (
    "https://raw.githubusercontent.com/jakesnell/prototypical-networks/master/data/omniglot/splits/vinyals/{name}.txt"
)
"""The Vinyals split files as Prototypical Networks publishes them (no checksum is known)."""
DOWNLOAD_TIMEOUT_S = 10.0

_CACHE_FORMAT = 1
"""Bump when the decoding or the cache's contents change, so old caches are not read."""
_MIN_IMAGES_FOR_POOL = 2000
"""Below this many PNGs a process pool costs more than it saves."""
_FIX_HINT = (
    "pass `--data.root /path/to/folder` (the folder that holds `omniglot/`), set "
    f"{DATA_ENV}=/path/to/folder, or pass `--data.download true` on a machine with a network"
)


# --------------------------------------------------------------------------------------- locations


def resolve_data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The folder that holds `omniglot/`.

    Args:
        root: an explicit folder; wins when given.

    Returns:
        `root` if given, else the environment variable `LIGHTNING_META_DATA`, else `Path("data")`.
    """
    return locate_data_root(root)[0]


# ---------------------------------------------------------------------------------------- download


def download_omniglot(
    root: str | os.PathLike[str] | None = None,
    splits: bool = True,
    timeout: float = DOWNLOAD_TIMEOUT_S,
) -> Path:
    """Download what is missing of Omniglot into `<root>/omniglot/`.

    An archive is fetched only when neither `<part>.zip` nor an extracted `<part>/` folder is
    present, and its md5 is checked (local copies are never checked: they may be repackaged).
    The Vinyals split files are optional: a failure to fetch them only warns.

    Args:
        root: the folder to hold `omniglot/` (see `resolve_data_root`).
        splits: also fetch `splits/vinyals/{train,val,trainval,test}.txt` when missing.
        timeout: seconds to wait on the network before giving up.

    Returns:
        The `omniglot/` folder.

    Raises:
        RuntimeError: an archive could not be fetched or failed its checksum.
    """
    base = resolve_data_root(root) / "omniglot"
    for part in PARTS:
        if (base / f"{part}.zip").is_file() or (base / part).is_dir():
            continue
        url, md5 = ZIP_RESOURCES[part]
        dest = base / f"{part}.zip"
        log.info("downloading %s to %s", url, dest)
        try:
            download(url, dest, md5, timeout)
        except RuntimeError:
            raise
        except Exception as e:  # URLError, timeouts, a read-only folder, ...
            raise RuntimeError(
                f"could not download Omniglot's {part} from {url} to {dest}: {e}. Without a network, copy "
                f"{part}.zip (or its extracted folder) into {base}/ by hand, or point `--data.root` "
                f"(or {DATA_ENV}) at a folder whose omniglot/ holds both archives."
            ) from e
    split_dir = base / "splits" / "vinyals"
    if splits and not all((split_dir / f"{name}.txt").is_file() for name in SPLIT_NAMES):
        try:
            for name in SPLIT_NAMES:
                if not (split_dir / f"{name}.txt").is_file():
                    download(SPLIT_URL.format(name=name), split_dir / f"{name}.txt", None, timeout)
        except (OSError, ValueError, http.client.HTTPException) as e:  # URLError and timeouts are OSErrors
            warnings.warn(
                f"could not download the Vinyals split files from {SPLIT_URL.format(name='*')} into "
                f"{split_dir}: {e}. A seeded split of the same sizes will be used instead; copy the "
                "files there by hand to train on the standard split.",
                stacklevel=2,
            )
    return base


# ---------------------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class _Source:
    """One of the two parts, as a zip file or an extracted folder."""

    part: str
    path: Path
    is_zip: bool

    def fingerprint(self) -> list:
        """What the cache key depends on: names, sizes and modification times of the files."""
        if self.is_zip:
            st = self.path.stat()
            return [self.part, str(self.path.resolve()), st.st_size, st.st_mtime_ns]
        files = files_fingerprint(self.path, sorted(_folder_pngs(self.path)))
        return [self.part, str(self.path.resolve()), files]


def _find_sources(root: Path, origin: str) -> list[_Source]:
    """Locate both parts under `<root>/omniglot/`, zip first, or raise a FileNotFoundError."""
    base = root / "omniglot"
    sources, missing = [], []
    for part in PARTS:
        zip_path, folder = base / f"{part}.zip", base / part
        if zip_path.is_file():
            sources.append(_Source(part, zip_path, True))
        elif folder.is_dir():
            sources.append(_Source(part, folder, False))
        else:
            missing.append(f"{zip_path} (or the extracted folder {folder}/)")
    if missing:
        where = "" if base.is_dir() else f" ({base} does not exist)"
        raise FileNotFoundError(
            f"Omniglot not found under the data root {root.resolve()}, taken from {origin}{where}. "
            f"Looked for: {'; '.join(missing)}. To fix: {_FIX_HINT}."
        )
    return sources


def _skip(parts: Sequence[str]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _folder_pngs(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*.png") if not _skip(p.relative_to(folder).parts)]


def _list_members(source: _Source) -> list[str]:
    """The PNGs of a part: member names inside the zip, or paths relative to the folder."""
    if source.is_zip:
        try:
            with zipfile.ZipFile(source.path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise ValueError(
                f"{source.path} is not a readable zip archive ({e}). Replace it with a good copy of "
                f"{source.part}.zip (or its extracted folder), or delete it and pass `--data.download true`."
            ) from e
        return [n for n in names if n.lower().endswith(".png") and not _skip(n.split("/"))]
    return [p.relative_to(source.path).as_posix() for p in _folder_pngs(source.path)]


def _group_characters(source: _Source, members: list[str]) -> dict[str, list[str]]:
    """`{"Alphabet/characterNN": sorted member names}` from `.../<Alphabet>/<character>/<file>.png`."""
    chars: dict[str, list[str]] = {}
    for member in members:
        parts = member.split("/")
        if len(parts) < 3:
            raise ValueError(
                f"{member!r} in {source.path} is not laid out as <Alphabet>/<characterNN>/<file>.png "
                f"under {source.part}/: this is not an Omniglot archive"
            )
        chars.setdefault(f"{parts[-3]}/{parts[-2]}", []).append(member)
    return {name: sorted(chars[name]) for name in sorted(chars)}


def decode_png(data: bytes, image_size: int) -> np.ndarray:
    """One drawing as uint8 `[S, S]`, ink high: greyscale first, then Lanczos, then inverted."""
    return decode_image(data, image_size, "L", invert=True)


def _decode_chunk(job: tuple[str, bool, list[str], int]) -> np.ndarray:
    """Decode some PNGs of one source (runs in a worker process): uint8 `[n, S, S]`."""
    path, is_zip, members, image_size = job
    out = np.empty((len(members), image_size, image_size), dtype=np.uint8)
    with zipfile.ZipFile(path) if is_zip else contextlib.nullcontext() as z:
        for i, member in enumerate(members):
            try:
                data = z.read(member) if is_zip else (Path(path) / member).read_bytes()
                out[i] = decode_png(data, image_size)
            except Exception as e:
                what = f"member {member!r} of {path}" if is_zip else f"{Path(path) / member}"
                raise ValueError(
                    f"could not decode {what} as a PNG ({type(e).__name__}: {e}). The copy is damaged: "
                    "replace it with a good one, or delete it and pass `--data.download true`."
                ) from e
    return out


def _decode_all(jobs: list[tuple[str, bool, list[str], int]], num_workers: int) -> list[np.ndarray]:
    """Decode the jobs in order, in a process pool when it pays off."""
    total = sum(len(job[2]) for job in jobs)
    return decode_in_pool(_decode_chunk, jobs, num_workers, total >= _MIN_IMAGES_FOR_POOL, "Omniglot")


# ------------------------------------------------------------------------------------------- cache


def _cache_key(sources: list[_Source], image_size: int) -> str:
    return cache_key({"format": _CACHE_FORMAT, "image_size": image_size, "sources": [s.fingerprint() for s in sources]})


def _read_cache(path: Path, image_size: int) -> dict | None:
    """The cached payload, or None (with a warning) when it is unreadable or not what we wrote."""

    def valid(payload: dict) -> bool:
        images, names, parts = payload["images"], payload["names"], payload["parts"]
        return (
            payload.get("format") == _CACHE_FORMAT
            and is_uint8_images(images, 4)
            and tuple(images.shape[2:]) == (image_size, image_size)
            and len(names) == len(parts) == images.shape[0]
        )

    return read_cache(path, valid, "Omniglot")


def _write_cache(path: Path, payload: dict) -> bool:
    return write_cache(path, payload, "Omniglot")


# -------------------------------------------------------------------------------------------- load


@dataclass(frozen=True)
class OmniglotData:
    """All drawings of a copy of Omniglot, decoded.

    Attributes:
        images: uint8 `[num_characters, drawings, S, S]`, ink high (255 - greyscale).
        names: `"Alphabet/characterNN"` per character: background part first, then evaluation,
            alphabets and characters sorted within each.
        parts: the part (`"images_background"` or `"images_evaluation"`) of each character.
        from_cache: whether this load read the decoded cache instead of the PNGs.
        cache_path: the cache file read or written (None if it could not be written).
    """

    images: Tensor
    names: list[str]
    parts: list[str]
    from_cache: bool
    cache_path: Path | None


def load_omniglot(
    root: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    image_size: int = 28,
    expected_characters: int | None = OMNIGLOT_CHARACTERS,
    num_workers: int | None = None,
) -> OmniglotData:
    """Decode Omniglot from `<root>/omniglot/`, or read the cache of an earlier decode.

    Each part is read from `<part>.zip` if present, else from the extracted `<part>/` folder
    (layout `<Alphabet>/characterNN/<file>.png`). Each PNG is converted to greyscale, resized
    with Lanczos to `image_size` square, and inverted so ink is high.

    Args:
        root: the folder that holds `omniglot/` (see `resolve_data_root`).
        cache_dir: where to cache the decoded tensor (default: `default_cache_dir()`).
        download: fetch missing archives first (needs a network; see `download_omniglot`).
        image_size: side of the square images.
        expected_characters: refuse a copy with another number of characters (or other than 20
            drawings per character); None accepts any complete-looking copy (for tests and subsets).
        num_workers: processes for decoding; None picks the usable CPUs, 0 or 1 decodes in-process.

    Returns:
        The decoded data, with `from_cache` telling whether the cache was used.

    Raises:
        FileNotFoundError: no Omniglot under the root; the message lists the paths looked for.
        ValueError: a corrupt archive or PNG (named), or an unexpected number of characters.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size={image_size!r} must be a positive integer, e.g. 28")
    data_root, origin = locate_data_root(root)
    if download:
        download_omniglot(data_root, splits=False)
    sources = _find_sources(data_root, origin)
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache_path = cache_dir / f"omniglot-{image_size}px-{_cache_key(sources, image_size)}.pt"

    if cache_path.is_file() and (payload := _read_cache(cache_path, image_size)) is not None:
        data = OmniglotData(payload["images"], list(payload["names"]), list(payload["parts"]), True, cache_path)
        _check_counts(data.images.shape, data.names, data.parts, expected_characters, sources)
        return data

    names, parts, jobs, drawings = [], [], [], []
    for source in sources:
        chars = _group_characters(source, _list_members(source))
        if not chars:
            raise ValueError(f"no PNG files found in {source.path}: this is not an Omniglot {source.part}")
        counts = {name: len(members) for name, members in chars.items()}
        usual = max(set(counts.values()), key=list(counts.values()).count)
        odd = [f"{name} ({n})" for name, n in counts.items() if n != usual]
        if odd:
            raise ValueError(
                f"most characters in {source.path} have {usual} drawings but {', '.join(odd[:3])}"
                f"{' ...' if len(odd) > 3 else ''} do not: the copy is incomplete; replace it with a good one"
            )
        names += list(chars)
        parts += [source.part] * len(chars)
        drawings.append(usual)
        jobs.append((str(source.path), source.is_zip, [m for members in chars.values() for m in members]))
    if len(set(drawings)) != 1:
        raise ValueError(
            f"the parts of Omniglot under {data_root} have different numbers of drawings per character: "
            + ", ".join(f"{d} in {s.path}" for d, s in zip(drawings, sources, strict=True))
        )
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"characters {dup[:3]} appear in both {PARTS[0]} and {PARTS[1]}: not an Omniglot copy")
    shape = (len(names), drawings[0], image_size, image_size)
    _check_counts(shape, names, parts, expected_characters, sources)

    workers = default_workers() if num_workers is None else num_workers
    chunk = max(1, math.ceil(sum(len(j[2]) for j in jobs) / (max(workers, 1) * 4)))
    chunks = [
        (path, is_zip, members[i : i + chunk], image_size)
        for path, is_zip, members in jobs
        for i in range(0, len(members), chunk)
    ]
    flat = np.concatenate(_decode_all(chunks, workers))
    images = torch.from_numpy(flat).reshape(shape)
    payload = {"format": _CACHE_FORMAT, "images": images, "names": names, "parts": parts}
    written = _write_cache(cache_path, payload)
    return OmniglotData(images, names, parts, False, cache_path if written else None)


def _check_counts(
    shape: Sequence[int],
    names: list[str],
    parts: list[str],
    expected_characters: int | None,
    sources: list[_Source],
) -> None:
    if expected_characters is None:
        return
    if shape[0] != expected_characters or shape[1] != DRAWINGS_PER_CHARACTER:
        per_part = ", ".join(f"{parts.count(s.part)} in {s.path}" for s in sources)
        raise ValueError(
            f"found {shape[0]} characters with {shape[1]} drawings each ({per_part}); Omniglot has "
            f"{expected_characters} characters (964 background + 659 evaluation) of "
            f"{DRAWINGS_PER_CHARACTER} drawings: the copy is incomplete or not Omniglot. Replace it with the "
            "official archives (or pass expected_characters=None to load a subset on purpose)."
        )


# ------------------------------------------------------------------------------------ class dataset


class OmniglotClasses(ClassDataset):
    """Omniglot classes: (character, rotation by k quarter turns) pairs over a shared image tensor.

    Args:
        images: uint8 `[num_characters, drawings, S, S]`, ink high; shared, not copied.
        table: long `[num_classes, 2]`: character index and rotation k in 0..3 of each class.
        character_names: `"Alphabet/characterNN"` per character, for `class_names`.
    """

    def __init__(self, images: Tensor, table: Tensor, character_names: Sequence[str]) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [characters, drawings, S, S], got {images.dtype} {images.shape}")
        table = torch.as_tensor(table, dtype=torch.long)
        if table.dim() != 2 or table.shape[1] != 2:
            raise ValueError(f"table must be [num_classes, 2] (character, rotation), got {tuple(table.shape)}")
        if len(table) and (table[:, 0].min() < 0 or table[:, 0].max() >= len(images)):
            raise ValueError(f"table names characters outside 0..{len(images) - 1}")
        if len(table) and (table[:, 1].min() < 0 or table[:, 1].max() >= ROTATIONS):
            raise ValueError("table rotations must be in 0..3 (quarter turns counter-clockwise)")
        if len(character_names) != len(images):
            raise ValueError(f"{len(character_names)} character names for {len(images)} characters")
        self.images = images
        self.table = table
        self.character_names = list(character_names)
        self._num_examples = np.full(len(table), images.shape[1], dtype=np.int64)

    @property
    def num_examples(self) -> np.ndarray:
        """Drawings per class (20 for every Omniglot class), shape `[num_classes]`."""
        return self._num_examples

    @property
    def characters(self) -> Tensor:
        """The distinct character indices used by these classes, sorted."""
        return torch.unique(self.table[:, 0])

    def examples(self, class_ids: Tensor, example_ids: Tensor) -> Tensor:
        """Drawings `example_ids[i, j]` of class `class_ids[i]`, rotated as the class says.

        Args:
            class_ids: long `[C]`.
            example_ids: long `[C, E]`, each in 0..19.

        Returns:
            float32 `[C, E, 1, S, S]` in [0, 1], ink 1, background 0.
        """
        class_ids = torch.as_tensor(class_ids, dtype=torch.long)
        example_ids = torch.as_tensor(example_ids, dtype=torch.long)
        rows = self.table[class_ids]
        x = self.images[rows[:, 0].unsqueeze(1), example_ids]  # [C, E, S, S], a fresh tensor
        ks = rows[:, 1]
        for k in range(1, ROTATIONS):
            mask = ks == k
            if bool(mask.any()):
                x[mask] = torch.rot90(x[mask], k, dims=(-2, -1))
        return x.unsqueeze(2).to(torch.float32).div_(255.0)

    def class_names(self) -> list[str]:
        """`"Alphabet/characterNN/rotDDD"` per class, as in the Vinyals split files."""
        return [f"{self.character_names[c]}/rot{90 * k:03d}" for c, k in self.table.tolist()]


# ------------------------------------------------------------------------------------------ splits


def _read_split_file(path: Path, index: dict[str, int]) -> Tensor:
    """Class table `[n, 2]` from the lines `Alphabet/characterNN/rotDDD` of a split file."""
    rows = []
    for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        char, _, rot = line.rpartition("/")
        if not rot.startswith("rot") or not rot[3:].isdigit() or int(rot[3:]) not in (0, 90, 180, 270):
            raise ValueError(f"{path}:{lineno}: {line!r} does not end in a rotation rot000, rot090, rot180 or rot270")
        if char not in index:
            raise ValueError(
                f"{path}:{lineno}: character {char!r} of {line!r} is not in the Omniglot images under "
                f"{path.parents[2]}: the split file does not match the images (fix or delete the split files)"
            )
        rows.append((index[char], int(rot[3:]) // 90))
    if not rows:
        raise ValueError(f"{path} lists no classes")
    return torch.tensor(rows, dtype=torch.long)


def with_rotations(characters: np.ndarray) -> Tensor:
    """Class table `[4·C, 2]` of (character index, quarter turns): each character in 4 rotations.

    Row `4·i + r` is character `characters[i]` turned by `r` × 90°, the class definition of
    Santoro et al. and Vinyals et al.
    """
    chars = torch.as_tensor(characters, dtype=torch.long)
    return torch.stack([chars.repeat_interleave(ROTATIONS), torch.arange(ROTATIONS).repeat(len(chars))], dim=1)


def omniglot_splits(
    root: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    image_size: int = 28,
    train_split: str = "train",
    seed: int = 0,
) -> dict[str, OmniglotClasses]:
    """The train, validation and test classes of Omniglot, every rotation a class.

    With the Vinyals split files in `<root>/omniglot/splits/vinyals/` (1028 / 172 / 423
    characters: 4112 / 688 / 1692 classes), the classes are the files' lines. Without them, a
    seeded split of the same sizes, ignoring alphabets: a permutation of the 1623 characters whose
    first 1200 are train + validation (1028 + 172) and last 423 test, 4 rotations each.

    Args:
        root: the folder that holds `omniglot/` (see `resolve_data_root`).
        cache_dir: where the decoded images are cached (default: `default_cache_dir()`).
        download: fetch missing archives and split files first (needs a network).
        image_size: side of the square images.
        train_split: `"train"` (1028 characters) or `"trainval"` (train + validation, 1200).
        seed: seed of the fallback split; unused with split files.

    Returns:
        `{"train": ..., "val": ..., "test": ...}`, all sharing one image tensor.

    Raises:
        ValueError: a bad `train_split`, or a split file naming an unknown character.
        FileNotFoundError: no Omniglot under the root.
    """
    if train_split not in TRAIN_SPLITS:
        raise ValueError(f"train_split={train_split!r} is not one of {', '.join(map(repr, TRAIN_SPLITS))}")
    data_root = resolve_data_root(root)
    if download:
        download_omniglot(data_root, splits=True)
    data = load_omniglot(data_root if root is not None else None, cache_dir, False, image_size)
    split_dir = data_root / "omniglot" / "splits" / "vinyals"
    wanted = {"train": train_split, "val": "val", "test": "test"}
    if split_dir.is_dir():
        missing = [str(split_dir / f"{f}.txt") for f in wanted.values() if not (split_dir / f"{f}.txt").is_file()]
        if missing:
            raise FileNotFoundError(
                f"the split folder {split_dir} lacks {', '.join(missing)}: add the Vinyals split files, or "
                "remove the folder to use a seeded split of the same sizes"
            )
        index = {name: i for i, name in enumerate(data.names)}
        tables = {key: _read_split_file(split_dir / f"{f}.txt", index) for key, f in wanted.items()}
    else:
        log.info("no split files in %s: using a seeded split (seed %d) of the Vinyals sizes", split_dir, seed)
        perm = np.random.default_rng(seed).permutation(len(data.names))
        n_train, n_val = FALLBACK_SIZES["train"], FALLBACK_SIZES["val"]
        trainval = perm[: n_train + n_val]
        chars = {
            "train": trainval if train_split == "trainval" else trainval[:n_train],
            "val": trainval[n_train:],
            "test": perm[n_train + n_val :],
        }
        tables = {key: with_rotations(c) for key, c in chars.items()}
    return {key: OmniglotClasses(data.images, table, data.names) for key, table in tables.items()}
