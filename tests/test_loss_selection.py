"""Per-task loss selection (issue 15, point 4): mixture weights, the REINFORCE estimator, UCB, and
the selectors inside a learner (choices logged per task)."""

from __future__ import annotations

import pytest
import torch

from lightning_meta.algorithms import MAML
from lightning_meta.data import CorruptedSinusoidTasks
from lightning_meta.data.sampler import TRAIN, task_rng
from lightning_meta.losses import CANDIDATES, BanditLoss, MixtureLoss, PolicyLoss
from lightning_meta.losses.selection import combine, task_features
from lightning_meta.models import MLP
from lightning_meta.task import Task, TaskBatch


def sine_task(seed: int = 0, index: int = 0) -> Task:
    return CorruptedSinusoidTasks(10, 10, corrupt_fraction=1.0).sample(task_rng(seed, TRAIN, index))


def batch(n: int = 4) -> TaskBatch:
    return TaskBatch.stack([sine_task(index=i) for i in range(n)])


def test_a_one_hot_mixture_is_exactly_that_candidate_and_weights_mix_linearly():
    task = sine_task()
    predictions = torch.randn(10, 1)
    names = ["mse", "l1", "cauchy"]
    for i, name in enumerate(names):
        one_hot = torch.nn.functional.one_hot(torch.tensor(i), 3).double()
        assert torch.equal(combine(one_hot, predictions, task.support_y, names, "regression"),
                           CANDIDATES["regression"][name](predictions, task.support_y))  # fmt: skip
    w = torch.tensor([0.2, 0.3, 0.5])
    want = sum(w[i] * CANDIDATES["regression"][n](predictions, task.support_y) for i, n in enumerate(names))
    torch.testing.assert_close(combine(w, predictions, task.support_y, names, "regression"), want)


def test_mixture_weights_sum_to_one_start_uniform_and_get_meta_gradients():
    torch.manual_seed(0)
    selector = MixtureLoss(["mse", "l1", "cauchy"])
    model = MAML(MLP(hidden_sizes=[8, 8]), inner_lr=0.01, inner_steps=2, inner_loss=selector)
    model.train()
    task = sine_task()
    params = dict(model.backbone.named_parameters())
    w = selector.weights(params, task, model.backbone)
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    torch.testing.assert_close(w, torch.full((3,), 1 / 3))  # zero-initialised last layer: uniform
    loss, stats = model.meta_loss(batch())
    grads = torch.autograd.grad(loss, list(selector.selector.parameters()))
    assert sum(float(g.abs().sum()) for g in grads) > 0
    # The choices of the batch's tasks are logged as shares.
    shares = torch.stack([stats[f"choice/{n}"] for n in selector.candidates])
    assert shares.shape == (3, 4) and torch.equal(shares.sum(0), torch.ones(4))


def test_the_mixture_is_the_argmax_candidate_alone_at_test():
    torch.manual_seed(0)
    selector = MixtureLoss(["mse", "cauchy"])
    with torch.no_grad():
        selector.selector[-1].bias.copy_(torch.tensor([0.0, 1.0]))
    model = MAML(MLP(hidden_sizes=[8]), inner_lr=0.01, inner_steps=1, inner_loss=selector)
    model.eval()
    task = sine_task()
    weights = selector.weights(dict(model.backbone.named_parameters()), task, model.backbone)
    assert weights.tolist() == [0.0, 1.0]


def test_task_features_see_outliers():
    clean = CorruptedSinusoidTasks(10, 10, corrupt_fraction=0.0).sample(task_rng(0, TRAIN, 3))
    corrupted, hit = CorruptedSinusoidTasks(10, 10, corrupt_fraction=1.0, outlier_scale=50.0).sample_with_type(
        task_rng(0, TRAIN, 3)
    )
    assert hit
    model = MLP(hidden_sizes=[8])
    names = ["mse", "cauchy"]
    f_clean = task_features(dict(model.named_parameters()), clean, model, names, "regression")
    f_bad = task_features(dict(model.named_parameters()), corrupted, model, names, "regression")
    assert f_clean.shape == (7,) and not f_clean.requires_grad
    assert f_bad[-1] > f_clean[-1] + 1  # the max per-example loss


