"""Task-batch DataModules: each step yields one `TaskBatch` of `tasks_per_batch` tasks per rank.

`EpisodicDataModule` owns the sampling protocol (seeded task streams, DDP shares, fixed
evaluation tasks, loaders); a subclass only says where its tasks come from, by building one
`TaskSource` per split. Subclasses list the shared arguments again on purpose: the typed
signature is the YAML schema and the `--help`.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from lightning_meta.data.augment import Augmentation
from lightning_meta.data.base import ClassDataset, FewShotTasks, TaskSource
from lightning_meta.data.images import ImageFormat
from lightning_meta.data.noisy import LabelNoiseTasks, LinearRegressionTasks
from lightning_meta.data.omniglot import omniglot_splits
from lightning_meta.data.sampler import TEST, TRAIN, VAL, FixedTaskSampler, MetaBatchSampler, TaskStream
from lightning_meta.data.sinusoid import CorruptedSinusoidTasks, SinusoidTasks


def check_positive(**values: int) -> None:
    """Refuse a count below 1, naming its `data.` config key."""
    for key, value in values.items():
        if value < 1:
            raise ValueError(f"data.{key}={value} must be a positive integer")


def split_augment(augment: Augmentation | None, split: str) -> Augmentation | None:
    """The augmentation a split's tasks get: training tasks always, the others if `eval_tasks`."""
    if augment is None or split == "train" or augment.eval_tasks:
        return augment
    return None


def few_shot_sources(
    splits: dict[str, ClassDataset],
    name: str,
    ways: int,
    train_ways: int,
    shots: int,
    query_shots: int,
    eval_query_shots: int,
    augment: Augmentation | None = None,
) -> dict[str, TaskSource]:
    """N-way K-shot task sources over train / val / test classes: training tasks `train_ways`-way
    with `query_shots` queries and the augmentation, the others `ways`-way with `eval_query_shots`
    (augmented only with `augment.eval_tasks`). `name` names the splits in error messages."""
    return {
        split: FewShotTasks(
            classes,
            train_ways if split == "train" else ways,
            shots,
            query_shots if split == "train" else eval_query_shots,
            name=name.format(split=split),
            augment=split_augment(augment, split),
        )
        for split, classes in splits.items()
    }


class ResumableLoader(DataLoader):
    """The training DataLoader, resumable mid-epoch: its state is the global index of the next
    meta-batch to train on, read from the trainer's progress when a checkpoint is written.

    Lightning saves the `state_dict` of a loader that has one and hands it back on resume;
    for any other loader it restarts the epoch from its first batch, so a run resumed
    mid-epoch would train on batches it had already seen. Tasks are a pure function of their
    global index (`sampler.py`), so that index is the whole state of the data.
    """

    def __init__(self, *args: Any, trainer: pl.Trainer | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._trainer = trainer

    def state_dict(self) -> dict[str, int]:
        sampler = self.sampler
        if self._trainer is None:
            return {}
        # Batches trained on in this epoch: `processed` is already counted when a checkpoint is
        # written at the end of a training batch or after validation.
        done = self._trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"next_batch": self._trainer.current_epoch * sampler.batches_per_epoch + done}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if "next_batch" in state_dict:
            self.sampler.resume_at = state_dict["next_batch"]


