"""RL²: PPO pieces against hand computation, the GRU state across a trial, the value-target
regression (n = 100 pulls), seeded task specs under DDP shares, and short fits that learn."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from lightning_meta.algorithms import RL2
from lightning_meta.algorithms.rl2 import gae, sample_categorical
from lightning_meta.data import RLTaskDataModule, TaskSpecStream
from lightning_meta.data.rl import sample_spec, stack_specs
from lightning_meta.data.sampler import TRAIN, MetaBatchSampler
from lightning_meta.envs import BernoulliBandit, Navigation2D, TabularMDP
from tests.helpers import assert_same_state, cli_fit_with_checkpoints


def specs(family, n, seed=0):
    return TaskSpecStream(family, seed, TRAIN)[tuple(range(n))]


def test_gae_by_hand():
    rewards = torch.tensor([[1.0], [0.0], [2.0]])
    values = torch.tensor([[0.5], [1.0], [0.25]])
    gamma, lam = 0.9, 0.5
    d2 = 2.0 - 0.25
    d1 = 0.0 + 0.9 * 0.25 - 1.0
    d0 = 1.0 + 0.9 * 1.0 - 0.5
    a2, a1 = d2, d1 + 0.45 * d2
    a0 = d0 + 0.45 * a1
    advantages, returns = gae(rewards, values, gamma, lam)
    torch.testing.assert_close(advantages[:, 0], torch.tensor([a0, a1, a2]))
    torch.testing.assert_close(returns, advantages + values)
    # λ = 1: the discounted return to the end of the trial, whatever the values.
    _, returns = gae(rewards, values, gamma, 1.0)
    torch.testing.assert_close(returns[:, 0], torch.tensor([1 + 0.81 * 2, 0.9 * 2, 2.0]))


def test_sample_categorical_inverts_the_cdf():
    probs = torch.tensor([[0.2, 0.3, 0.5]] * 4)
    assert sample_categorical(probs, torch.tensor([0.1, 0.2, 0.45, 0.9999999])).tolist() == [0, 1, 1, 2]


@pytest.mark.parametrize("family", [BernoulliBandit(3, 6), TabularMDP(4, 3, 3, 2)], ids=repr)
def test_rollout_log_probs_equal_the_sequence_pass_that_ppo_differentiates(family):
    torch.manual_seed(0)
    model = RL2(family, hidden_size=16)
    rollout = model.rollout(specs(family, 5))
    logits, values = model.sequence(rollout.inputs)
    log_probs = torch.log_softmax(logits, -1).gather(-1, rollout.actions[..., None]).squeeze(-1)
    torch.testing.assert_close(log_probs, rollout.log_probs)
    torch.testing.assert_close(values, rollout.values)
    assert rollout.inputs.shape == (family.trial_steps, 5, model.input_dim)


def test_gaussian_policy_for_continuous_families_samples_from_the_spec_and_ppo_sees_the_same_density():
    """Continuous actions: a diagonal Gaussian (mean from the head, learned log std). The rollout's
    log-probabilities equal the sequence pass's (PPO's ratio starts at 1), the draws are a function
    of the task spec, the environment gets clipped actions and every parameter gets a gradient."""
    family = Navigation2D(horizon=4, episodes=2)
    torch.manual_seed(0)
    model = RL2(family, hidden_size=8, init_log_std=0.5, action_clip=0.05)
    batch = specs(family, 5)
    rollout = model.rollout(batch)
    assert rollout.actions.shape == (family.trial_steps, 5, 2) and rollout.actions.abs().max() > 0.05
    torch.testing.assert_close(model.rollout(batch).actions, rollout.actions)  # seeded by the spec
    assert not torch.equal(model.rollout(specs(family, 5, seed=1)).actions, rollout.actions)
    means, values = model.sequence(rollout.inputs)
    by_hand = torch.distributions.Normal(means, torch.full((2,), 0.5).exp()).log_prob(rollout.actions).sum(-1)
    torch.testing.assert_close(by_hand, rollout.log_probs)
    torch.testing.assert_close(values, rollout.values)
    # The previous-action input is the clipped action the environment executed.
    torch.testing.assert_close(rollout.inputs[1:, :, 2:4], rollout.actions[:-1].clamp(-0.05, 0.05))
    loss, stats = model.ppo_loss(rollout, *model.advantages_and_targets(rollout))
    assert stats["approx_kl"].abs() < 1e-6 and stats["clip_fraction"] == 0
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="action_clip=0"):
        RL2(family, action_clip=0)


def test_gru_state_is_kept_across_episodes_and_reset_between_trials():
    family = TabularMDP(states=4, actions=3, horizon=3, episodes=3)
    torch.manual_seed(0)
    model = RL2(family, hidden_size=16)
    batch = specs(family, 2)
    rollout = model.rollout(batch)
    # Another reward in episode 0 changes the inputs there and the policy in later episodes.
    inputs = rollout.inputs.clone()
    inputs[1, :, -2] += 5.0  # the previous-reward input of step 1 (episode 0)
    before, _ = model.sequence(rollout.inputs)
    after, _ = model.sequence(inputs)
    later = slice(family.horizon, None)  # episodes 1 and 2
    assert not torch.allclose(before[later], after[later])
    # Inputs carry the done flag at episode starts (the previous step ended an episode).
    assert rollout.inputs[family.horizon :: family.horizon, :, -1].eq(1).all()
    assert rollout.inputs[0, :, -1].eq(0).all() and rollout.inputs[0, :, family.obs_dim : -1].eq(0).all()
    # A new trial starts from a zero state: its first step does not depend on any earlier trial.
    other = specs(family, 2, seed=1)
    first_alone = model.rollout(other)
    model.rollout(batch)  # another trial first
    first_after = model.rollout(other)
    torch.testing.assert_close(first_alone.log_probs, first_after.log_probs)


def _value_loss_at_init(normalize: bool) -> float:
    family = BernoulliBandit(arms=5, pulls=100)
    torch.manual_seed(0)
    model = RL2(family, hidden_size=32, normalize_values=normalize, gae_lambda=1.0)
    rollout = model.rollout(specs(family, 32))
    advantages, targets = model.advantages_and_targets(rollout)
    _, stats = model.ppo_loss(rollout, advantages, targets)
    return stats["value_loss"].item()


def test_value_targets_are_normalised_so_n_100_returns_do_not_swamp_the_policy_loss():
    """Regression: with raw targets (returns up to ~80 over 100 pulls) the value loss starts in
    the thousands, dwarfs the policy loss in the shared GRU's gradient, and an agent trained
    that way climbed to 73 and collapsed to random. Normalised, it starts near 1. (λ = 1: the
    targets are the returns to go, which the λ-returns of a fitted value function are near; at
    initialisation a small λ's targets bootstrap on values near 0 and hide the scale.)"""
    assert _value_loss_at_init(normalize=True) < 3.0
    assert _value_loss_at_init(normalize=False) > 100.0  # what the normalisation prevents


def test_value_statistics_track_the_targets_and_are_in_the_state_dict():
    family = BernoulliBandit(arms=5, pulls=100)
    model = RL2(family, hidden_size=8)
    model.update_value_stats(torch.tensor([40.0, 60.0]))
    mean, std = model.value_stats()
    assert mean.item() == pytest.approx(50.0) and std.item() == pytest.approx(10.0, rel=1e-4)
    state = model.state_dict()
    assert {"target_mean", "target_square", "target_weight"} <= set(state)
    clone = RL2(family, hidden_size=8)
    clone.load_state_dict(state)
    assert clone.value_stats()[0].item() == pytest.approx(50.0)


def test_task_specs_are_seeded_by_global_index_so_two_ranks_of_8_equal_one_of_16():
    family = TabularMDP(states=4, actions=3, horizon=2, episodes=2)
    stream = TaskSpecStream(family, seed=3, stream=TRAIN)
    one = [stream[i] for i in MetaBatchSampler(16, 3, num_replicas=1, rank=0)]
    ranks = [[stream[i] for i in MetaBatchSampler(8, 3, num_replicas=2, rank=r)] for r in (0, 1)]
    for b in range(3):
        union = stack_specs([ranks[0][b], ranks[1][b]])
        assert torch.equal(union.index, one[b].index)
        for key in one[b].tasks:
            assert torch.equal(union.tasks[key], one[b].tasks[key])
        for key in one[b].noise:
            assert torch.equal(union.noise[key], one[b].noise[key])
        assert torch.equal(union.action_noise, one[b].action_noise)
    assert not torch.equal(one[0].action_noise, one[1].action_noise)  # fresh tasks every step
    # The same task, the same trial: a spec depends only on (seed, stream, index).
    again = sample_spec(family, np.random.default_rng([3, TRAIN, 5]))
    assert torch.equal(again.tasks["rewards"][0], one[0].tasks["rewards"][5])


def test_a_model_built_for_another_family_is_refused():
    model = RL2(BernoulliBandit(5, 10), hidden_size=8)
    data = RLTaskDataModule(BernoulliBandit(5, 100), tasks_per_batch=4, val_tasks=4, test_tasks=4)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"built for BernoulliBandit\(arms=5, pulls=10\)"):
        trainer.fit(model, data)


