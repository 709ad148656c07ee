"""The loss selectors' label-noise features: label consistency and the probe step (issue 15)."""

from __future__ import annotations

import pytest
import torch

from lightning_meta.algorithms import MAML
from lightning_meta.data import CorruptedSinusoidTasks
from lightning_meta.data.sampler import TRAIN, task_rng
from lightning_meta.inner_loop import forward
from lightning_meta.losses import MixtureLoss, PolicyLoss
from lightning_meta.losses.selection import consistency_features, probe_features
from lightning_meta.models import MLP
from lightning_meta.task import Task, TaskBatch

WAYS, SHOTS, DIM = 5, 5, 8


def blob_task(seed: int = 0, flip: float = 0.0) -> Task:
    """A 5-way 5-shot task of Gaussian blobs; `flip`: the share of support labels moved to another class."""
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(WAYS, DIM, generator=g)
    y = torch.arange(WAYS).repeat_interleave(SHOTS)
    x = centres[y] + 0.5 * torch.randn(len(y), DIM, generator=g)
    qy = torch.arange(WAYS).repeat_interleave(3)
    qx = centres[qy] + 0.5 * torch.randn(len(qy), DIM, generator=g)
    hit = torch.rand(len(y), generator=g) < flip
    noisy = torch.where(hit, (y + torch.randint(1, WAYS, y.shape, generator=g)) % WAYS, y)
    return Task(x, noisy, qx, qy)


def brute_force_loo_agreement(z: torch.Tensor, y: torch.Tensor) -> float:
    agree = 0
    for i in range(len(y)):
        keep = torch.arange(len(y)) != i
        distances = []
        for c in range(int(y.max()) + 1):
            members = z[keep & (y == c)]
            distances.append(float("inf") if len(members) == 0 else float((z[i] - members.mean(0)).pow(2).sum()))
        agree += int(torch.tensor(distances).argmin()) == int(y[i])
    return agree / len(y)


def test_consistency_features_tell_a_flipped_copy_from_the_clean_task():
    clean, flipped = blob_task(0), blob_task(0, flip=0.4)
    assert torch.equal(clean.support_x, flipped.support_x) and not torch.equal(clean.support_y, flipped.support_y)
    f_clean = consistency_features(clean.support_x, clean.support_y)
    f_flip = consistency_features(flipped.support_x, flipped.support_y)
    assert f_clean.shape == (3,) and ((f_clean >= 0) & (f_clean <= 1)).all()
    assert f_clean[0] == 1.0 and f_flip[0] < 0.9  # leave-one-out agreement
    assert f_flip[1] < f_clean[1] - 0.1  # its smooth version
    assert f_flip[2] > f_clean[2] + 0.2  # within-class share of the spread
    # The vectorised leave-one-out equals a plain loop, also with a class of one example.
    y = flipped.support_y.clone()
    y[y == 4] = 3
    y[0] = 4
    for labels in (flipped.support_y, y):
        got = float(consistency_features(flipped.support_x, labels)[0])
        assert got == pytest.approx(brute_force_loo_agreement(flipped.support_x.double(), labels))


def test_the_probe_step_is_exact_for_a_linear_model_and_sees_flipped_labels():
    torch.manual_seed(0)
    model = torch.nn.Linear(DIM, WAYS)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    task = blob_task(1, flip=0.4)
    lr = 0.05
    got = probe_features(params, task, lambda x: forward(model, params, x), lr)
    # A linear model is its own linearisation: the probe equals a real SGD step.
    loss = torch.nn.functional.cross_entropy(forward(model, params, task.support_x), task.support_y)
    grads = torch.autograd.grad(loss, list(params.values()))
    stepped = {k: v - lr * g for (k, v), g in zip(params.items(), grads, strict=True)}
    after = forward(model, stepped, task.support_x)
    per_example = torch.nn.functional.cross_entropy(after, task.support_y, reduction="none")
    want = torch.stack([per_example.mean(), per_example.median(), per_example.max()]).log1p()
    torch.testing.assert_close(got[:3], want.detach())
    assert float(got[3]) == pytest.approx(float((after.argmax(-1) != task.support_y).float().mean()))
    # Flipped labels stay badly fit after a large probe step; the clean copy fits.
    clean = blob_task(1)
    big = 2.0
    f_clean = probe_features(params, clean, lambda x: forward(model, params, x), big)
    f_flip = probe_features(params, task, lambda x: forward(model, params, x), big)
    assert f_flip[0] > f_clean[0] and f_flip[3] > f_clean[3] + 0.1


