"""The few-shot image benchmarks' readers on small generated fixtures with the real file layouts.

No network here: each test writes a tiny copy of a benchmark (every class of the real split, two
or three images of a few pixels each) into `tmp_path`. Every image is one flat colour that
encodes its class and its example index, so values, the class order and the label permutation
of sampled tasks can be checked exactly (JPEG fixtures within a small tolerance).
"""

from __future__ import annotations

import csv
import io
import os
import pickle
import re
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_meta.data import Augmentation, FewShotTasks, task_rng
from lightning_meta.data.benchmarks import (
    CIFARFSDataModule,
    CUBDataModule,
    FC100DataModule,
    ImageBenchmarkDataModule,
    MiniImageNetDataModule,
    TieredImageNetDataModule,
    cifar_fs_splits,
    cub_splits,
    fc100_splits,
    load_cifar100,
    load_cub,
    load_miniimagenet,
    load_tiered_imagenet,
    miniimagenet_splits,
    tiered_imagenet_splits,
)
from lightning_meta.data.benchmarks import cifar as cifar_module
from lightning_meta.data.benchmarks.common import load_split_file, md5_of

SPLITS = ("train", "val", "test")
STEP = 8  # colour levels apart: JPEG's error on a flat colour is well below half of it
SIZE = 8


def colour(g: int, j: int) -> tuple[int, int, int]:
    """The flat colour of example `j` of the class with global index `g` (g < 640, j < 32)."""
    return (g % 20) * STEP, (g // 20) * STEP, j * STEP


def decode_colour(x: torch.Tensor) -> tuple[int, int]:
    """(global class index, example index) of a float [3, H, W] image made by `colour`."""
    r, g, b = (x.mean(dim=(-2, -1)) * 255 / STEP).round().long().tolist()
    return r + 20 * g, b


def flat(g: int, j: int, size: int = SIZE) -> np.ndarray:
    return np.broadcast_to(np.array(colour(g, j), dtype=np.uint8), (size, size, 3)).copy()


def encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({"quality": 100, "subsampling": 0} if fmt == "JPEG" else {}))
    return buffer.getvalue()


# ------------------------------------------------------------------------------------ fixtures


def make_mini_csv(root, per_class=2, counts=(64, 16, 20)):
    """Ravi & Larochelle's layout: {train,val,test}.csv (`filename,label`) and images/*.jpg."""
    base = root / "miniimagenet"
    (base / "images").mkdir(parents=True)
    index, g = {}, 0
    for split, n in zip(SPLITS, counts, strict=True):
        with open(base / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["filename", "label"])
            for _ in range(n):
                wnid = f"n{g:08d}"
                index[wnid] = g
                for j in range(per_class):
                    name = f"{wnid}{j + 1:08d}.jpg"
                    (base / "images" / name).write_bytes(encode(flat(g, j), "JPEG"))
                    writer.writerow([name, wnid])
                g += 1
    return index