def _fit(family, steps, tasks, tmp_path, **kwargs):
    pl.seed_everything(0)
    data = RLTaskDataModule(family, tasks_per_batch=tasks, batches_per_epoch=10**6, val_tasks=400, test_tasks=400)
    model = RL2(family, hidden_size=32, optimizer=partial(torch.optim.Adam, lr=3e-3), **kwargs)
    trainer = pl.Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, data)
    return model, data, trainer.test(model, data, verbose=False)[0]


@pytest.mark.slow
def test_a_two_armed_bandit_is_learned_in_seconds(tmp_path):
    """Two arms, 10 pulls: the agent must find the better arm within the trial, so the last
    pull beats the first and the trial return clears random (5.0) well beyond its CI."""
    model, _, result = _fit(BernoulliBandit(arms=2, pulls=10), steps=1000, tasks=64, tmp_path=tmp_path)
    assert result["test/return"] - result["test/return_ci95"] > result["test/baseline/random"] + 0.3
    assert result["test/return_last"] > result["test/return_first"] + 0.05
    assert model.global_step == 1000  # manual optimization: max_steps counts PPO's optimizer steps


@pytest.mark.slow
def test_n_100_pulls_trains_without_collapse(tmp_path):
    """The setting of the collapse (n = 100, raw returns ~50): a short fit keeps the value loss
    near 1 and the trial return above random."""
    family = BernoulliBandit(arms=5, pulls=100)
    model, _, result = _fit(family, steps=120, tasks=32, tmp_path=tmp_path)
    assert result["test/return"] > result["test/baseline/random"]
    rollout = model.rollout(specs(family, 64, seed=9))
    mean, std = model.value_stats()
    _, targets = gae(rollout.rewards, rollout.values * std + mean, model.gamma, model.gae_lambda)
    assert ((rollout.values - (targets - mean) / std) ** 2).mean() < 3.0


