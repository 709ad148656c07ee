"""Lake et al.'s one-shot classification benchmark on Omniglot (Science 2015): `all_runs.zip`.

Why this benchmark: it is the original Omniglot task, the one people were scored on (4.5%
error), Bayesian Program Learning (3.3%) and Koch et al.'s Siamese convnet (8.0%). Each of its 20
runs is a 20-way within-alphabet one-shot problem: 20 training images (one drawing of each of 20
characters of one alphabet, `runNN/training/classNN.png`) and 20 test images, other drawers'
drawings of the same characters (`runNN/test/itemNN.png`), paired with their training image by
`runNN/class_labels.txt`. Error is the fraction of the 400 test images classified wrongly.

The runs' drawings come from the evaluation alphabets, so a model scored here is trained on
the background set only (`images_background`: 30 alphabets, 964 characters), which is what
`LakeOneShotDataModule` trains and validates on. Images go through the Omniglot loader's own
decoding (greyscale, Lanczos to 28×28, ink high, [0, 1]), so a model sees them as it saw
its training data.
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_meta.data.augment import Augmentation
from lightning_meta.data.base import FewShotTasks, TaskSource
from lightning_meta.data.datamodule import EpisodicDataModule, check_positive, split_augment
from lightning_meta.data.omniglot import (
    DATA_ENV,
    PARTS,
    OmniglotClasses,
    decode_png,
    load_omniglot,
    locate_data_root,
    with_rotations,
)
from lightning_meta.data.sampler import FixedTaskSampler
from lightning_meta.task import Task, TaskBatch

__all__ = ["LAKE_RUNS", "LAKE_WAYS", "LakeOneShotDataModule", "LakeRun", "LakeRuns", "load_lake_runs"]

LAKE_RUNS = 20
LAKE_WAYS = 20
RUNS_URL = "https://github.com/brendenlake/omniglot/raw/master/python/one-shot-classification/all_runs.zip"
_LABELS = re.compile(r"^(?:(.*)/)?(run\d+)/class_labels\.txt$")


@dataclass(frozen=True)
class LakeRun:
    """One run: 20 training images (the support set, class c = `training/class{c+1:02d}.png`)
    and 20 test images (the queries) with the class each one shows.

    Attributes:
        name: `"runNN"`.
        support: uint8 `[20, S, S]`, ink high.
        query: uint8 `[20, S, S]`, ink high, in `itemNN` order.
        answers: long `[20]`, the support index each query is a drawing of.
        support_files: the training images' paths inside the archive, by class.
        query_files: the test images' paths, in query order.
    """

    name: str
    support: Tensor
    query: Tensor
    answers: Tensor
    support_files: list[str]
    query_files: list[str]

    def task(self) -> Task:
        """The run as a 20-way 1-shot task with 20 queries, images float `[N, 1, S, S]` in [0, 1]."""

        def images(x: Tensor) -> Tensor:
            return x.unsqueeze(1).to(torch.float32).div_(255.0)

        return Task(images(self.support), torch.arange(len(self.support)), images(self.query), self.answers.clone())


def _runs_hint(base: Path) -> str:
    return (
        f"download all_runs.zip from {RUNS_URL} into {base}/ (or extract it there as all_runs/), or point "
        f"`--data.root` (or {DATA_ENV}) at the folder whose omniglot/ holds it"
    )


class _Archive:
    """all_runs as a zip or an extracted folder: names relative to the folder that holds runNN/."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.zip = zipfile.ZipFile(path) if path.is_file() else None
        if self.zip is not None:
            self.names = [n for n in self.zip.namelist() if not n.endswith("/")]
        else:
            self.names = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]

    def read(self, name: str) -> bytes:
        return self.zip.read(name) if self.zip is not None else (self.path / name).read_bytes()

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()


