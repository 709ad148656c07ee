"""Omniglot: decoding, cache, errors, splits and rotations, on the real copy and on a tiny fake one.

Tests on the real copy are marked `slow` (they read real data); the fake-copy tests are unit tests.
The real copy (`LIGHTNING_META_DATA`) is decoded once into the cache (`LIGHTNING_META_CACHE`); every
later load in this file, and in later sessions, reads that cache.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from lightning_meta.data import omniglot as om
from lightning_meta.data.base import FewShotTasks
from lightning_meta.data.omniglot import (
    OmniglotClasses,
    default_cache_dir,
    download_omniglot,
    load_omniglot,
    omniglot_splits,
    resolve_data_root,
)

# ------------------------------------------------------------------------------------ real data


@pytest.fixture(scope="module")
def real(data_root: Path) -> om.OmniglotData:
    return load_omniglot(data_root)


@pytest.fixture(scope="module")
def splits(data_root: Path, real: om.OmniglotData) -> dict[str, OmniglotClasses]:
    return omniglot_splits(data_root)


@pytest.mark.slow
def test_real_counts_and_order(real: om.OmniglotData) -> None:
    assert real.images.dtype == torch.uint8
    assert tuple(real.images.shape) == (1623, 20, 28, 28)
    assert real.images.shape[0] * real.images.shape[1] == 32_460
    assert len(set(real.names)) == len(real.names) == 1623
    assert real.parts.count("images_background") == 964
    assert real.parts.count("images_evaluation") == 659
    assert real.parts == sorted(real.parts)  # background first
    assert real.names[:964] == sorted(real.names[:964])
    assert real.names[964:] == sorted(real.names[964:])
    assert real.names[0] == "Alphabet_of_the_Magi/character01"


@pytest.mark.slow
def test_real_second_load_comes_from_cache(data_root: Path, real: om.OmniglotData) -> None:
    start = time.perf_counter()
    again = load_omniglot(data_root)
    assert again.from_cache
    assert time.perf_counter() - start < 5
    assert torch.equal(again.images, real.images)
    assert again.names == real.names
    assert again.cache_path is not None and again.cache_path.parent == default_cache_dir()


@pytest.mark.slow
def test_real_value_range(splits: dict[str, OmniglotClasses]) -> None:
    train = splits["train"]
    class_ids = torch.arange(0, len(train), 4)  # unrotated classes
    x = train.examples(class_ids, torch.arange(20).expand(len(class_ids), 20))
    assert x.dtype == torch.float32
    assert tuple(x.shape) == (len(class_ids), 20, 1, 28, 28)
    assert x.min() >= 0 and x.max() <= 1
    assert (x == 0).float().mean() > 0.6  # background is 0 and most of the image
    per_image_max = x.flatten(2).amax(-1)
    assert per_image_max.median() == 1.0  # ink is high, near 1
    assert per_image_max.min() > 0.5
    assert x.mean() < 0.2


@pytest.mark.slow
def test_real_vinyals_split(data_root: Path, splits: dict[str, OmniglotClasses]) -> None:
    assert {k: len(v) for k, v in splits.items()} == {"train": 4112, "val": 688, "test": 1692}
    chars = {k: set(v.characters.tolist()) for k, v in splits.items()}
    assert {k: len(v) for k, v in chars.items()} == {"train": 1028, "val": 172, "test": 423}
    assert not chars["train"] & chars["val"]
    assert not chars["train"] & chars["test"]
    assert not chars["val"] & chars["test"]
    assert len(chars["train"] | chars["val"] | chars["test"]) == 1623
    split_dir = data_root / "omniglot" / "splits" / "vinyals"
    for key in ("train", "val", "test"):
        lines = (split_dir / f"{key}.txt").read_text().split()
        assert splits[key].class_names() == lines
        assert np.all(splits[key].num_examples == 20)
    trainval = omniglot_splits(data_root, train_split="trainval")
    assert len(trainval["train"]) == 4800
    assert set(trainval["train"].characters.tolist()) == chars["train"] | chars["val"]
    assert trainval["train"].images is trainval["val"].images is trainval["test"].images  # shared, not copied


@pytest.mark.slow
def test_real_rotations(splits: dict[str, OmniglotClasses]) -> None:
    train = splits["train"]
    rows = [tuple(r) for r in train.table.tolist()]
    char = rows[0][0]
    other = rows[-1][0]
    class_ids = torch.tensor([rows.index((char, k)) for k in (3, 0, 2, 1)] + [rows.index((other, 2))])
    example_ids = torch.tensor([[0, 5, 19]] * 5)
    x = train.examples(class_ids, example_ids)
    base = train.examples(torch.tensor([rows.index((char, 0))] * 4 + [rows.index((other, 0))]), example_ids)
    for i, k in enumerate([3, 0, 2, 1, 2]):
        assert torch.equal(x[i], torch.rot90(base[i], k, dims=(-2, -1)))
    assert not torch.equal(x[0], base[0])
    # rot090 is a quarter turn counter-clockwise, as PIL's rotate(90) used by Prototypical Networks
    upright = (base[0, 0, 0].numpy() * 255).round().astype(np.uint8)
    turned = np.asarray(Image.fromarray(upright).rotate(90)).astype(np.float32) / 255
    assert np.array_equal(x[3, 0, 0].numpy(), turned)


@pytest.mark.slow
def test_real_few_shot_task(splits: dict[str, OmniglotClasses]) -> None:
    task = FewShotTasks(splits["train"], ways=5, shots=1, query_shots=15).sample(np.random.default_rng(0))
    assert tuple(task.support_x.shape) == (5, 1, 28, 28)
    assert tuple(task.query_x.shape) == (75, 1, 28, 28)
    assert sorted(task.support_y.tolist()) == [0, 1, 2, 3, 4]
    assert sorted(set(task.query_y.tolist())) == [0, 1, 2, 3, 4]
    assert task.query_y.tolist().count(3) == 15
    again = FewShotTasks(splits["train"], ways=5, shots=1, query_shots=15).sample(np.random.default_rng(0))
    assert torch.equal(task.query_x, again.query_x)


@pytest.fixture
def linked_root(tmp_path: Path, data_root: Path) -> Path:
    """The real zips through symlinks, without split files (the cache key follows the links)."""
    (tmp_path / "omniglot").mkdir()
    for part in om.PARTS:
        (tmp_path / "omniglot" / f"{part}.zip").symlink_to(data_root / "omniglot" / f"{part}.zip")
    return tmp_path


@pytest.mark.slow
def test_real_fallback_split(linked_root: Path, real: om.OmniglotData) -> None:
    first = omniglot_splits(linked_root, seed=0)
    assert {k: len(v) for k, v in first.items()} == {"train": 4112, "val": 688, "test": 1692}
    chars = {k: set(v.characters.tolist()) for k, v in first.items()}
    assert {k: len(v) for k, v in chars.items()} == {"train": 1028, "val": 172, "test": 423}
    assert len(chars["train"] | chars["val"] | chars["test"]) == 1623
    assert np.array_equal(np.bincount(first["test"].table[:, 1].numpy()), [423] * 4)
    same = omniglot_splits(linked_root, seed=0)
    other = omniglot_splits(linked_root, seed=1)
    for key in first:
        assert torch.equal(first[key].table, same[key].table)
        assert not torch.equal(first[key].table, other[key].table)
    trainval = omniglot_splits(linked_root, seed=0, train_split="trainval")
    assert set(trainval["train"].characters.tolist()) == chars["train"] | chars["val"]
    assert torch.equal(trainval["test"].table, first["test"].table)


@pytest.mark.slow
def test_split_file_with_unknown_character(linked_root: Path, data_root: Path, real: om.OmniglotData) -> None:
    split_dir = linked_root / "omniglot" / "splits" / "vinyals"
    split_dir.mkdir(parents=True)
    for name in ("train", "val", "test"):
        (split_dir / f"{name}.txt").write_text((data_root / "omniglot/splits/vinyals" / f"{name}.txt").read_text())
    with open(split_dir / "val.txt", "a") as f:
        f.write("Klingon/character07/rot090\n")
    with pytest.raises(ValueError, match=r"val\.txt:689.*Klingon/character07"):
        omniglot_splits(linked_root)
    (split_dir / "test.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"test\.txt"):
        omniglot_splits(linked_root)


def test_bad_train_split(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"train_split='training'.*'train', 'trainval'"):
        omniglot_splits(tmp_path, train_split="training")


# ------------------------------------------------------------------------------------ fake data

FAKE = {
    "images_background": {"Beta": 2, "Alpha": 2},
    "images_evaluation": {"Gamma": 1},
}
FAKE_NAMES = [
    "Alpha/character01",
    "Alpha/character02",
    "Beta/character01",
    "Beta/character02",
    "Gamma/character01",
]
DRAWINGS = 3


def _png(seed: int, size: int = 20) -> bytes:
    """A 1-bit drawing like Omniglot's: white background, a black stroke."""
    image = Image.new("1", (size, size), 1)
    rng = np.random.default_rng(seed)
    points = [tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(3)]
    ImageDraw.Draw(image).line(points, fill=0, width=2)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _members(part: str, salt: int = 0) -> dict[str, bytes]:
    out = {}
    for alphabet, chars in FAKE[part].items():
        for c in range(1, chars + 1):
            for d in range(1, DRAWINGS + 1):
                out[f"{part}/{alphabet}/character{c:02d}/{c:04d}_{d:02d}.png"] = _png(
                    zlib.crc32(f"{alphabet}/{c}/{d}/{salt}".encode())
                )
    return out