def _cli_fit(tmp_path, max_steps, *extra):
    return cli_fit_with_checkpoints(
        "bandit/rl2.yaml",
        tmp_path,
        max_steps,
        4,
        "--model.init_args.hidden_size=16",
        "--data.init_args.tasks_per_batch=8",
        "--data.init_args.val_tasks=8",
        "--data.init_args.batches_per_epoch=3",
        *extra,
    ).model


# A checkpoint of a training step is written after its PPO updates, which is what a resume needs.
@pytest.mark.filterwarnings("ignore:Using ModelCheckpoint with manual optimization")
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")  # the resume reuses it
def test_a_short_fit_through_the_cli_resumes_exactly(tmp_path):
    """Two rollouts, a checkpoint, two more after a resume: the same weights, Adam state and value
    statistics as four rollouts straight (tasks, trial noise and action noise come from the
    global task index, so the resumed run rolls out the same trials)."""
    straight = _cli_fit(tmp_path / "a", 16)
    _cli_fit(tmp_path / "b", 8)  # 2 rollouts × 4 PPO epochs; the epoch is 3 rollouts: resume mid-epoch
    resumed = _cli_fit(tmp_path / "b", 16, f"--ckpt_path={tmp_path}/b/ckpt/last.ckpt")
    assert straight.global_step == resumed.global_step == 16
    assert_same_state(straight, resumed)
    # The checkpoint alone rebuilds the agent, its family and its value statistics.
    loaded = RL2.load_from_checkpoint(tmp_path / "b" / "ckpt" / "last.ckpt", weights_only=False)
    assert loaded.family == BernoulliBandit(5, 10) and loaded.gru.hidden_size == 16
    assert_same_state(resumed, loaded)


