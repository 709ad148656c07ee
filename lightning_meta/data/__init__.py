"""Task sources, episodic samplers and the task-batch DataModules."""

from lightning_meta.data.augment import Augmentation
from lightning_meta.data.base import ClassDataset, FewShotTasks, TaskSource, TensorClasses
from lightning_meta.data.datamodule import (
    EpisodicDataModule,
    FewShotDataModule,
    LinearRegressionDataModule,
    OmniglotDataModule,
    SinusoidDataModule,
)
from lightning_meta.data.folders import DatasetClasses, ImageFolderClasses, class_folders
from lightning_meta.data.images import ImageFormat
from lightning_meta.data.lake import LakeOneShotDataModule, LakeRun, load_lake_runs
from lightning_meta.data.noisy import LabelNoiseTasks, LinearRegressionTasks
from lightning_meta.data.omniglot import OmniglotClasses, load_omniglot, omniglot_splits
from lightning_meta.data.rl import RLTaskDataModule, TaskSpecStream
from lightning_meta.data.sampler import FixedTaskSampler, MetaBatchSampler, TaskStream, task_rng
from lightning_meta.data.sinusoid import CorruptedSinusoidTasks, SinusoidTasks

__all__ = [
    "Augmentation",
    "ClassDataset",
    "CorruptedSinusoidTasks",
    "DatasetClasses",
    "EpisodicDataModule",
    "FewShotDataModule",
    "FewShotTasks",
    "FixedTaskSampler",
    "ImageFolderClasses",
    "ImageFormat",
    "LabelNoiseTasks",
    "LakeOneShotDataModule",
    "LakeRun",
    "LinearRegressionDataModule",
    "LinearRegressionTasks",
    "MetaBatchSampler",
    "OmniglotClasses",
    "OmniglotDataModule",
    "RLTaskDataModule",
    "SinusoidDataModule",
    "SinusoidTasks",
    "TaskSource",
    "TaskSpecStream",
    "TaskStream",
    "TensorClasses",
    "class_folders",
    "load_lake_runs",
    "load_omniglot",
    "omniglot_splits",
    "task_rng",
]