def _write_zip(path: Path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for part in om.PARTS:
        _write_zip(root / "omniglot" / f"{part}.zip", _members(part))
    return root


def _load(root: Path, cache: Path, **kw) -> om.OmniglotData:
    return load_omniglot(root, cache_dir=cache, image_size=8, expected_characters=None, **kw)


def test_fake_decode_and_cache(fake_root: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = _load(fake_root, cache)
    assert not first.from_cache
    assert first.names == FAKE_NAMES
    assert first.parts == ["images_background"] * 4 + ["images_evaluation"]
    assert tuple(first.images.shape) == (5, DRAWINGS, 8, 8)
    # greyscale first, then Lanczos, then inverted
    png = _members("images_background")["images_background/Alpha/character02/0002_03.png"]
    expected = 255 - np.asarray(Image.open(io.BytesIO(png)).convert("L").resize((8, 8), Image.LANCZOS))
    assert np.array_equal(first.images[1, 2].numpy(), expected)
    assert len({v for v in first.images.flatten().tolist()}) > 2  # grey levels: not a nearest-neighbour resize
    assert [p.name for p in cache.iterdir()] == [first.cache_path.name]  # no temporary files left

    second = _load(fake_root, cache)
    assert second.from_cache
    assert torch.equal(second.images, first.images)
    assert second.names == first.names and second.parts == first.parts

    other_size = load_omniglot(fake_root, cache_dir=cache, image_size=10, expected_characters=None)
    assert not other_size.from_cache and tuple(other_size.images.shape[2:]) == (10, 10)


def test_fake_stale_cache_is_not_used(fake_root: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = _load(fake_root, cache)
    zip_path = fake_root / "omniglot" / "images_evaluation.zip"
    _write_zip(zip_path, _members("images_evaluation", salt=1))
    os.utime(zip_path, ns=(1_000_000_000, 1_000_000_000))
    second = _load(fake_root, cache)
    assert not second.from_cache
    assert torch.equal(second.images[:4], first.images[:4])
    assert not torch.equal(second.images[4], first.images[4])
    assert _load(fake_root, cache).from_cache


def test_fake_truncated_cache_is_decoded_again(fake_root: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = _load(fake_root, cache)
    first.cache_path.write_bytes(first.cache_path.read_bytes()[:100])
    with pytest.warns(UserWarning, match="unreadable Omniglot cache"):
        second = _load(fake_root, cache)
    assert not second.from_cache and torch.equal(second.images, first.images)
    assert _load(fake_root, cache).from_cache


def test_fake_extracted_folder_and_pool(fake_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from_zip = _load(fake_root, tmp_path / "cache")
    zip_path = fake_root / "omniglot" / "images_background.zip"
    with zipfile.ZipFile(zip_path) as z:
        z.extractall(fake_root / "omniglot")
    zip_path.unlink()
    monkeypatch.setattr(om, "_MIN_IMAGES_FOR_POOL", 0)  # force the process pool on a tiny copy
    from_folder = _load(fake_root, tmp_path / "cache", num_workers=2)
    assert not from_folder.from_cache
    assert from_folder.names == from_zip.names
    assert torch.equal(from_folder.images, from_zip.images)


def test_fake_character_count_is_checked(fake_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"found 5 characters.*1623"):
        load_omniglot(fake_root, cache_dir=tmp_path / "cache")


def test_missing_root_names_paths_and_fixes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nowhere = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        load_omniglot(nowhere, cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert str(nowhere / "omniglot" / "images_background.zip") in message
    assert str(nowhere / "omniglot" / "images_evaluation.zip") in message
    assert "LIGHTNING_META_DATA" in message and "--data.root" in message and "--data.download true" in message

    monkeypatch.setenv("LIGHTNING_META_DATA", str(nowhere))
    assert resolve_data_root(None) == nowhere
    with pytest.raises(FileNotFoundError, match=r"environment variable LIGHTNING_META_DATA"):
        omniglot_splits(cache_dir=tmp_path / "cache")
    monkeypatch.delenv("LIGHTNING_META_DATA")
    assert resolve_data_root(None) == Path("data")
    assert resolve_data_root(tmp_path) == tmp_path


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LIGHTNING_META_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("LIGHTNING_META_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "lightning_meta"


def test_corrupt_zip_names_the_file(fake_root: Path, tmp_path: Path) -> None:
    bad = fake_root / "omniglot" / "images_evaluation.zip"
    bad.write_bytes(b"this is not a zip file" * 100)
    with pytest.raises(ValueError, match=rf"{bad}.*not a readable zip"):
        _load(fake_root, tmp_path / "cache")


@pytest.mark.parametrize("pool", [False, True])
def test_corrupt_png_names_the_member(
    fake_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pool: bool
) -> None:
    members = _members("images_background")
    members["images_background/Beta/character02/0002_02.png"] = b"\x89PNG garbage"
    _write_zip(fake_root / "omniglot" / "images_background.zip", members)
    if pool:
        monkeypatch.setattr(om, "_MIN_IMAGES_FOR_POOL", 0)
    with pytest.raises(ValueError, match=r"Beta/character02/0002_02\.png.*images_background\.zip"):
        _load(fake_root, tmp_path / "cache", num_workers=2 if pool else 0)
    assert not any((tmp_path / "cache").glob("*.pt"))


def test_uneven_drawings_are_refused(fake_root: Path, tmp_path: Path) -> None:
    members = _members("images_evaluation")
    members.pop("images_evaluation/Gamma/character01/0001_03.png")
    _write_zip(fake_root / "omniglot" / "images_evaluation.zip", members)
    with pytest.raises(ValueError, match="different numbers of drawings"):
        _load(fake_root, tmp_path / "cache")


# ------------------------------------------------------------------------------------ download


def _serve(monkeypatch: pytest.MonkeyPatch, source: Path, md5s: dict[str, str] | None = None) -> None:
    """Point the download URLs at local files (file:// URLs), with the given or the true md5s."""
    resources = {}
    for part in om.PARTS:
        path = source / "omniglot" / f"{part}.zip"
        md5 = hashlib.md5(path.read_bytes()).hexdigest() if path.is_file() else "0" * 32
        resources[part] = (path.as_uri(), (md5s or {}).get(part, md5))
    monkeypatch.setattr(om, "ZIP_RESOURCES", resources)
    monkeypatch.setattr(om, "SPLIT_URL", source.as_uri() + "/splits/{name}.txt")


def test_download_checks_md5_and_renames(fake_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert om.ZIP_RESOURCES["images_background"][1] == "68d2efa1b9178cc56df9314c21c6e718"
    assert om.ZIP_RESOURCES["images_evaluation"][1] == "6b91aef0f799c5bb55b94e3f2daec811"
    splits_src = fake_root / "splits"
    splits_src.mkdir()
    for name in om.SPLIT_NAMES:
        (splits_src / f"{name}.txt").write_text("Alpha/character01/rot000\n")
    _serve(monkeypatch, fake_root)
    target = tmp_path / "fresh"
    data = _load(target, tmp_path / "cache", download=True)
    assert data.names == FAKE_NAMES
    assert sorted(p.name for p in (target / "omniglot").iterdir()) == [
        "images_background.zip",
        "images_evaluation.zip",
    ]
    download_omniglot(target)
    assert sorted(p.name for p in (target / "omniglot" / "splits" / "vinyals").iterdir()) == [
        "test.txt",
        "train.txt",
        "trainval.txt",
        "val.txt",
    ]

    _serve(monkeypatch, fake_root, md5s={"images_background": "f" * 32})
    bad_target = tmp_path / "bad"
    with pytest.raises(RuntimeError, match=r"md5 [0-9a-f]{32}, expected f{32}"):
        download_omniglot(bad_target, splits=False)
    assert list((bad_target / "omniglot").iterdir()) == []  # no partial or unchecked file left


def test_failed_download_is_quick_and_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _serve(monkeypatch, tmp_path / "no_such_mirror")
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"could not download Omniglot's images_background from file://"):
        load_omniglot(tmp_path / "target", cache_dir=tmp_path / "cache", download=True)
    assert time.perf_counter() - start < 10
    assert not any((tmp_path / "target" / "omniglot").iterdir())

    # images present (as extracted folders), split files unreachable: a warning, not an error
    has_images = tmp_path / "has_images"
    for part in om.PARTS:
        (has_images / "omniglot" / part).mkdir(parents=True)
    with pytest.warns(UserWarning, match="could not download the Vinyals split files"):
        download_omniglot(has_images)


# ------------------------------------------------------------------------------------ class table


def test_examples_groups_rotations_without_copying_images() -> None:
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).reshape(2, 3, 4, 4)
    table = torch.tensor([[0, 0], [1, 1], [0, 2], [1, 3], [1, 0]])
    classes = OmniglotClasses(images, table, ["A/character01", "A/character02"])
    assert classes.images is images and len(classes) == 5
    x = classes.examples(torch.tensor([3, 0, 1]), torch.tensor([[2, 0], [1, 1], [0, 2]]))
    assert tuple(x.shape) == (3, 2, 1, 4, 4)
    assert torch.equal(x[0, 0, 0], torch.rot90(images[1, 2], 3, dims=(0, 1)).float() / 255)
    assert torch.equal(x[1, 1, 0], images[0, 1].float() / 255)
    assert torch.equal(x[2, 1, 0], torch.rot90(images[1, 2], 1, dims=(0, 1)).float() / 255)
    assert classes.class_names()[3] == "A/character02/rot270"
    with pytest.raises(ValueError, match="rotations"):
        OmniglotClasses(images, torch.tensor([[0, 4]]), ["a", "b"])
