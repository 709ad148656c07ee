"""Per-task augmentation: each transform checked against its exact torch equivalent, drawn from the
task's own generator (so tasks stay a pure function of their index), training tasks only by default."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_meta.data import (
    Augmentation,
    FewShotTasks,
    MetaBatchSampler,
    TaskStream,
    TensorClasses,
    task_rng,
)
from lightning_meta.data.sampler import TRAIN
from tests.helpers import SyntheticClassesDataModule


def images(n: int = 6, channels: int = 1, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_a_certain_flip_is_torch_flip():
    x = images()
    torch.testing.assert_close(Augmentation(flip=1.0).images(x, rng()), torch.flip(x, dims=[-1]))


class HighEnd:
    """A generator stand-in whose uniform draws are the top of their range: a fixed transform."""

    def uniform(self, low=0.0, high=1.0, size=None):
        return np.full(size, high, dtype=np.float64)

    def random(self, size=None):
        return np.zeros(size)


def test_a_quarter_turn_is_rot90_and_a_whole_pixel_shift_is_a_zero_filled_translation():
    x = images()
    turned = Augmentation(rotation=(90.0, 90.0)).images(x, rng())
    # Positive angles turn counter-clockwise as displayed (row 0 at the top), as rot90 with k=1.
    torch.testing.assert_close(turned, torch.rot90(x, 1, dims=(-2, -1)))
    # shift=0.25 at 8 pixels, drawn at the top of [-0.25, 0.25]: content moves 2 pixels right and down.
    moved = Augmentation(shift=0.25).images(x, HighEnd())
    want = torch.zeros_like(x)
    want[..., 2:, 2:] = x[..., :-2, :-2]
    torch.testing.assert_close(moved, want)


def test_a_full_crop_is_the_identity_and_a_half_crop_magnifies():
    x = images()
    torch.testing.assert_close(Augmentation(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0)).images(x, rng()), x)
    # A quarter of the area at ratio 1 is half of each side: the crop's corner pixel block, magnified 2x.
    aug = Augmentation(crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0))
    theta = aug.affine(len(x), 8, 8, rng(1))
    assert np.allclose(theta[:, 0, 0], 0.5) and np.allclose(theta[:, 1, 1], 0.5)
    assert np.all(np.abs(theta[:, :, 2]) <= 0.5 + 1e-12)  # the crop stays inside the image


def test_colour_jitter_factors_of_one_change_nothing_and_saturation_keeps_grey_images():
    x = images(channels=3)
    assert torch.equal(Augmentation().images(x, rng()), x)  # everything off: untouched
    grey = images(channels=1).expand(-1, 3, -1, -1).clone()
    out = Augmentation(saturation=0.9).images(grey, rng())
    torch.testing.assert_close(out, grey)
    bright = Augmentation(brightness=0.5).images(x, rng(2))
    ratio = (bright / x).flatten(1)
    unclamped = bright.flatten(1) < 1.0
    # one factor per image, in [0.5, 1.5]
    for r, keep in zip(ratio, unclamped, strict=True):
        assert torch.allclose(r[keep], r[keep][0].expand(int(keep.sum())))
        assert 0.5 <= float(r[keep][0]) <= 1.5
    assert bright.max() <= 1.0


def test_the_draw_is_a_pure_function_of_the_generator():
    aug = Augmentation(crop_scale=(0.5, 1.0), flip=0.5, rotation=20, shift=0.1, brightness=0.3, contrast=0.3)
    x = images(channels=1)
    assert torch.equal(aug.images(x, rng(5)), aug.images(x, rng(5)))
    assert not torch.equal(aug.images(x, rng(5)), aug.images(x, rng(6)))


def classes() -> TensorClasses:
    return TensorClasses(torch.rand(10, 6, 1, 8, 8, generator=torch.Generator().manual_seed(0)))


def test_augmented_tasks_keep_their_classes_examples_and_labels():
    plain = FewShotTasks(classes(), 3, 1, 2)
    augmented = FewShotTasks(classes(), 3, 1, 2, augment=Augmentation(rotation=30, shift=0.1))
    a, b = plain.sample(task_rng(0, TRAIN, 7)), augmented.sample(task_rng(0, TRAIN, 7))
    assert torch.equal(a.support_y, b.support_y) and torch.equal(a.query_y, b.query_y)
    assert not torch.allclose(a.support_x, b.support_x)
    # The same task index gives the same augmented task.
    c = augmented.sample(task_rng(0, TRAIN, 7))
    assert torch.equal(b.support_x, c.support_x) and torch.equal(b.query_x, c.query_x)
    # apply_to: only the named set changes, and it changes exactly as under "both".
    support_only = FewShotTasks(classes(), 3, 1, 2, augment=Augmentation(rotation=30, shift=0.1, apply_to="support"))
    d = support_only.sample(task_rng(0, TRAIN, 7))
    assert torch.equal(d.support_x, b.support_x) and torch.equal(d.query_x, a.query_x)


def test_two_ranks_see_the_augmented_tasks_of_one_process():
    stream = TaskStream(FewShotTasks(classes(), 3, 1, 1, augment=Augmentation(rotation=30, flip=0.5)), 0, TRAIN)
    single = MetaBatchSampler(8, 2, num_replicas=1, rank=0)
    ranks = [MetaBatchSampler(4, 2, num_replicas=2, rank=r) for r in range(2)]
    for whole, share0, share1 in zip(single, *ranks, strict=True):
        torch.testing.assert_close(
            torch.cat([stream[share0].support_x, stream[share1].support_x]), stream[whole].support_x, rtol=0, atol=0
        )


def test_the_datamodule_augments_training_tasks_only_unless_asked():
    aug = Augmentation(rotation=30, shift=0.1)
    plain = SyntheticClassesDataModule(val_tasks=2)
    augmented = SyntheticClassesDataModule(val_tasks=2, augment=aug)
    for dm in (plain, augmented):
        dm.setup()
    t0, t1 = (
        plain.sources["train"].sample(task_rng(0, TRAIN, 0)),
        augmented.sources["train"].sample(task_rng(0, TRAIN, 0)),
    )
    assert not torch.allclose(t0.support_x, t1.support_x)
    v0, v1 = next(iter(plain.val_dataloader())), next(iter(augmented.val_dataloader()))
    assert torch.equal(v0.support_x, v1.support_x) and torch.equal(v0.query_x, v1.query_x)
    both = SyntheticClassesDataModule(val_tasks=2, augment=Augmentation(rotation=30, eval_tasks=True))
    v2 = next(iter(both.val_dataloader()))
    assert not torch.allclose(v0.support_x, v2.support_x)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"flip": 1.5}, ["flip=1.5", "probability"]),
        ({"crop_scale": (0.0, 1.0)}, ["crop_scale=[0.0, 1.0]", "0.08"]),
        ({"shift": 1.0}, ["shift=1.0", "fraction"]),
        ({"brightness": 2.0}, ["brightness=2.0"]),
        ({"rotation": -5}, ["rotation=-5"]),
        ({"apply_to": "queries"}, ["apply_to='queries'", "'support'"]),
    ],
)
def test_bad_options_name_the_value_and_the_fix(kwargs, words):
    with pytest.raises(ValueError) as err:
        Augmentation(**kwargs)
    for word in words:
        assert word in str(err.value)


def test_saturation_on_greyscale_images_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"saturation=0\.5 needs RGB"):
        Augmentation(saturation=0.5).images(images(channels=1), rng())