def make_mini_pickles(root, per_class=2):
    """Ren et al.'s cache: mini-imagenet-cache-{split}.pkl with image_data and class_dict."""
    base = root / "miniimagenet"
    base.mkdir(parents=True)
    index, g = {}, 0
    for split, n in zip(SPLITS, (64, 16, 20), strict=True):
        images, class_dict = [], {}
        for c in range(n):
            wnid = f"n{g:08d}"
            index[wnid] = g
            # Interleave classes in the file, as the index lists allow.
            class_dict[wnid] = [c + n * j for j in range(per_class)]
            g += 1
        images = [None] * (n * per_class)
        for wnid, ids in class_dict.items():
            for j, i in enumerate(ids):
                images[i] = flat(index[wnid], j)
        with open(base / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
            pickle.dump({"image_data": np.stack(images), "class_dict": class_dict}, f)
    return index


def make_tiered(root, per_class=2, npz=False, counts=(351, 97, 160)):
    """Ren et al.'s release: tiered-imagenet/{split}_images_png.pkl (or .npz) and {split}_labels.pkl."""
    base = root / "tieredimagenet" / "tiered-imagenet"
    base.mkdir(parents=True)
    index, g = {}, 0
    for split, n in zip(SPLITS, counts, strict=True):
        names = [f"n{g + c:08d}" for c in range(n)]
        index.update({name: g + c for c, name in enumerate(names)})
        # Examples in shuffled order, as in the release; class c's j-th image keeps colour j.
        labels = np.repeat(np.arange(n), per_class)
        order = np.random.default_rng(0).permutation(len(labels))
        labels = labels[order]
        seen = np.zeros(n, dtype=int)
        arrays = []
        for c in labels:
            arrays.append(flat(g + c, seen[c]))
            seen[c] += 1
        if npz:
            np.savez(base / f"{split}_images.npz", images=np.stack(arrays))
        else:
            with open(base / f"{split}_images_png.pkl", "wb") as f:
                pickle.dump([np.frombuffer(encode(a, "PNG"), dtype=np.uint8) for a in arrays], f)
        with open(base / f"{split}_labels.pkl", "wb") as f:
            pickle.dump(
                {
                    "label_specific": labels,
                    "label_specific_str": names,
                    "label_general": labels // 10,
                    "label_general_str": [f"general{i}" for i in range(n // 10 + 1)],
                },
                f,
            )
        g += n
    return index


def make_cifar100(root):
    """CIFAR-100's python pickles, cifar100/cifar-100-python/{train,test,meta}: 3 images per class
    (2 in train, 1 in test); fine class i belongs to superclass i // 5 of a sorted list that
    includes FC100's 20 superclass names."""
    fine_names = sorted(c for names in load_split_file("cifar_fs").values() for c in names)
    coarse_names = sorted(c for names in load_split_file("fc100").values() for c in names)
    assert len(fine_names) == 100 and len(coarse_names) == 20
    folder = root / "cifar100" / "cifar-100-python"
    folder.mkdir(parents=True)
    for part, examples in (("train", (0, 1)), ("test", (2,))):
        data = [flat(g, j, 32).transpose(2, 0, 1).reshape(-1) for j in examples for g in range(100)]
        fine = [g for _ in examples for g in range(100)]
        with open(folder / part, "wb") as f:
            pickle.dump(
                {b"data": np.stack(data), b"fine_labels": fine, b"coarse_labels": [g // 5 for g in fine]},
                f,
            )
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": fine_names, "coarse_label_names": coarse_names}, f)
    return {name: g for g, name in enumerate(fine_names)}, coarse_names


def make_cub(root):
    """CUB_200_2011/images/<NNN.Class>/*.jpg for all 200 classes, 2 or 3 images each."""
    classes = sorted(c for names in load_split_file("cub").values() for c in names)
    folder = root / "cub" / "CUB_200_2011" / "images"
    for g, name in enumerate(classes):
        (folder / name).mkdir(parents=True)
        for j in range(2 + (g // 2) % 2):
            (folder / name / f"{name}_{j:04d}.jpg").write_bytes(encode(flat(g, j, 12), "JPEG"))
    return {name: g for g, name in enumerate(classes)}


# --------------------------------------------------------------------------------------- checks


def check_values(splits, index, tol=0.0):
    """Every image of every class has its class's colour and its example index, in [0, 1]."""
    for split in SPLITS:
        classes = splits[split]
        for c in range(len(classes)):
            n = int(classes.num_examples[c])
            x = classes.examples(torch.tensor([c]), torch.arange(n).unsqueeze(0))[0]
            assert x.dtype == torch.float32 and x.shape[1] == 3 and x.min() >= 0 and x.max() <= 1
            expected = torch.tensor([colour(index[classes.class_names()[c]], j) for j in range(n)]) / 255
            assert torch.allclose(x.mean(dim=(-2, -1)), expected, atol=tol + 1e-6), (split, c)


def check_tasks_permute_labels(splits, index, ways=5):
    """Labels 0..ways-1 stand for other classes in other tasks; support and query agree."""
    tasks = FewShotTasks(splits["train"], ways, 1, 1)
    first_class_of_label0 = set()
    for i in range(8):
        task = tasks.sample(task_rng(0, 0, i))
        assert task.support_x.shape[1:] == task.query_x.shape[1:]
        support = [decode_colour(x)[0] for x in task.support_x]
        query = [decode_colour(x)[0] for x in task.query_x]
        assert task.support_y.tolist() == list(range(ways)) and task.query_y.tolist() == list(range(ways))
        assert support == query  # label l is the same class in support and query
        assert len(set(support)) == ways
        first_class_of_label0.add(support[0])
    assert len(first_class_of_label0) > 1


def counts(splits):
    return {s: len(splits[s]) for s in SPLITS}


# -------------------------------------------------------------------------------------- readers


def test_miniimagenet_csv_layout(tmp_path):
    index = make_mini_csv(tmp_path / "data")
    splits = miniimagenet_splits(tmp_path / "data", tmp_path / "cache", image_size=SIZE)
    assert counts(splits) == {"train": 64, "val": 16, "test": 20}
    assert splits["train"].images.shape == (200, 3, SIZE, SIZE)
    assert (splits["val"].num_examples == 2).all()
    check_values(splits, index, tol=2 / 255)
    check_tasks_permute_labels(splits, index)


def test_miniimagenet_pickle_layout_and_resizing(tmp_path):
    index = make_mini_pickles(tmp_path / "data")
    splits = miniimagenet_splits(tmp_path / "data", tmp_path / "cache", image_size=SIZE)
    assert counts(splits) == {"train": 64, "val": 16, "test": 20}
    check_values(splits, index)
    big = miniimagenet_splits(tmp_path / "data", tmp_path / "cache", image_size=84)
    x = big["test"].examples(torch.tensor([3]), torch.tensor([[1]]))
    assert x.shape == (1, 1, 3, 84, 84)
    check_values(big, index, tol=1 / 255)  # a flat colour stays flat


@pytest.mark.parametrize("npz", [False, True], ids=["png_pickle", "npz"])
def test_tiered_imagenet(tmp_path, npz):
    index = make_tiered(tmp_path / "data", npz=npz)
    splits = tiered_imagenet_splits(tmp_path / "data", tmp_path / "cache", image_size=SIZE)
    assert counts(splits) == {"train": 351, "val": 97, "test": 160}
    assert splits["test"].images.shape == (608 * 2, 3, SIZE, SIZE)
    check_values(splits, index)
    check_tasks_permute_labels(splits, index)


def test_cifar_fs_and_fc100(tmp_path):
    index, coarse_names = make_cifar100(tmp_path / "data")
    fs = cifar_fs_splits(tmp_path / "data", tmp_path / "cache")
    assert counts(fs) == {"train": 64, "val": 16, "test": 20}
    assert fs["train"].class_names() == load_split_file("cifar_fs")["train"]
    assert fs["train"].examples(torch.tensor([0]), torch.tensor([[0, 1, 2]])).shape == (1, 3, 3, 32, 32)
    assert (fs["train"].num_examples == 3).all()  # train and test pickles pooled
    check_values(fs, index)
    check_tasks_permute_labels(fs, index)

    fc = fc100_splits(tmp_path / "data", tmp_path / "cache")
    assert counts(fc) == {"train": 60, "val": 20, "test": 20}
    superclass = {name: coarse_names[g // 5] for name, g in index.items()}
    for split, supers in load_split_file("fc100").items():
        assert {superclass[c] for c in fc[split].class_names()} == set(supers)
    check_values(fc, index)
    # One decode of CIFAR-100 serves both benchmarks.
    assert load_cifar100(tmp_path / "data", tmp_path / "cache").from_cache
    assert len(list((tmp_path / "cache").glob("cifar100-*.pt"))) == 1


def test_cub_chen_split(tmp_path):
    index = make_cub(tmp_path / "data")
    splits = cub_splits(tmp_path / "data", tmp_path / "cache", image_size=SIZE)
    assert counts(splits) == {"train": 100, "val": 50, "test": 50}
    # Chen et al.: sorted classes, index % 2 == 0 train, % 4 == 1 val, % 4 == 3 test.
    ordered = sorted(index)
    assert splits["train"].class_names() == ordered[0::2]
    assert splits["val"].class_names() == ordered[1::4]
    assert splits["test"].class_names() == ordered[3::4]
    assert sorted(set(splits["train"].num_examples.tolist())) == [2, 3]  # class sizes vary
    check_values(splits, index, tol=2 / 255)
    check_tasks_permute_labels(splits, index)


# ----------------------------------------------------------------------------------------- cache


@pytest.mark.parametrize(
    ("make", "load"),
    [
        (make_mini_csv, load_miniimagenet),
        (make_mini_pickles, load_miniimagenet),
        (make_tiered, load_tiered_imagenet),
        (make_cifar100, load_cifar100),
        (make_cub, load_cub),
    ],
    ids=["mini_csv", "mini_pickle", "tiered", "cifar100", "cub"],
)
def test_decoded_once_then_read_from_the_cache(tmp_path, monkeypatch, make, load):
    make(tmp_path / "data")
    kwargs = {} if load is load_cifar100 else {"image_size": SIZE}
    first = load(tmp_path / "data", tmp_path / "cache", **kwargs)
    assert not first.from_cache and first.cache_path is not None and first.cache_path.is_file()
    written = first.cache_path.stat().st_mtime_ns

    def no_decoding(*args, **kwargs):
        raise AssertionError("read the source files again instead of the cache")

    # Every way a reader opens its sources: images, pickles, npz archives.
    monkeypatch.setattr(Image, "open", no_decoding)
    monkeypatch.setattr(pickle, "load", no_decoding)
    monkeypatch.setattr(np, "load", no_decoding)
    second = load(tmp_path / "data", tmp_path / "cache", **kwargs)
    assert second.from_cache and second.cache_path == first.cache_path
    assert first.cache_path.stat().st_mtime_ns == written  # not rewritten
    assert torch.equal(second.images, first.images) and second.class_names == first.class_names
    assert len(list((tmp_path / "cache").iterdir())) == 1  # no temporary file left


def test_a_changed_source_is_decoded_again(tmp_path):
    make_cifar100(tmp_path / "data")
    first = load_cifar100(tmp_path / "data", tmp_path / "cache")
    meta = tmp_path / "data" / "cifar100" / "cifar-100-python" / "meta"
    os.utime(meta, ns=(0, 12345))  # a replaced file: another modification time
    again = load_cifar100(tmp_path / "data", tmp_path / "cache")
    assert not again.from_cache and again.cache_path != first.cache_path


def test_a_damaged_cache_is_ignored_with_a_warning_and_decoded_again(tmp_path):
    make_cifar100(tmp_path / "data")
    first = load_cifar100(tmp_path / "data", tmp_path / "cache")
    first.cache_path.write_bytes(first.cache_path.read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning, match=r"ignoring the unreadable cifar100-32px cache .*decoding again"):
        again = load_cifar100(tmp_path / "data", tmp_path / "cache")
    assert not again.from_cache and again.cache_path == first.cache_path
    assert load_cifar100(tmp_path / "data", tmp_path / "cache").from_cache  # rewritten whole


def test_a_damaged_image_in_a_pickle_is_named(tmp_path):
    make_tiered(tmp_path / "data", counts=(351, 97, 160))
    path = tmp_path / "data" / "tieredimagenet" / "tiered-imagenet" / "val_images_png.pkl"
    with open(path, "rb") as f:
        encoded = pickle.load(f)
    encoded[7] = np.frombuffer(b"not a png", dtype=np.uint8)
    with open(path, "wb") as f:
        pickle.dump(encoded, f)
    with pytest.raises(ValueError, match=rf"could not read image 7 of {re.escape(str(path))} as an image"):
        load_tiered_imagenet(tmp_path / "data", tmp_path / "cache", image_size=SIZE)


# ---------------------------------------------------------------------------- errors and downloads


@pytest.mark.parametrize(
    ("reader", "folder", "archive"),
    [
        (miniimagenet_splits, "miniimagenet", "mini-imagenet.tar.gz"),
        (tiered_imagenet_splits, "tieredimagenet", "tiered-imagenet.tar"),
        (cifar_fs_splits, "cifar100", "cifar-100-python.tar.gz"),
        (fc100_splits, "cifar100", "cifar-100-python.tar.gz"),
        (cub_splits, "cub", "CUB_200_2011.tgz"),
    ],
    ids=["mini", "tiered", "cifar_fs", "fc100", "cub"],
)
def test_missing_data_and_a_bad_archive_are_refused_naming_the_path_and_the_fix(tmp_path, reader, folder, archive):
    root = tmp_path / "data"
    with pytest.raises(FileNotFoundError) as err:
        reader(root, tmp_path / "cache")
    message = str(err.value)
    assert str(root / folder) in message and "--data.root" in message and "--data.download true" in message

    (root / folder).mkdir(parents=True, exist_ok=True)
    (root / folder / archive).write_bytes(b"not the archive")
    with pytest.raises(RuntimeError) as err:
        reader(root, tmp_path / "cache")
    message = str(err.value)
    assert str(root / folder / archive) in message and "md5" in message
    assert "Delete it and download it again" in message


def test_download_extracts_a_checked_archive_and_refuses_a_wrong_checksum(tmp_path, monkeypatch):
    # A local file:// URL stands in for the server: the real download code runs, no network.
    make_cifar100(tmp_path / "src")
    archive = tmp_path / "served.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar100" / "cifar-100-python", arcname="cifar-100-python")
    monkeypatch.setattr(cifar_module, "ARCHIVE_URL", archive.as_uri())

    monkeypatch.setattr(cifar_module, "ARCHIVE_MD5", "0" * 32)
    with pytest.raises(RuntimeError, match=r"md5 .* expected 0{32}") as err:
        cifar_fs_splits(tmp_path / "data", tmp_path / "cache", download=True)
    assert "CIFAR-100" in str(err.value)
    assert not any((tmp_path / "data" / "cifar100").iterdir())  # nothing half-written left

    monkeypatch.setattr(cifar_module, "ARCHIVE_MD5", md5_of(archive))
    splits = cifar_fs_splits(tmp_path / "data", tmp_path / "cache", download=True)
    assert counts(splits) == {"train": 64, "val": 16, "test": 20}
    assert (tmp_path / "data" / "cifar100" / "cifar-100-python" / "meta").is_file()


def test_a_copy_with_missing_classes_is_refused(tmp_path):
    make_mini_csv(tmp_path / "data", counts=(64, 16, 19))
    with pytest.raises(ValueError, match=r"64/16/19 train/val/test classes; the benchmark has 64/16/20"):
        miniimagenet_splits(tmp_path / "data", tmp_path / "cache", image_size=SIZE)


def test_a_missing_csv_image_and_a_corrupt_image_are_named(tmp_path):
    make_mini_csv(tmp_path / "data")
    images = tmp_path / "data" / "miniimagenet" / "images"
    victim = sorted(images.iterdir())[5]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(victim.name)):
        load_miniimagenet(tmp_path / "data", tmp_path / "cache", image_size=SIZE)
    victim.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=rf"could not read .*{re.escape(victim.name)} as an image"):
        load_miniimagenet(tmp_path / "data", tmp_path / "cache", image_size=SIZE)


# ------------------------------------------------------------------------------------ DataModules


@pytest.mark.parametrize(
    ("module", "make", "size"),
    [
        (MiniImageNetDataModule, make_mini_pickles, SIZE),
        (TieredImageNetDataModule, make_tiered, SIZE),
        (CIFARFSDataModule, make_cifar100, 32),
        (FC100DataModule, make_cifar100, 32),
        (CUBDataModule, make_cub, SIZE),
    ],
    ids=["mini", "tiered", "cifar_fs", "fc100", "cub"],
)
def test_datamodules_yield_task_batches(tmp_path, module, make, size):
    make(tmp_path / "data")
    data = module(
        root=str(tmp_path / "data"),
        cache_dir=str(tmp_path / "cache"),
        image_size=size,
        ways=5,
        shots=1,
        query_shots=1,
        tasks_per_batch=2,
        val_tasks=2,
        test_tasks=2,
        augment=Augmentation(flip=0.5, brightness=0.2),
    )
    assert data.image_shape == (3, size, size)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert len(batch) == 2
    assert batch[0].support_x.shape == (5, 3, size, size)
    test_batch = next(iter(data.test_dataloader()))
    assert test_batch[0].query_x.shape == (5, 3, size, size)


def test_image_size_defaults_to_each_benchmarks_own_and_the_base_is_refused():
    sizes = {m: m().image_shape for m in (MiniImageNetDataModule, TieredImageNetDataModule, CUBDataModule)}
    assert set(sizes.values()) == {(3, 84, 84)}
    assert CIFARFSDataModule().image_shape == FC100DataModule().image_shape == (3, 32, 32)
    assert CIFARFSDataModule(image_size=84).image_shape == (3, 84, 84)
    with pytest.raises(TypeError, match="use MiniImageNetDataModule"):
        ImageBenchmarkDataModule()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "make"),
    [("miniimagenet_5w1s/protonet.yaml", make_mini_pickles), ("cifarfs_5w1s/maml.yaml", make_cifar100)],
)
def test_a_config_fits_and_tests_on_its_fixture_through_the_cli(tmp_path, config, make):
    from lightning_meta.cli import run_cli

    make(tmp_path / "data")
    args = ["fit", "--config", f"configs/{config}", "--trainer.logger=false", "--trainer.enable_checkpointing=false"]
    args += [f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=2", "--trainer.val_check_interval=2"]
    args += [f"--data.root={tmp_path / 'data'}", f"--data.cache_dir={tmp_path / 'cache'}", "--data.shots=1"]
    args += ["--data.query_shots=1", "--data.eval_query_shots=1", "--data.tasks_per_batch=2", "--data.val_tasks=2"]
    args += ["--data.test_tasks=2", "--data.eval_tasks_per_batch=2"]
    if "protonet" in config:
        args.append("--data.train_ways=5")  # the fixture's classes hold 2 images; the paper trains 30-way
    cli = run_cli(args)
    assert cli.trainer.global_step == 2
    results = cli.trainer.callback_metrics
    assert float(results["test/tasks"]) == 2 and 0.0 <= float(results["test/acc"]) <= 1.0
