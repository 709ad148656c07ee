"""Episodic sampling: task shapes and labels, determinism, DDP shares, fixed evaluation tasks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_meta.data import (
    FewShotTasks,
    FixedTaskSampler,
    MetaBatchSampler,
    SinusoidDataModule,
    SinusoidTasks,
    TaskStream,
    TensorClasses,
    task_rng,
)
from lightning_meta.data.sampler import TRAIN, VAL
from lightning_meta.task import Task


def labelled_classes(num_classes: int = 12, per_class: int = 8) -> TensorClasses:
    # Every example carries its own (class, example) id, so a test can see exactly what was drawn.
    ids = torch.arange(num_classes * per_class, dtype=torch.float32).reshape(num_classes, per_class, 1)
    return TensorClasses(ids)


def test_few_shot_task_shapes_labels_and_distinct_classes():
    source = FewShotTasks(labelled_classes(), ways=5, shots=2, query_shots=3)
    for index in range(20):
        task = source.sample(task_rng(0, TRAIN, index))
        assert task.support_x.shape == (10, 1) and task.query_x.shape == (15, 1)
        assert task.support_y.tolist() == [c for c in range(5) for _ in range(2)]
        assert task.query_y.tolist() == [c for c in range(5) for _ in range(3)]
        ids = torch.cat([task.support_x.reshape(5, 2), task.query_x.reshape(5, 3)], 1).long()
        classes = ids // 8
        assert (classes == classes[:, :1]).all(), "a label mixes two source classes"
        assert len(set(classes[:, 0].tolist())) == 5, "classes of a task are not distinct"
        assert len(set(ids.flatten().tolist())) == 25, "an example is drawn twice in one task"


def label_to_class(task, ways: int, per_class: int = 8) -> list[int]:
    """The source class behind each label 0..ways-1 of a task drawn from `labelled_classes`."""
    classes = (task.support_x.reshape(-1) // per_class).long()
    return [int(classes[task.support_y == label][0]) for label in range(ways)]


def labelling_problems(source: FewShotTasks, ways: int = 5, tasks: int = 300) -> list[str]:
    """What is wrong with how `source` maps a task's classes to labels (empty: nothing found).

    Labels must be a fresh random permutation of the task's classes: otherwise a label carries
    meaning across tasks (label 0 = the task's smallest class index) and a learner can score
    by learning that order instead of adapting to the support set.
    """
    problems = []
    mappings = [label_to_class(source.sample(task_rng(0, TRAIN, i)), ways) for i in range(tasks)]
    # Where label 0's class ranks among the task's classes (0 = the smallest class index): a
    # random permutation puts it at each rank in 1/ways of the tasks (60 of 300 expected, binomial
    # sd 6.9; the bounds are 4 sd away, and the tasks are fixed, so this cannot flake).
    ranks = np.bincount([sorted(m).index(m[0]) for m in mappings], minlength=ways)
    expected = tasks / ways
    if not all(expected / 2 <= r <= expected * 1.5 for r in ranks):
        problems.append(f"label 0's rank among the task's classes is not uniform: counts {ranks.tolist()}")
    if sum(m == sorted(m) for m in mappings) > tasks // 20:  # 1/120 of tasks expected
        problems.append("labels follow the sorted class order in too many tasks")
    again = [label_to_class(source.sample(task_rng(0, TRAIN, i)), ways) for i in range(tasks)]
    if again != mappings:
        problems.append("the label -> class mapping of a fixed task index changes between draws")
    return problems


class SortedLabels(FewShotTasks):
    """The bug this guards against: labels in sorted class order, every other draw unchanged."""

    def sample(self, rng: np.random.Generator) -> Task:
        task = super().sample(rng)
        order = torch.tensor(label_to_class(task, self.ways)).argsort().argsort()  # label -> its rank
        return Task(task.support_x, order[task.support_y], task.query_x, order[task.query_y])


def test_labels_are_a_random_permutation_of_the_task_classes_fixed_per_task_index():
    source = FewShotTasks(labelled_classes(), ways=5, shots=1, query_shots=1)
    assert labelling_problems(source) == []
    # The check above catches a sampler that labels classes in sorted order (which passed every
    # other test here): make sure it keeps doing so.
    sorted_problems = labelling_problems(SortedLabels(labelled_classes(), ways=5, shots=1, query_shots=1))
    assert any("rank" in p for p in sorted_problems) and any("sorted" in p for p in sorted_problems)


def test_tasks_are_deterministic_per_seed_and_index():
    source = FewShotTasks(labelled_classes(), ways=5, shots=1, query_shots=2)
    a = source.sample(task_rng(7, TRAIN, 3))
    b = source.sample(task_rng(7, TRAIN, 3))
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    others = [
        source.sample(task_rng(seed, stream, i)) for seed, stream, i in [(8, TRAIN, 3), (7, VAL, 3), (7, TRAIN, 4)]
    ]
    assert all(not torch.equal(a.query_x, o.query_x) for o in others)


def test_two_ranks_split_each_global_meta_batch_exactly():
    stream = TaskStream(FewShotTasks(labelled_classes(), 3, 1, 1), seed=0, stream=TRAIN)
    single = MetaBatchSampler(tasks_per_batch=32, batches_per_epoch=4, num_replicas=1, rank=0)
    ranks = [MetaBatchSampler(16, 4, num_replicas=2, rank=r) for r in range(2)]
    for epoch in range(2):
        for s in (single, *ranks):
            s.set_epoch(epoch)
        for whole, share0, share1 in zip(single, *ranks, strict=True):
            assert set(share0).isdisjoint(share1)
            assert share0 + share1 == whole
            torch.testing.assert_close(
                torch.cat([stream[share0].query_x, stream[share1].query_x]), stream[whole].query_x
            )
    # Epochs draw new tasks.
    single.set_epoch(0)
    first = set(next(iter(single)))
    single.set_epoch(1)
    assert first.isdisjoint(next(iter(single)))


def test_fixed_evaluation_tasks_cover_the_list_once_and_never_change():
    for world in (1, 2, 3):
        samplers = [FixedTaskSampler(num_tasks=25, tasks_per_batch=4, num_replicas=world, rank=r) for r in range(world)]
        seen = [i for s in samplers for batch in s for i in batch]
        assert sorted(seen) == list(range(25))
        assert all(len(list(s)) == len(s) for s in samplers)
    sampler = FixedTaskSampler(10, 3)
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(5)
    assert list(sampler) == first


def test_datamodule_evaluation_batches_are_identical_across_epochs_and_training_seeds():
    batches = []
    for seed in (0, 1):
        dm = SinusoidDataModule(val_tasks=6, eval_tasks_per_batch=4, seed=seed)
        batches.append([b.query_y for _ in range(2) for b in dm.val_dataloader()])
    assert len(batches[0]) == 4  # two epochs of two batches (4 + 2 tasks)
    for a, b in zip(batches[0], batches[1], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(batches[0][0], batches[0][2])


def test_datamodule_training_batches_depend_on_the_seed():
    a = next(iter(SinusoidDataModule(seed=0).train_dataloader()))
    b = next(iter(SinusoidDataModule(seed=1).train_dataloader()))
    assert len(a) == 25 and a.support_x.shape == (25, 10, 1)
    assert not torch.equal(a.support_y, b.support_y)


def test_sinusoid_tasks_follow_the_maml_protocol():
    source = SinusoidTasks(shots=10, query_shots=5)
    for i in range(200):
        rng = task_rng(0, TRAIN, i)
        amplitude, phase = rng.uniform(0.1, 5.0), rng.uniform(0, np.pi)
        task = source.sample(task_rng(0, TRAIN, i))
        x = torch.cat([task.support_x, task.query_x])
        y = torch.cat([task.support_y, task.query_y])
        assert x.shape == (15, 1) and x.abs().max() <= 5.0
        torch.testing.assert_close(y, amplitude * torch.sin(x - phase), rtol=1e-4, atol=1e-4)


def test_errors_name_the_bad_value_and_the_fix():
    with pytest.raises(ValueError, match=r"ways=20 is larger than the 12 classes.*data.ways"):
        FewShotTasks(labelled_classes(), ways=20, shots=1, query_shots=1)
    with pytest.raises(ValueError, match=r"= 9 is more than the 8 examples.*data.shots"):
        FewShotTasks(labelled_classes(), ways=2, shots=4, query_shots=5)
    with pytest.raises(ValueError, match=r"data.tasks_per_batch=0 must be a positive integer"):
        SinusoidDataModule(tasks_per_batch=0)