class EpisodicDataModule(pl.LightningDataModule):
    """Base of the task-batch DataModules.

    Args:
        tasks_per_batch: tasks per training step on each rank (the meta-batch is this times
            the number of processes).
        batches_per_epoch: training steps per epoch (tasks are drawn fresh forever; an epoch
            only sets how often validation and checkpointing happen).
        val_tasks: number of fixed validation tasks.
        test_tasks: number of fixed test tasks.
        eval_tasks_per_batch: tasks per evaluation step (default: `tasks_per_batch`).
        seed: seed of the training task stream.
        eval_seed: seed of the fixed validation and test tasks; kept apart from `seed` so runs
            with different training seeds are scored on the same tasks.
        num_workers: data-loader worker processes (0 samples in the training process).
    """

    def __init__(
        self,
        tasks_per_batch: int = 32,
        batches_per_epoch: int = 100,
        val_tasks: int = 100,
        test_tasks: int = 600,
        eval_tasks_per_batch: int | None = None,
        seed: int = 0,
        eval_seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        eval_tasks_per_batch = eval_tasks_per_batch or tasks_per_batch
        check_positive(
            tasks_per_batch=tasks_per_batch,
            batches_per_epoch=batches_per_epoch,
            val_tasks=val_tasks,
            test_tasks=test_tasks,
            eval_tasks_per_batch=eval_tasks_per_batch,
        )
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers} must be >= 0")
        self.tasks_per_batch, self.batches_per_epoch = tasks_per_batch, batches_per_epoch
        self.val_tasks, self.test_tasks, self.eval_tasks_per_batch = val_tasks, test_tasks, eval_tasks_per_batch
        self.seed, self.eval_seed, self.num_workers = seed, eval_seed, num_workers
        self.sources: dict[str, TaskSource] = {}

    @abstractmethod
    def build_sources(self) -> dict[str, TaskSource]:
        """One task source per split: keys "train", "val", "test"."""

    def setup(self, stage: str | None = None) -> None:
        if not self.sources:
            self.sources = self.build_sources()

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _loader(self, split: str, stream: int, sampler: MetaBatchSampler | FixedTaskSampler) -> DataLoader:
        self.setup()
        trainer = self.trainer
        on_gpu = trainer is not None and trainer.strategy.root_device.type == "cuda"
        loader_class, extra = DataLoader, {}
        if isinstance(sampler, MetaBatchSampler):
            loader_class, extra = ResumableLoader, {"trainer": trainer}
        return loader_class(
            TaskStream(self.sources[split], self.eval_seed if stream != TRAIN else self.seed, stream),
            batch_size=None,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=on_gpu,
            **extra,
        )

    def train_dataloader(self) -> DataLoader:
        world, rank = self._rank()
        sampler = MetaBatchSampler(self.tasks_per_batch, self.batches_per_epoch, world, rank)
        return self._loader("train", TRAIN, sampler)

    def _check_eval_tasks(self, key: str, num_tasks: int, world: int) -> None:
        # A process without evaluation tasks would skip the gather the others wait in: a hang.
        if num_tasks < world:
            raise ValueError(
                f"data.{key}={num_tasks} fixed tasks cannot be dealt to {world} processes "
                f"(trainer.devices × trainer.num_nodes): every process needs at least one; set "
                f"data.{key} to at least {world}, or use fewer devices"
            )

    def val_dataloader(self) -> DataLoader:
        world, rank = self._rank()
        self._check_eval_tasks("val_tasks", self.val_tasks, world)
        return self._loader("val", VAL, FixedTaskSampler(self.val_tasks, self.eval_tasks_per_batch, world, rank))

    def test_dataloader(self) -> DataLoader:
        world, rank = self._rank()
        self._check_eval_tasks("test_tasks", self.test_tasks, world)
        return self._loader("test", TEST, FixedTaskSampler(self.test_tasks, self.eval_tasks_per_batch, world, rank))