def load_lake_runs(root: str | os.PathLike[str] | None = None, image_size: int = 28) -> list[LakeRun]:
    """Read the 20 runs of `<root>/omniglot/all_runs.zip` (or the extracted `all_runs/` folder).

    Args:
        root: the folder that holds `omniglot/` (default: `$LIGHTNING_META_DATA`, else `./data`).
        image_size: side of the square images, decoded exactly as the Omniglot loader does.

    Returns:
        The runs in order run01..run20.

    Raises:
        FileNotFoundError: the archive is missing; the message says where it looked and how
            to get it.
        ValueError: a run whose pairing file is malformed, names a missing image, or does not
            pair exactly one test image with each of its 20 training images.
    """
    data_root, origin = locate_data_root(root)
    base = data_root / "omniglot"
    zip_path, folder = base / "all_runs.zip", base / "all_runs"
    path = zip_path if zip_path.is_file() else folder if folder.is_dir() else None
    if path is None:
        raise FileNotFoundError(
            f"Lake's one-shot benchmark not found under the data root {data_root.resolve()} (taken from "
            f"{origin}). Looked for {zip_path} and the extracted folder {folder}/. To fix: {_runs_hint(base)}."
        )
    archive = _Archive(path)
    try:
        labels = sorted((m.group(2), m.group(1) or "") for n in archive.names if (m := _LABELS.match(n)))
        if len(labels) != LAKE_RUNS:
            raise ValueError(
                f"{path} holds {len(labels)} runs (runNN/class_labels.txt), expected {LAKE_RUNS}: "
                f"replace it with a good copy ({_runs_hint(base)})"
            )
        return [_read_run(archive, name, prefix, image_size) for name, prefix in labels]
    finally:
        archive.close()


def _read_run(archive: _Archive, name: str, prefix: str, image_size: int) -> LakeRun:
    where = f"{archive.path}: {name}/class_labels.txt"
    join = (lambda p: f"{prefix}/{p}") if prefix else (lambda p: p)
    names = set(archive.names)
    support_files = sorted(
        n for n in archive.names if re.fullmatch(rf"{re.escape(join(name))}/training/class\d+\.png", n)
    )
    if len(support_files) != LAKE_WAYS:
        raise ValueError(f"{archive.path}: {name}/training/ holds {len(support_files)} images, expected {LAKE_WAYS}")
    index = {f: i for i, f in enumerate(support_files)}
    query_files, answers = [], []
    text = archive.read(join(f"{name}/class_labels.txt")).decode()
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{where}:{lineno}: {line!r} is not '<test image> <training image>'")
        test, train = join(parts[0]), join(parts[1])
        if test not in names or train not in index:
            raise ValueError(f"{where}:{lineno}: {line!r} names an image that is not in this run")
        query_files.append(test)
        answers.append(index[train])
    if len(query_files) != LAKE_WAYS or len(set(query_files)) != LAKE_WAYS or sorted(answers) != list(range(LAKE_WAYS)):
        raise ValueError(
            f"{where} must pair {LAKE_WAYS} distinct test images with the {LAKE_WAYS} training images, one each; "
            f"it pairs {len(query_files)} lines with {len(set(answers))} distinct training images"
        )

    def decode(files: list[str]) -> Tensor:
        return torch.from_numpy(np.stack([decode_png(archive.read(f), image_size) for f in files]))

    return LakeRun(name, decode(support_files), decode(query_files), torch.tensor(answers), support_files, query_files)


class LakeRuns(Dataset):
    """The runs as a map-style dataset keyed like `TaskStream`: a tuple of run indices → their batch."""

    def __init__(self, runs: list[LakeRun]) -> None:
        self.tasks = [run.task() for run in runs]

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, indices: tuple[int, ...]) -> TaskBatch:
        return TaskBatch.stack([self.tasks[i] for i in indices])