@pytest.mark.parametrize("family", [BernoulliBandit(3, 4), TabularMDP(4, 3, 3, 2)], ids=repr)
def test_the_ppo_loss_is_finite_and_reaches_every_parameter(family):
    torch.manual_seed(0)
    model = RL2(family, hidden_size=8)
    rollout = model.rollout(specs(family, 6))
    loss, _ = model.ppo_loss(rollout, *model.advantages_and_targets(rollout))
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.distributed
@pytest.mark.parametrize("ddp_case", ["rl2"])
def test_ddp_ppo_gradient_equals_one_process_on_the_union_of_tasks(ddp_case, ddp_run):
    """2 gloo processes × 4 trials: the averaged PPO gradient (float64) equals one process's on
    the 8 trials, as advantages and value targets are normalised over all ranks' trials."""
    single, half, ddp = ddp_run
    assert single["grads"].keys() == ddp["grads"].keys() and single["grads"]
    for name, grad in single["grads"].items():
        assert grad.dtype == torch.float64
        torch.testing.assert_close(ddp["grads"][name], grad, rtol=1e-9, atol=1e-12, msg=name)
    assert max((half["grads"][n] - g).abs().max() for n, g in single["grads"].items()) > 1e-6  # not vacuous
    torch.testing.assert_close(ddp["value_stats"], single["value_stats"], rtol=1e-9, atol=1e-12)
    for key in ("val/return", "val/return_ci95", "val/baseline/oracle"):
        assert abs(ddp["val"][key] - single["val"][key]) < 1e-5, key
    assert ddp["val"]["val/tasks"] == single["val"]["val/tasks"] == 5


def test_baselines_of_a_fixed_evaluation_batch_are_computed_once_and_unchanged(monkeypatch):
    import lightning_meta.algorithms.rl_base as rl_base

    family = BernoulliBandit(3, 4)
    calls = []
    original = rl_base.baselines

    def counting(f):
        calls.append(f)
        return original(f)

    monkeypatch.setattr(rl_base, "baselines", counting)
    model = RL2(family, hidden_size=8)
    first, other = specs(family, 5, seed=0), specs(family, 5, seed=1)
    model._eval_step(first, "validation")
    model._eval_step(first, "validation")  # the same fixed tasks at the next validation: cached
    assert len(calls) == 1
    model._eval_step(other, "validation")  # other tasks: computed
    assert len(calls) == 2
    a, b, c = model._eval_outputs
    for key in a:
        if key.startswith("baseline/"):
            assert torch.equal(a[key], b[key]), key
            assert torch.equal(a[key], original(family)[key.removeprefix("baseline/")](first.tasks, first.noise))
    assert any(not torch.equal(a[k], c[k]) for k in a if k.startswith("baseline/"))


def test_the_tests_per_task_values_are_kept_in_task_order_and_average_to_its_metrics(tmp_path):
    """`eval_per_task` is what benchmarks pair across methods: after `trainer.test` it holds each
    test task's values in the stream's order (equal to `eval_stats` of the test batches rolled out
    again) and averages to exactly what the test logged (same tasks, same noise)."""
    family = BernoulliBandit(arms=3, pulls=6)
    pl.seed_everything(0)
    data = RLTaskDataModule(family, tasks_per_batch=4, val_tasks=6, test_tasks=10, eval_tasks_per_batch=4)
    model = RL2(family, hidden_size=8)
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(model, data)
    logged = trainer.test(model, data, verbose=False)[0]
    stats = model.eval_per_task
    again = [model.eval_stats(batch) for batch in data.test_dataloader()]
    for key in ("return", "return_first", "baseline/thompson", "baseline/random"):
        assert stats[key].shape == (10,), key
        torch.testing.assert_close(stats[key], torch.cat([b[key] for b in again]), msg=key)
        assert stats[key].mean().item() == pytest.approx(logged[f"test/{key}"], abs=1e-5), key
    assert not torch.equal(stats["return"], stats["baseline/random"])