def test_the_reinforce_estimator_is_unbiased_on_a_two_candidate_problem():
    """Expected surrogate gradient = ∇ E_π[R] for a softmax policy, with the baseline held at 0."""
    torch.manual_seed(0)
    policy = PolicyLoss(["mse", "cauchy"], baseline_momentum=0.0)
    policy.train()
    with torch.no_grad():
        policy.selector[-1].bias.copy_(torch.tensor([0.3, -0.2]))
    rewards = torch.tensor([-1.0, -0.25])  # cauchy is better: higher reward
    task = sine_task()
    model = MLP(hidden_sizes=[8])
    params = dict(model.named_parameters())
    bias = policy.selector[-1].bias
    total = torch.zeros(2)
    n = 4000
    for _ in range(n):
        policy.baseline.zero_()
        policy.baseline_ready.fill_(True)
        policy(params, task, model, 0)
        chosen = policy._choice
        term = policy.after_task(-rewards[chosen], training=True)
        total += torch.autograd.grad(term, bias)[0]
    estimate = total / n
    probs = torch.softmax(torch.tensor([0.3, -0.2]), 0)
    # Minimising the surrogate ascends E[R]: its gradient is −∇E[R] = −π_i (R_i − E[R]).
    exact = -(probs * (rewards - (probs * rewards).sum()))
    torch.testing.assert_close(estimate, exact, atol=0.02, rtol=0)


def test_the_policy_converges_to_the_better_loss_in_seconds():
    torch.manual_seed(0)
    policy = PolicyLoss(["mse", "cauchy"])
    policy.train()
    optimizer = torch.optim.Adam(policy.parameters(), lr=0.05)
    rewards = {0: -1.0, 1: -0.25}
    task = sine_task()
    model = MLP(hidden_sizes=[8])
    params = dict(model.named_parameters())
    for _ in range(150):
        policy(params, task, model, 0)
        term = policy.after_task(torch.tensor(-rewards[policy._choice]), training=True)
        optimizer.zero_grad()
        term.backward()
        optimizer.step()
    policy.eval()
    probs = torch.softmax(policy.logits(params, task, model), 0)
    assert probs[1] > 0.9
    policy(params, task, model, 0)
    assert policy._choice == 1  # the most probable at test


def test_ucb_tries_every_candidate_then_settles_on_the_best():
    bandit = BanditLoss(["mse", "l1", "cauchy"], exploration=0.5)
    bandit.train()
    task = sine_task()
    model = MLP(hidden_sizes=[8])
    params = dict(model.named_parameters())
    rewards = {0: -1.0, 1: -0.8, 2: -0.2}
    first = []
    for _ in range(200):
        bandit(params, task, model, 0)
        first.append(bandit._choice)
        bandit.after_task(torch.tensor(-rewards[bandit._choice]), training=True)
    assert sorted(first[:3]) == [0, 1, 2]
    assert first[-50:].count(2) > 40
    bandit.eval()
    bandit(params, task, model, 0)
    assert bandit._choice == 2


def test_maml_trains_with_each_selector_on_the_loop_and_logs_choices():
    for selector in (MixtureLoss(["mse", "cauchy"]), PolicyLoss(["mse", "cauchy"]), BanditLoss(["mse", "cauchy"])):
        torch.manual_seed(0)
        model = MAML(MLP(hidden_sizes=[8]), inner_lr=0.01, inner_steps=1, inner_loss=selector)
        assert "keeps its per-task choice" in model._check_vmap()
        model.train()
        loss, stats = model.meta_loss(batch(3))
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.equal(stats["choice/mse"] + stats["choice/cauchy"], torch.ones(3))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"candidates": ["mse"]}, "at least two distinct regression losses"),
        ({"candidates": ["mse", "focal"]}, r"\['focal'\] are not"),
        ({"kind": "ranking"}, "kind='ranking' must be one of"),
    ],
)
def test_bad_selector_settings_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MixtureLoss(**kwargs)
