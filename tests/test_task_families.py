"""Task families where the choice of inner loss matters (issue 15, point 5)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_meta.data import CorruptedSinusoidTasks, MetaBatchSampler, SinusoidDataModule, SinusoidTasks, TaskStream
from lightning_meta.data.sampler import TRAIN, task_rng


def test_the_corruption_leaves_the_sines_and_the_queries_as_the_clean_family_draws_them():
    clean = SinusoidTasks(shots=10, query_shots=20)
    corrupted = CorruptedSinusoidTasks(shots=10, query_shots=20, corrupt_fraction=0.5)
    kinds = []
    for i in range(200):
        reference = clean.sample(task_rng(0, TRAIN, i))
        task, is_corrupted = corrupted.sample_with_type(task_rng(0, TRAIN, i))
        kinds.append(is_corrupted)
        assert torch.equal(task.query_x, reference.query_x) and torch.equal(task.query_y, reference.query_y)
        assert torch.equal(task.support_x, reference.support_x)
        if not is_corrupted:
            assert torch.equal(task.support_y, reference.support_y)
    assert 0 < sum(kinds) < len(kinds)
    # The same generator state gives the same task and type.
    again = corrupted.sample_with_type(task_rng(0, TRAIN, 7))
    first = corrupted.sample_with_type(task_rng(0, TRAIN, 7))
    assert again[1] == first[1] and torch.equal(again[0].support_y, first[0].support_y)


def test_the_shares_of_corrupted_tasks_and_outliers_are_the_configured_ones():
    family = CorruptedSinusoidTasks(shots=20, query_shots=1, corrupt_fraction=0.3, outlier_rate=0.25)
    clean = SinusoidTasks(shots=20, query_shots=1)
    corrupted, hits, points = 0, 0, 0
    n = 2000
    for i in range(n):
        task, is_corrupted = family.sample_with_type(task_rng(1, TRAIN, i))
        corrupted += is_corrupted
        if is_corrupted:
            hits += int((task.support_y != clean.sample(task_rng(1, TRAIN, i)).support_y).sum())
            points += 20
    sd = math.sqrt(n * 0.3 * 0.7)
    assert abs(corrupted - 0.3 * n) < 4 * sd
    assert abs(hits / points - 0.25) < 0.03
    # Heavy tails: some outliers are far larger than any sine (amplitude at most 5).
    biggest = max(float(family.sample(task_rng(1, TRAIN, i)).support_y.abs().max()) for i in range(300))
    assert biggest > 50


def test_zero_corruption_is_the_maml_family_and_the_stream_splits_across_ranks():
    assert type(SinusoidDataModule().family) is SinusoidTasks
    data = SinusoidDataModule(corrupt_fraction=0.5, tasks_per_batch=8)
    assert isinstance(data.family, CorruptedSinusoidTasks)
    stream = TaskStream(data.family, seed=0, stream=TRAIN)
    whole = next(iter(MetaBatchSampler(8, 2, num_replicas=1, rank=0)))
    shares = [next(iter(MetaBatchSampler(4, 2, num_replicas=2, rank=r))) for r in range(2)]
    torch.testing.assert_close(torch.cat([stream[s].support_y for s in shares]), stream[whole].support_y)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"corrupt_fraction": 1.5}, r"data.corrupt_fraction=1.5 must be in \[0, 1\]"),
        ({"corrupt_fraction": 0.5, "outlier_rate": 0.0}, r"data.outlier_rate=0.0 must be in \(0, 1\]"),
        ({"corrupt_fraction": 0.5, "outlier_scale": -1.0}, "data.outlier_scale=-1.0 must be positive"),
    ],
)
def test_bad_corruption_settings_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SinusoidDataModule(**kwargs)


def five_shot_source(ways: int = 5, shots: int = 5):
    from lightning_meta.data import FewShotTasks, TensorClasses

    data = torch.arange(12 * 10, dtype=torch.float32).reshape(12, 10, 1)
    return FewShotTasks(TensorClasses(data), ways=ways, shots=shots, query_shots=3)


def test_label_noise_flips_support_labels_of_the_seeded_tasks_only_and_never_the_queries():
    from lightning_meta.data import LabelNoiseTasks

    clean = five_shot_source()
    noisy = LabelNoiseTasks(five_shot_source(), corrupt_fraction=0.4, flip_rate=0.3)
    kinds, flips, labels = [], 0, 0
    for i in range(1000):
        reference = clean.sample(task_rng(0, TRAIN, i))
        task, corrupted = noisy.sample_with_type(task_rng(0, TRAIN, i))
        kinds.append(corrupted)
        assert torch.equal(task.support_x, reference.support_x)
        assert torch.equal(task.query_x, reference.query_x) and torch.equal(task.query_y, reference.query_y)
        changed = task.support_y != reference.support_y
        if not corrupted:
            assert not changed.any()
        else:
            flips += int(changed.sum())
            labels += len(changed)
            assert int(task.support_y.max()) < 5 and int(task.support_y.min()) >= 0
    n = len(kinds)
    assert abs(sum(kinds) - 0.4 * n) < 4 * math.sqrt(n * 0.4 * 0.6)
    # A hit always moves the label to another class, so the flipped share is the flip rate.
    assert abs(flips / labels - 0.3) < 0.03
    # Zero noise is the clean family, task for task.
    plain = LabelNoiseTasks(five_shot_source(), corrupt_fraction=0.0)
    assert torch.equal(plain.sample(task_rng(0, TRAIN, 3)).support_y, clean.sample(task_rng(0, TRAIN, 3)).support_y)


def test_label_noise_refuses_bad_shares_and_regression_sources():
    from lightning_meta.data import LabelNoiseTasks, OmniglotDataModule

    with pytest.raises(ValueError, match=r"data.label_noise=1.5 must be in \[0, 1\]"):
        OmniglotDataModule(label_noise=1.5)
    with pytest.raises(ValueError, match=r"data.flip_rate=0 must be in \(0, 1\]"):
        LabelNoiseTasks(five_shot_source(), 0.5, 0)
    with pytest.raises(ValueError, match="classification"):
        LabelNoiseTasks(SinusoidTasks(5, 5), 1.0).sample(task_rng(0, TRAIN, 0))


def test_linear_regression_tasks_have_the_stated_noise_and_sparsity():
    from lightning_meta.data import LinearRegressionTasks

    family = LinearRegressionTasks(dim=16, shots=200, query_shots=2000, noise_var=2.0, active=4)
    residuals = []
    for i in range(20):
        task, w = family.sample_with_weights(task_rng(0, TRAIN, i))
        assert task.support_x.shape == (200, 16) and task.support_y.shape == (200, 1)
        assert int((w != 0).sum()) == 4
        pred = task.query_x.double() @ torch.from_numpy(w)
        residuals.append(task.query_y.double().squeeze(-1) - pred)
    variance = float(torch.cat(residuals).var())
    assert abs(variance - 2.0) < 0.1
    again, _ = family.sample_with_weights(task_rng(0, TRAIN, 3))
    assert torch.equal(again.support_x, family.sample(task_rng(0, TRAIN, 3)).support_x)
    with pytest.raises(ValueError, match=r"data.active=17 must be in 1\.\.dim=16"):
        LinearRegressionTasks(active=17)
