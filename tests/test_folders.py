"""Datasets without code: `ImageFolderClasses` (counts, decoding, caching, bad folders refused with
their path), `DatasetClasses` over a torch Dataset, and `FewShotDataModule` built from YAML."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from lightning_meta.cli import run_cli
from lightning_meta.data import DatasetClasses, FewShotDataModule, FewShotTasks, ImageFolderClasses

REPO = Path(__file__).resolve().parents[1]


def write_image(path: Path, seed: int, size: int = 12, mode: str = "RGB", fmt: str = "PNG") -> None:
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path, fmt)


def make_folder(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            fmt = "JPEG" if i % 2 else "PNG"
            write_image(root / name / f"img{i}.{'jpg' if fmt == 'JPEG' else 'png'}", 1000 * seed + 100 * c + i, fmt=fmt)
    return root


def test_image_folder_counts_decoding_and_cache(tmp_path):
    root = make_folder(tmp_path / "imgs", {"cat": 3, "dog": 5, "eel": 4})
    (root / "dog" / "notes.txt").write_text("not an image")  # skipped by its ending
    classes = ImageFolderClasses(str(root), image_size=8, channels=3, cache_dir=str(tmp_path / "cache"))
    assert classes.num_examples.tolist() == [3, 5, 4] and len(classes) == 3
    assert classes.class_names() == ["cat", "dog", "eel"]
    assert classes.images.dtype == torch.uint8 and tuple(classes.images.shape) == (12, 3, 8, 8)
    assert not classes.from_cache
    # Class 1 example 2 is dog/img2.png: RGB, Lanczos to 8x8, then [0, 1].
    x = classes.examples(torch.tensor([1]), torch.tensor([[2]]))
    expected = np.asarray(Image.open(root / "dog" / "img2.png").convert("RGB").resize((8, 8), Image.LANCZOS))
    torch.testing.assert_close(x[0, 0], torch.from_numpy(expected.transpose(2, 0, 1).copy()).float() / 255)
    again = ImageFolderClasses(str(root), image_size=8, channels=3, cache_dir=str(tmp_path / "cache"))
    assert again.images is not None and again.from_cache and torch.equal(again.images, classes.images)
    grey = ImageFolderClasses(str(root), image_size=8, channels=1, invert=True, cache_dir=str(tmp_path / "cache"))
    assert tuple(grey.images.shape) == (12, 1, 8, 8) and not grey.from_cache
    subset = ImageFolderClasses(str(root), image_size=8, classes=["eel", "cat"], cache_dir=str(tmp_path / "cache"))
    assert subset.class_names() == ["eel", "cat"] and subset.num_examples.tolist() == [4, 3]
    task = FewShotTasks(classes, ways=2, shots=1, query_shots=2).sample(np.random.default_rng(0))
    assert tuple(task.support_x.shape) == (2, 3, 8, 8) and tuple(task.query_x.shape) == (4, 3, 8, 8)


def test_bad_folders_are_refused_naming_the_path(tmp_path):
    cache = str(tmp_path / "cache")
    root = make_folder(tmp_path / "imgs", {"a": 2, "b": 2})
    (root / "empty").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*empty holds no images"):
        ImageFolderClasses(str(root), cache_dir=cache).class_names()
    (root / "empty").rmdir()
    (root / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match=r"could not read .*b/broken.png as an image"):
        ImageFolderClasses(str(root), cache_dir=cache).class_names()
    with pytest.raises(FileNotFoundError, match=r"nowhere is not a folder"):
        ImageFolderClasses(str(tmp_path / "nowhere"), cache_dir=cache).class_names()
    (tmp_path / "flat").mkdir()
    write_image(tmp_path / "flat" / "x.png", 0)
    with pytest.raises(ValueError, match=r"flat has no class folders"):
        ImageFolderClasses(str(tmp_path / "flat"), cache_dir=cache).class_names()
    with pytest.raises(ValueError, match=r"channels=2 must be 1 \(greyscale\) or 3 \(RGB\)"):
        ImageFolderClasses(str(root), channels=2)


class PairsDataset(Dataset):
    """A plain Dataset of (x, label) pairs, with no `targets` attribute."""

    def __init__(self) -> None:
        self.x = torch.arange(30, dtype=torch.float32).reshape(10, 1, 3)
        self.y = [i % 3 for i in range(10)]

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], self.y[i]


@pytest.mark.parametrize("preload", [True, False])
def test_any_labelled_dataset_becomes_classes(preload):
    classes = DatasetClasses(PairsDataset(), preload=preload)
    assert classes.num_examples.tolist() == [4, 3, 3] and classes.class_names() == ["0", "1", "2"]
    x = classes.examples(torch.tensor([2, 0]), torch.tensor([[1, 0], [3, 2]]))
    # label 2 is at indices 2, 5, 8; label 0 at 0, 3, 6, 9
    torch.testing.assert_close(x[:, :, 0, 0], torch.tensor([[15.0, 6.0], [27.0, 18.0]]))
    assert DatasetClasses(PairsDataset(), labels=[1], preload=preload).num_examples.tolist() == [3]
    with pytest.raises(ValueError, match=r"labels \[7\] have no example"):
        DatasetClasses(PairsDataset(), labels=[7])


def test_a_pil_image_dataset_gives_channel_first_tensors():
    class Pictures(Dataset):
        targets = (0, 0, 1, 1)

        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> tuple[Image.Image, int]:
            buffer = io.BytesIO()
            image = Image.fromarray(np.full((5, 6, 3), 10 * i, dtype=np.uint8))
            image.save(buffer, "PNG")
            return Image.open(buffer), self.targets[i]

    x = DatasetClasses(Pictures()).examples(torch.tensor([1]), torch.tensor([[1]]))
    assert tuple(x.shape) == (1, 1, 3, 5, 6)
    torch.testing.assert_close(x.max(), torch.tensor(30 / 255))


def test_the_example_config_fits_on_image_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    for split, seed in (("train", 0), ("val", 1), ("test", 2)):
        make_folder(tmp_path / split, {f"{split}{c}": 3 for c in range(5)}, seed)
    args = [
        f"--data.init_args.{s}.init_args.{k}={v}"
        for s in ("train", "val", "test")
        for k, v in (("root", tmp_path / s), ("image_size", 28), ("cache_dir", tmp_path / "cache"))
    ]
    cli = run_cli(
        [
            "fit",
            "--config",
            "configs/examples/imagefolder_protonet.yaml",
            *args,
            "--model.init_args.backbone.init_args.image_size=28",
            "--model.init_args.backbone.init_args.hidden_channels=8",
            "--data.query_shots=2",
            "--data.eval_query_shots=2",
            "--data.val_tasks=2",
            "--data.test_tasks=2",
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert isinstance(cli.datamodule, FewShotDataModule) and cli.trainer.global_step == 2
    assert cli.datamodule.image_format().image_size == 28
    assert cli.trainer.callback_metrics["test/tasks"] == 2


def test_folders_and_benchmarks_share_one_class_dataset_and_one_decoder(tmp_path, monkeypatch):
    from lightning_meta.data import images
    from lightning_meta.data.images import ImageClasses, ImageFormat, decode_files

    root = make_folder(tmp_path / "imgs", {"a": 3, "b": 4})
    classes = ImageFolderClasses(str(root), image_size=8, cache_dir=str(tmp_path / "cache"))
    assert isinstance(classes, ImageClasses) and classes.images.shape == (7, 3, 8, 8)
    assert classes.starts.tolist() == [0, 3] and classes.counts.tolist() == [3, 4]
    # The same tensor as an eager ImageClasses gives the same examples.
    eager = ImageClasses(classes.images, classes.starts, classes.counts, classes.class_names())
    ids, examples = torch.tensor([1, 0]), torch.tensor([[3, 0], [2, 1]])
    assert torch.equal(eager.examples(ids, examples), classes.examples(ids, examples))
    # Decoded in a process pool (forced below its size threshold), chunks arrive in order.
    files = sorted(root.glob("*/*"))
    monkeypatch.setattr(images, "_MIN_IMAGES_FOR_POOL", 1)
    pooled = decode_files(files, ImageFormat(8), 2, "test images")
    assert torch.equal(pooled, decode_files(files, ImageFormat(8), 0, "test images"))
    assert torch.equal(pooled, classes.images)
    with pytest.raises(ValueError, match=r"starts, .* counts and .* names differ"):
        ImageClasses(classes.images, classes.starts, classes.counts, ["a"])
    with pytest.raises(ValueError, match=r"must be uint8"):
        ImageClasses(classes.images.float(), classes.starts, classes.counts, ["a", "b"])