def test_the_probe_sees_outliers_in_regression():
    torch.manual_seed(0)
    clean = CorruptedSinusoidTasks(10, 10, corrupt_fraction=0.0).sample(task_rng(0, TRAIN, 3))
    corrupted = CorruptedSinusoidTasks(10, 10, corrupt_fraction=1.0, outlier_scale=50.0).sample(task_rng(0, TRAIN, 3))
    model = MLP(hidden_sizes=[8])
    params = dict(model.named_parameters())
    f_clean = probe_features(params, clean, model, 0.01)
    f_bad = probe_features(params, corrupted, model, 0.01)
    assert f_clean.shape == (4,) and not f_bad.requires_grad
    assert f_bad[2] > f_clean[2] + 1  # the max per-example loss after the step


def test_selectors_take_the_new_features_and_train_through_them():
    torch.manual_seed(0)
    default = MixtureLoss(["cross_entropy", "focal"], kind="classification")
    assert default.selector[0].in_features == 2 * 2 + 3  # unchanged without the options
    for cls in (MixtureLoss, PolicyLoss):
        selector = cls(["cross_entropy", "focal"], kind="classification", label_consistency=True, probe_lr=0.1)
        assert selector.selector[0].in_features == 2 * 2 + 3 + 3 + 4
        model = MAML(MLP(in_features=DIM, hidden_sizes=[8], out_features=WAYS), inner_lr=0.1, inner_steps=1,
                     inner_loss=selector)  # fmt: skip
        model.train()
        features = selector.features(dict(model.backbone.named_parameters()), blob_task(2), model.backbone)
        assert features.shape == (14,) and torch.isfinite(features).all()
        loss, stats = model.meta_loss(TaskBatch.stack([blob_task(i, flip=0.4 * (i % 2)) for i in range(4)]))
        # The mixture by the meta-gradient, the policy by its REINFORCE term (added per task by the learner).
        grads = torch.autograd.grad(loss, list(selector.selector.parameters()), allow_unused=True)
        assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
        assert torch.equal(stats["choice/cross_entropy"] + stats["choice/focal"], torch.ones(4))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"candidates": ["mse", "l1"], "label_consistency": True}, "classification selectors, not regression"),
        ({"candidates": ["mse", "l1"], "probe_lr": 0.0}, "probe_lr=0.0 must be a positive"),
    ],
)
def test_bad_feature_settings_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MixtureLoss(**kwargs)


def test_selectors_hand_out_their_softmax_per_task_once():
    torch.manual_seed(0)
    selector = MixtureLoss(["cross_entropy", "focal"], kind="classification", label_consistency=True)
    with torch.no_grad():
        selector.selector[-1].bias.copy_(torch.tensor([0.0, 1.0]))
    model = MAML(MLP(in_features=DIM, hidden_sizes=[8], out_features=WAYS), inner_lr=0.1, inner_steps=2,
                 inner_loss=selector)  # fmt: skip
    model.eval()
    for i in range(3):
        model.adapt(blob_task(i), 2)  # one softmax per task, not per inner step
    probabilities = selector.pop_probabilities()
    assert probabilities.shape == (3, 2) and selector.pop_probabilities() is None
    # Before the argmax: the softmax of the logits, not the one-hot test choice.
    torch.testing.assert_close(probabilities, torch.softmax(torch.tensor([0.0, 1.0]), 0).expand(3, 2))


def test_the_features_baseline_removes_a_reward_gap_that_the_features_explain():
    """Rewards that depend on the task (e.g. its type) but not on the choice: the running mean
    leaves the gap in the advantage, the features baseline learns it away."""
    g = torch.Generator().manual_seed(0)
    advantages = {}
    for kind in ("mean", "features"):
        policy = PolicyLoss(["mse", "cauchy"], baseline=kind, baseline_momentum=0.99)
        last = []
        for i in range(300):
            x = torch.rand(7, generator=g, dtype=torch.float64)
            corrupted = float(i % 2)
            x[0] = corrupted  # a feature that tells the type
            log_prob = torch.tensor(-0.7, requires_grad=True)
            policy._log_prob, policy._entropy, policy._features = log_prob, torch.tensor(0.7), x
            reward = -(1.0 + 2.0 * corrupted) + 0.01 * torch.randn((), generator=g, dtype=torch.float64)
            surrogate = policy.after_task(-reward.float(), training=True)
            (grad,) = torch.autograd.grad(surrogate, log_prob)
            last.append(float(-grad))  # the surrogate's gradient in log π is −advantage
        advantages[kind] = torch.tensor(last[-100:]).abs().mean()
    assert advantages["mean"] > 0.5  # ~1: the gap between the types
    assert advantages["features"] < 0.05, advantages


def test_bad_baseline_is_refused():
    with pytest.raises(ValueError, match="baseline='value' must be 'mean' or 'features'"):
        PolicyLoss(["mse", "l1"], baseline="value")