class SinusoidDataModule(EpisodicDataModule):
    """Sinusoid regression tasks of MAML §5.1: y = A·sin(x − φ), A ~ U[0.1, 5], φ ~ U[0, π],
    x ~ U[-5, 5]. The same family serves train, validation and test (disjoint seeded streams).

    Args:
        shots: support points per task (K).
        query_shots: query points per task.
        amplitude: range of the amplitude A.
        phase: range of the phase φ.
        x_range: range of the inputs x.
        corrupt_fraction: the share of tasks whose support targets carry heavy-tailed outliers
            (`CorruptedSinusoidTasks`, queries clean); 0, the default, is MAML's family.
        outlier_rate: in a corrupted task, the share of support targets with an outlier.
        outlier_scale: the outliers' scale (× Cauchy noise).
        tasks_per_batch: see `EpisodicDataModule`.
        batches_per_epoch: see `EpisodicDataModule`.
        val_tasks: see `EpisodicDataModule`.
        test_tasks: see `EpisodicDataModule`.
        eval_tasks_per_batch: see `EpisodicDataModule`.
        seed: see `EpisodicDataModule`.
        eval_seed: see `EpisodicDataModule`.
        num_workers: see `EpisodicDataModule`.
    """

    def __init__(
        self,
        shots: int = 10,
        query_shots: int = 10,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
        corrupt_fraction: float = 0.0,
        outlier_rate: float = 0.3,
        outlier_scale: float = 5.0,
        tasks_per_batch: int = 25,
        batches_per_epoch: int = 100,
        val_tasks: int = 100,
        test_tasks: int = 600,
        eval_tasks_per_batch: int | None = 100,
        seed: int = 0,
        eval_seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(
            tasks_per_batch,
            batches_per_epoch,
            val_tasks,
            test_tasks,
            eval_tasks_per_batch,
            seed,
            eval_seed,
            num_workers,
        )
        check_positive(shots=shots, query_shots=query_shots)
        if corrupt_fraction:
            self.family = CorruptedSinusoidTasks(
                shots, query_shots, corrupt_fraction, outlier_rate, outlier_scale, amplitude, phase, x_range
            )
        else:
            self.family = SinusoidTasks(shots, query_shots, amplitude, phase, x_range)

    def build_sources(self) -> dict[str, TaskSource]:
        return {"train": self.family, "val": self.family, "test": self.family}


class LinearRegressionDataModule(EpisodicDataModule):
    """AutoLoss's regression tasks (Xu et al., ICLR 2019): y = w·x + ε, x ~ N(0, I_dim),
    ε ~ N(0, noise_var), a new w ~ N(0, I) per task (`LinearRegressionTasks`); the support set is
    the task's training sample. The same family serves train, validation and test (disjoint
    seeded streams).

    Args:
        dim: input dimension (AutoLoss: 16).
        shots: support points per task (AutoLoss: 200).
        query_shots: query points per task.
        noise_var: variance of the target noise (AutoLoss: 2).
        active: non-zero weights per task (default: dim, dense).
        sparse_fraction: the share of "sparse" tasks (`sparse_active` non-zero weights; ours, not
            AutoLoss's): two task types, logged apart. 0 (the default): AutoLoss's family.
        sparse_active: non-zero weights of a sparse task.
        tasks_per_batch: see `EpisodicDataModule`.
        batches_per_epoch: see `EpisodicDataModule`.
        val_tasks: see `EpisodicDataModule`.
        test_tasks: see `EpisodicDataModule`.
        eval_tasks_per_batch: see `EpisodicDataModule`.
        seed: see `EpisodicDataModule`.
        eval_seed: see `EpisodicDataModule`.
        num_workers: see `EpisodicDataModule`.
    """

    def __init__(
        self,
        dim: int = 16,
        shots: int = 200,
        query_shots: int = 200,
        noise_var: float = 2.0,
        active: int | None = None,
        sparse_fraction: float = 0.0,
        sparse_active: int = 2,
        tasks_per_batch: int = 25,
        batches_per_epoch: int = 100,
        val_tasks: int = 100,
        test_tasks: int = 600,
        eval_tasks_per_batch: int | None = 100,
        seed: int = 0,
        eval_seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(
            tasks_per_batch,
            batches_per_epoch,
            val_tasks,
            test_tasks,
            eval_tasks_per_batch,
            seed,
            eval_seed,
            num_workers,
        )
        self.family = LinearRegressionTasks(dim, shots, query_shots, noise_var, active, sparse_fraction, sparse_active)

    def build_sources(self) -> dict[str, TaskSource]:
        return {"train": self.family, "val": self.family, "test": self.family}


class OmniglotDataModule(EpisodicDataModule):
    """N-way K-shot Omniglot tasks (Lake et al. 2015) at 28×28, each 90° rotation a new class.

    Splits are the Vinyals et al. (2016) character split when its files are under
    `<root>/omniglot/splits/vinyals/`, else a seeded 1200/423 character split.

    Args:
        root: folder holding `omniglot/` (default: `$LIGHTNING_META_DATA`, else `./data`).
        ways: classes per validation/test task (N), and per training task unless `train_ways`.
        shots: support examples per class (K).
        query_shots: query examples per class in training tasks.
        eval_query_shots: query examples per class in validation and test tasks (default:
            `query_shots`); more queries give a tighter confidence interval.
        train_ways: classes per training task when it differs from `ways` (Prototypical
            Networks train on 60-way episodes and test 5-way).
        train_split: "train" (validate on "val") or "trainval" (train on both, as for final
            test numbers).
        download: fetch the official archives (with checksums) when they are missing.
        cache_dir: where the decoded tensor is cached (default: `$LIGHTNING_META_CACHE`, else
            `~/.cache/lightning_meta`).
        augment: per-image augmentation of training tasks (`Augmentation`, e.g. small rotations
            and shifts), drawn from each task's own generator; validation and test tasks only
            with its `eval_tasks: true`. Default: none.
        label_noise: the share of tasks (every split) whose support labels are partly flipped
            (`LabelNoiseTasks`, queries clean): a family where the inner loss matters. Default 0.
        flip_rate: in such a task, the share of support labels flipped to another class.
        tasks_per_batch: see `EpisodicDataModule`.
        batches_per_epoch: see `EpisodicDataModule`.
        val_tasks: see `EpisodicDataModule`.
        test_tasks: see `EpisodicDataModule`.
        eval_tasks_per_batch: see `EpisodicDataModule`.
        seed: see `EpisodicDataModule`.
        eval_seed: see `EpisodicDataModule`.
        num_workers: see `EpisodicDataModule`.
    """

    def __init__(
        self,
        root: str | None = None,
        ways: int = 5,
        shots: int = 1,
        query_shots: int = 15,
        eval_query_shots: int | None = None,
        train_ways: int | None = None,
        train_split: str = "train",
        download: bool = False,
        cache_dir: str | None = None,
        augment: Augmentation | None = None,
        label_noise: float = 0.0,
        flip_rate: float = 0.2,
        tasks_per_batch: int = 32,
        batches_per_epoch: int = 100,
        val_tasks: int = 100,
        test_tasks: int = 600,
        eval_tasks_per_batch: int | None = None,
        seed: int = 0,
        eval_seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(
            tasks_per_batch,
            batches_per_epoch,
            val_tasks,
            test_tasks,
            eval_tasks_per_batch,
            seed,
            eval_seed,
            num_workers,
        )
        eval_query_shots = eval_query_shots or query_shots
        check_positive(
            ways=ways,
            shots=shots,
            query_shots=query_shots,
            eval_query_shots=eval_query_shots,
            train_ways=train_ways or ways,
        )
        self.root, self.download, self.cache_dir, self.train_split = root, download, cache_dir, train_split
        self.ways, self.shots, self.train_ways = ways, shots, train_ways or ways
        self.query_shots, self.eval_query_shots = query_shots, eval_query_shots
        self.augment, self.label_noise, self.flip_rate = augment, label_noise, flip_rate
        LabelNoiseTasks.check(label_noise, flip_rate)  # before any data loads

    def build_sources(self) -> dict[str, TaskSource]:
        splits = omniglot_splits(
            root=self.root, cache_dir=self.cache_dir, download=self.download, train_split=self.train_split
        )
        sources = few_shot_sources(
            {split: splits[split] for split in ("train", "val", "test")},
            "omniglot {split} split",
            self.ways,
            self.train_ways,
            self.shots,
            self.query_shots,
            self.eval_query_shots,
            self.augment,
        )
        if self.label_noise:
            sources = {k: LabelNoiseTasks(v, self.label_noise, self.flip_rate) for k, v in sources.items()}
        return sources

    def image_format(self) -> ImageFormat:
        """How Omniglot's drawings are decoded (greyscale 28×28, ink high), for new images."""
        return ImageFormat(28, 1, invert=True)


class FewShotDataModule(EpisodicDataModule):
    """N-way K-shot tasks from any class datasets chosen in YAML: a new dataset is a config file.

    ```yaml
    data:
      class_path: lightning_meta.data.FewShotDataModule
      init_args:
        train: {class_path: lightning_meta.data.ImageFolderClasses, init_args: {root: my_images/train}}
        val: {class_path: lightning_meta.data.ImageFolderClasses, init_args: {root: my_images/val}}
        test: {class_path: lightning_meta.data.ImageFolderClasses, init_args: {root: my_images/test}}
        ways: 5
    ```

    Args:
        train: the training classes (any `ClassDataset`: `ImageFolderClasses`, `DatasetClasses`, ...).
        val: the validation classes (none shared with `train`, so validation measures new classes).
        test: the test classes.
        ways: classes per validation/test task (N), and per training task unless `train_ways`.
        shots: support examples per class (K).
        query_shots: query examples per class in training tasks.
        eval_query_shots: query examples per class in validation and test tasks (default:
            `query_shots`).
        train_ways: classes per training task when it differs from `ways`.
        augment: per-image augmentation of training tasks (see `OmniglotDataModule`).
        tasks_per_batch: see `EpisodicDataModule`.
        batches_per_epoch: see `EpisodicDataModule`.
        val_tasks: see `EpisodicDataModule`.
        test_tasks: see `EpisodicDataModule`.
        eval_tasks_per_batch: see `EpisodicDataModule`.
        seed: see `EpisodicDataModule`.
        eval_seed: see `EpisodicDataModule`.
        num_workers: see `EpisodicDataModule`.
    """

    def __init__(
        self,
        train: ClassDataset,
        val: ClassDataset,
        test: ClassDataset,
        ways: int = 5,
        shots: int = 1,
        query_shots: int = 15,
        eval_query_shots: int | None = None,
        train_ways: int | None = None,
        augment: Augmentation | None = None,
        tasks_per_batch: int = 4,
        batches_per_epoch: int = 100,
        val_tasks: int = 100,
        test_tasks: int = 600,
        eval_tasks_per_batch: int | None = None,
        seed: int = 0,
        eval_seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(
            tasks_per_batch,
            batches_per_epoch,
            val_tasks,
            test_tasks,
            eval_tasks_per_batch,
            seed,
            eval_seed,
            num_workers,
        )
        eval_query_shots = eval_query_shots or query_shots
        check_positive(
            ways=ways,
            shots=shots,
            query_shots=query_shots,
            eval_query_shots=eval_query_shots,
            train_ways=train_ways or ways,
        )
        self.classes = {"train": train, "val": val, "test": test}
        self.ways, self.shots, self.train_ways = ways, shots, train_ways or ways
        self.query_shots, self.eval_query_shots = query_shots, eval_query_shots
        self.augment = augment

    def build_sources(self) -> dict[str, TaskSource]:
        return {
            split: few_shot_sources(
                {split: classes},
                f"data.{{split}} ({type(classes).__name__})",
                self.ways,
                self.train_ways,
                self.shots,
                self.query_shots,
                self.eval_query_shots,
                self.augment,
            )[split]
            for split, classes in self.classes.items()
        }

    def image_format(self) -> ImageFormat | None:
        """The training images' decoding, when the training classes are image files (for `predict`)."""
        return getattr(self.classes["train"], "image_format", None)