class LakeOneShotDataModule(EpisodicDataModule):
    """Train on Omniglot's background set, test on Lake's 20 one-shot runs (20 tasks, 400 trials).

    Training tasks are N-way K-shot over the background characters (each 90° rotation a class),
    validation tasks 20-way 1-shot (one query per class, the test's shape) over `val_characters`
    background characters held out by a seeded draw; the evaluation set is never read. `test`
    reports `test/acc` and `test/error` (percent of the 400 test images misclassified), each with
    its 95% interval over the 20 runs.

    Args:
        root: folder holding `omniglot/` with both image archives and `all_runs.zip` (default:
            `$LIGHTNING_META_DATA`, else `./data`).
        ways: classes per training task. Models with an output head (MAML and kin) must train
            20-way to be tested here; metric-based models may train with any number.
        shots: support examples per class in training tasks.
        query_shots: query examples per class in training tasks.
        val_characters: background characters held out for validation (4 classes each).
        cache_dir: where the decoded Omniglot tensor is cached (see `OmniglotDataModule`).
        augment: per-image augmentation of training tasks (Koch et al. trained on affine
            distortions; see `Augmentation`); validation only with its `eval_tasks: true`, Lake's
            runs never.
        tasks_per_batch: see `EpisodicDataModule`.
        batches_per_epoch: see `EpisodicDataModule`.
        val_tasks: see `EpisodicDataModule`.
        eval_tasks_per_batch: see `EpisodicDataModule`.
        seed: see `EpisodicDataModule`.
        eval_seed: see `EpisodicDataModule`; also draws the validation characters, so runs with
            different training seeds are validated on the same characters and tasks.
        num_workers: see `EpisodicDataModule`.
    """

    reports_error = True
    """Tells `MetaLearner` to log `test/error` in percent beside the accuracy."""

    def __init__(
        self,
        root: str | None = None,
        ways: int = LAKE_WAYS,
        shots: int = 1,
        query_shots: int = 5,
        val_characters: int = 100,
        cache_dir: str | None = None,
        augment: Augmentation | None = None,
        tasks_per_batch: int = 1,
        batches_per_epoch: int = 1000,
        val_tasks: int = 200,
        eval_tasks_per_batch: int | None = 20,
        seed: int = 0,
        eval_seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(
            tasks_per_batch,
            batches_per_epoch,
            val_tasks,
            LAKE_RUNS,
            eval_tasks_per_batch,
            seed,
            eval_seed,
            num_workers,
        )
        check_positive(ways=ways, shots=shots, query_shots=query_shots)
        if val_characters < 5:
            raise ValueError(
                f"data.val_characters={val_characters} is too few for 20-way validation tasks (4 rotations a "
                "character): use at least 5"
            )
        self.root, self.cache_dir = root, cache_dir
        self.ways, self.shots, self.query_shots, self.val_characters = ways, shots, query_shots, val_characters
        self.runs: LakeRuns | None = None
        self.augment = augment

    def setup(self, stage: str | None = None) -> None:
        # Validation is 20-way too: refuse a head of another size before fit loads any data,
        # not at the first validation with a target-out-of-bounds error.
        _check_model_can_do_20_way(self.trainer)
        if stage != "test":  # the test reads only the runs, not the 30 MB of Omniglot
            super().setup(stage)

    def build_sources(self) -> dict[str, TaskSource]:
        data = load_omniglot(self.root, self.cache_dir)
        background = np.array([i for i, part in enumerate(data.parts) if part == PARTS[0]])
        if self.val_characters >= len(background):
            raise ValueError(
                f"data.val_characters={self.val_characters} leaves no training characters of the "
                f"{len(background)} background ones: lower it"
            )
        # The held-out characters are part of the evaluation protocol: drawn with `eval_seed`.
        perm = np.random.default_rng(self.eval_seed).permutation(background)
        splits = {
            "train": OmniglotClasses(data.images, with_rotations(np.sort(perm[self.val_characters :])), data.names),
            "val": OmniglotClasses(data.images, with_rotations(np.sort(perm[: self.val_characters])), data.names),
        }
        return {
            "train": FewShotTasks(
                splits["train"], self.ways, self.shots, self.query_shots, "omniglot background", self.augment
            ),
            "val": FewShotTasks(
                splits["val"], LAKE_WAYS, 1, 1, "held-out background characters", split_augment(self.augment, "val")
            ),
        }

    def test_dataloader(self) -> DataLoader:
        _check_model_can_do_20_way(self.trainer)
        if self.runs is None:
            self.runs = LakeRuns(load_lake_runs(self.root))
        world, rank = self._rank()
        return DataLoader(
            self.runs,
            batch_size=None,
            sampler=FixedTaskSampler(LAKE_RUNS, self.eval_tasks_per_batch, world, rank),
            num_workers=0,
        )


def _check_model_can_do_20_way(trainer: pl.Trainer | None) -> None:
    """Refuse a model whose output head has another size than the 20 ways of the runs (and of the
    validation tasks), saying what to do."""
    module = trainer.lightning_module if trainer is not None else None
    if module is None or not getattr(module, "uses_output_head", False):
        return
    out = getattr(getattr(module, "backbone", None), "out_features", None)
    if out is not None and out != LAKE_WAYS:
        raise ValueError(
            f"{type(module).__name__} classifies with a {out}-way output head, but Lake's runs are {LAKE_WAYS}-way: "
            f"a model with an output head must be trained {LAKE_WAYS}-way to be tested here (train with "
            f"`--data.ways {LAKE_WAYS}`, e.g. configs/lake/fomaml.yaml); metric-based models have no such limit"
        )
