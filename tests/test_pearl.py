"""PEARL: the posterior and KL against hand computation, the tanh-Gaussian actor's density, SAC
on a one-step continuous bandit with a known answer, per-task and recent-only buffers, the loss
contract, the task pool, checkpoints carrying buffers and generators, and a resumed CLI fit that
equals an uninterrupted one."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from lightning_meta.algorithms import PEARL
from lightning_meta.algorithms.pearl import TanhGaussianPolicy, kl_to_standard_normal, product_of_gaussians
from lightning_meta.data import RLTaskDataModule, TaskSpecStream
from lightning_meta.data.sampler import TRAIN
from lightning_meta.envs import BernoulliBandit, Navigation2D
from lightning_meta.envs.families import Noise, TaskFamily, Tasks
from tests.helpers import assert_same_state, cli_fit_with_checkpoints

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "hidden_size": 16,
    "layers": 2,
    "encoder_hidden_size": 16,
    "encoder_layers": 2,
    "meta_batch": 4,
    "batch_size": 8,
    "context_batch": 6,
    "gradient_steps": 2,
}


def specs(family: TaskFamily, n: int, seed: int = 0):
    return TaskSpecStream(family, seed, TRAIN)[tuple(range(n))]


def test_product_of_gaussians_by_hand():
    mean = torch.tensor([[1.0], [3.0]], dtype=torch.float64)
    var = torch.tensor([[1.0], [0.5]], dtype=torch.float64)
    m, v = product_of_gaussians(mean, var)
    # Precisions 1 + 2 = 3; mean (1·1 + 3·2) / 3.
    torch.testing.assert_close(v, torch.tensor([1 / 3], dtype=torch.float64))
    torch.testing.assert_close(m, torch.tensor([7 / 3], dtype=torch.float64))


def test_product_of_gaussians_is_the_conjugate_posterior():
    """A prior factor N(0, τ²) and one factor N(x_i, s²) per observation x_i ~ N(z, s²): the
    product is the textbook posterior of z, per latent dimension and per task."""
    gen = torch.Generator().manual_seed(0)
    tau2, s2 = 2.0, 0.3
    x = torch.randn(3, 7, 4, generator=gen, dtype=torch.float64)  # [tasks, observations, latent]
    mean = torch.cat([torch.zeros(3, 1, 4, dtype=torch.float64), x], 1)
    var = torch.cat([torch.full((3, 1, 4), tau2), torch.full((3, 7, 4), s2)], 1).double()
    m, v = product_of_gaussians(mean, var)
    precision = 1 / tau2 + 7 / s2
    torch.testing.assert_close(v, torch.full((3, 4), 1 / precision, dtype=torch.float64))
    torch.testing.assert_close(m, x.sum(1) / s2 / precision)
    # More context, a sharper posterior: the variance falls as factors are added.
    assert (product_of_gaussians(mean[:, :3], var[:, :3])[1] > v).all()


def test_kl_to_the_standard_normal():
    mean = torch.tensor([[0.5, -1.0], [0.0, 0.0]], dtype=torch.float64)
    var = torch.tensor([[0.25, 2.0], [1.0, 1.0]], dtype=torch.float64)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, var.sqrt()), torch.distributions.Normal(0.0, 1.0)
    ).sum(-1)
    torch.testing.assert_close(kl_to_standard_normal(mean, var), expected)
    assert kl_to_standard_normal(mean, var)[1] == 0  # the prior itself
    # By hand, first row: ½(0.25 + 0.25 − 1 − ln 0.25) + ½(2 + 1 − 1 − ln 2).
    by_hand = 0.5 * (0.25 + 0.25 - 1 - math.log(0.25)) + 0.5 * (2 + 1 - 1 - math.log(2))
    assert kl_to_standard_normal(mean, var)[0].item() == pytest.approx(by_hand)


def test_tanh_gaussian_log_prob_is_the_density_of_the_normalised_action():
    torch.manual_seed(0)
    policy = TanhGaussianPolicy(3, 2, 8, 1, scale=0.1).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    eps = torch.randn(5, 2, dtype=torch.float64)
    action, log_prob, mean, log_std = policy(x, eps)
    assert action.abs().max() < 0.1
    dist = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mean, log_std.exp()), [torch.distributions.TanhTransform()]
    )
    torch.testing.assert_close(log_prob, dist.log_prob(action / 0.1).sum(-1))
    torch.testing.assert_close(policy(x, None)[0], 0.1 * torch.tanh(mean))  # no noise: the mean action


class ContinuousBandit(TaskFamily):
    """One step, one constant observation, reward −((a − target) / 0.1)²: the best action is the
    task's target (a 1-step continuous bandit with a known answer)."""

    obs_dim = 1
    num_actions = 1
    discrete = False
    max_move = 0.1

    def __init__(self, targets: tuple[float, ...] = (0.05,), episodes: int = 1) -> None:
        super().__init__(episodes=episodes, horizon=1)
        self.targets = targets

    def config(self) -> dict:
        return {"targets": self.targets, "episodes": self.episodes}

    def sample_tasks(self, n: int, rng: np.random.Generator) -> Tasks:
        picks = rng.integers(len(self.targets), size=n)
        return {"target": torch.tensor([[self.targets[i]] for i in picks], dtype=torch.float32)}

    def sample_noise(self, n: int, rng: np.random.Generator) -> Noise:
        return {}

    def initial_state(self, tasks: Tasks) -> Tensor:
        return torch.zeros_like(tasks["target"])

    def observe(self, tasks: Tasks, state: Tensor) -> Tensor:
        return state

    def step(self, tasks: Tasks, state: Tensor, action: Tensor, noise: Noise) -> tuple[Tensor, Tensor]:
        return state, -(((action - tasks["target"]) / 0.1) ** 2).sum(-1)


def _train_by_hand(model: PEARL, tasks: Tasks, slots: list[int], steps: int, collect_every: int) -> None:
    optimizers = model.configure_optimizers()
    for step in range(steps):
        if step % collect_every == 0:
            for s in slots:
                model.context.pop(s, None)
            model.collect(tasks, slots, 2, posterior=False, to_context=True)
        loss, _ = model.sac_loss(*model.gradient_batch(model.choose_meta_batch()))
        for opt in optimizers:
            opt.zero_grad()
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.update_targets()


def test_sac_learns_the_best_action_of_a_one_step_continuous_bandit():
    """γ = 0, so Q is the reward and the actor's mean must move to the target 0.05 (from tanh's
    0 at initialisation); the learned temperature falls as the policy narrows."""
    torch.manual_seed(0)
    family = ContinuousBandit()
    sizes = {**TINY, "hidden_size": 32, "batch_size": 64, "meta_batch": 1}
    model = PEARL(family, **sizes, discount=0.0, init_alpha=0.1)
    model.optimizer = lambda params: torch.optim.Adam(params, lr=1e-2)
    tasks = {"target": torch.tensor([[0.05]])}
    _train_by_hand(model, tasks, [0], steps=200, collect_every=10)
    with torch.no_grad():
        z, _ = model.posterior(model._sample_context([0], [torch.Generator().manual_seed(1)]))
        action = model.act(torch.zeros(1, 1), z, None)
    assert abs(action.item() - 0.05) < 0.01, action
    assert model.log_alpha.exp().item() < 0.1


def test_buffers_hold_and_sample_only_their_own_tasks_data():
    family = Navigation2D(horizon=5, episodes=2)
    torch.manual_seed(0)
    model = PEARL(family, **TINY)
    spec = specs(family, 3)
    model.collect(spec.tasks, [0, 1, 2], 2, posterior=False, to_context=True)
    batch, context, *_ = model.gradient_batch([2, 0])
    for row, slot in enumerate([2, 0]):
        goal = spec.tasks["goal"][slot]
        # Every transition's reward is minus its next position's distance to *this* task's goal.
        torch.testing.assert_close(batch["reward"][row], -(batch["next_obs"][row] - goal).norm(dim=-1))
        obs, action, reward = context[row].split([2, 2, 1], -1)
        torch.testing.assert_close(reward[:, 0], -(obs + 0.1 * action.clamp(-1, 1) - goal).norm(dim=-1))
    assert model.replay[1]["obs"].shape == (2 * 5, 2)


def test_the_context_buffer_holds_only_the_latest_prior_data():
    family = Navigation2D(horizon=4, episodes=2)
    torch.manual_seed(0)
    model = PEARL(family, **TINY, initial_episodes=2, prior_episodes=1, posterior_episodes=1)
    model.rank_generator = torch.Generator().manual_seed(0)
    model._trainer = None
    spec = specs(family, 2)
    for _ in range(2):
        model.collect_step(spec.tasks, [0, 1])
    replay, context = model.replay[0], model.context[0]
    assert replay["obs"].shape[0] == (2 + 2 * (1 + 1)) * 4  # initial + 2 × (prior + posterior)
    assert context["obs"].shape[0] == 4  # this step's one prior episode, not the first step's
    # ... and it is the replay's latest prior episode (the one before the last posterior one).
    for key in context:
        torch.testing.assert_close(context[key], replay[key][-8:-4])


def test_replay_capacity_keeps_the_newest_transitions():
    family = Navigation2D(horizon=4, episodes=1)
    model = PEARL(family, **TINY, replay_capacity=6)
    spec = specs(family, 1)
    model.collect(spec.tasks, [0], 1, posterior=False, to_context=False)
    first = model.replay[0]["action"].clone()
    model.collect(spec.tasks, [0], 1, posterior=False, to_context=False)
    assert model.replay[0]["obs"].shape[0] == 6
    torch.testing.assert_close(model.replay[0]["action"][:2], first[2:])


def test_the_loss_is_finite_and_reaches_every_parameter():
    family = Navigation2D(horizon=5, episodes=2)
    torch.manual_seed(0)
    model = PEARL(family, **TINY).double()
    spec = specs(family, 3)
    model.collect(spec.tasks, [0, 1, 2], 1, posterior=False, to_context=True)
    model.collect(spec.tasks, [0, 1, 2], 1, posterior=True, to_context=False)
    loss, stats = model.sac_loss(*model.gradient_batch([0, 1, 2]))
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in stats.values())
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert {n.split(".")[0] for n, _ in trainable} == {"encoder", "policy", "q1", "q2", "log_alpha"}
    for name, p in trainable:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for name, p in model.named_parameters():
        if "target" in name:
            assert not p.requires_grad and p.grad is None, name


def test_each_loss_reaches_only_the_parameters_it_trains():
    """Summed into one backward, each loss must train only its own networks: the critics'
    Bellman error reaches the critics and, through z, the encoder (as in PEARL); the KL only
    the encoder; the actor's loss only the actor (its Q is evaluated with detached critic
    weights and detached z); α's only α."""
    family = Navigation2D(horizon=5, episodes=2)
    torch.manual_seed(0)
    model = PEARL(family, **TINY).double()
    spec = specs(family, 2)
    model.collect(spec.tasks, [0, 1], 1, posterior=False, to_context=True)
    losses, _ = model.sac_losses(*model.gradient_batch([0, 1]))
    expected = {"critic": {"encoder", "q1", "q2"}, "kl": {"encoder"}, "actor": {"policy"}, "alpha": {"log_alpha"}}
    assert losses.keys() == expected.keys()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for key, loss in losses.items():
        grads = torch.autograd.grad(loss, [p for _, p in params], retain_graph=True, allow_unused=True)
        reached = {
            n.split(".")[0] for (n, _), g in zip(params, grads, strict=True) if g is not None and g.abs().sum() > 0
        }
        assert reached == expected[key], key


def test_evaluation_uses_the_prior_first_and_then_all_earlier_context():
    family = Navigation2D(horizon=3, episodes=3)
    torch.manual_seed(0)
    model = PEARL(family, **TINY)
    seen = []
    posterior = model.posterior
    model.posterior = lambda context: seen.append(context.shape) or posterior(context)
    returns = model.episode_returns(specs(family, 4))
    assert returns.shape == (4, 3)
    assert seen == [(4, 3, model.context_dim), (4, 6, model.context_dim)]  # after episodes 0, then 0-1
    torch.testing.assert_close(returns, model.episode_returns(specs(family, 4)))  # seeded by task index


def test_evaluation_baselines_are_on_the_per_episode_scale_of_the_return():
    """PEARL's `return` is one episode's (the last), so its baselines are per episode too: standing
    still scores the same per episode whatever the trial's length, not 3 episodes' worth."""
    from lightning_meta.envs.baselines import stand_still

    family, single = Navigation2D(horizon=5, episodes=3), Navigation2D(horizon=5, episodes=1)
    torch.manual_seed(0)
    batch = specs(family, 4)
    stats = PEARL(family, **TINY).eval_stats(batch)
    assert stats["return"].shape == stats["baseline/stand_still"].shape == (4,)
    torch.testing.assert_close(stats["baseline/stand_still"], stand_still(single, batch.tasks, {}))


def test_a_discrete_family_is_refused():
    with pytest.raises(ValueError, match=r"continuous actions: BernoulliBandit"):
        PEARL(BernoulliBandit(3, 4))


def test_the_training_pool_cycles_through_fixed_tasks_with_fresh_noise():
    family = Navigation2D(horizon=2, episodes=1)
    pooled = TaskSpecStream(family, 3, TRAIN, pool=4)
    fresh = TaskSpecStream(family, 3, TRAIN)
    batch = pooled[(1, 5, 9, 2)]
    torch.testing.assert_close(batch.tasks["goal"][0], batch.tasks["goal"][1])
    torch.testing.assert_close(batch.tasks["goal"][0], fresh[(1,)].tasks["goal"][0])
    assert not torch.equal(batch.action_noise[0], batch.action_noise[1])
    assert not torch.equal(fresh[(5,)].tasks["goal"][0], batch.tasks["goal"][1])
    with pytest.raises(ValueError, match=r"train_pool=0"):
        RLTaskDataModule(family, train_pool=0)


def _cli_fit(tmp_path: Path, max_steps: int, *extra: str) -> PEARL:
    return cli_fit_with_checkpoints(
        "nav2d/pearl.yaml",
        tmp_path,
        max_steps,
        8,  # optimizer steps: 4 per gradient step
        "--trainer.val_check_interval=2",
        "--model.init_args.family.init_args.horizon=6",
        "--data.init_args.family.init_args.horizon=6",
        "--model.init_args.hidden_size=8",
        "--model.init_args.encoder_hidden_size=8",
        "--model.init_args.gradient_steps=2",
        "--model.init_args.batch_size=8",
        "--model.init_args.context_batch=4",
        "--model.init_args.meta_batch=3",
        "--data.init_args.train_pool=4",
        "--data.init_args.tasks_per_batch=2",
        "--data.init_args.val_tasks=3",
        "--data.init_args.batches_per_epoch=3",
        *extra,
    ).model


# A checkpoint of a training step is written after its gradient steps, which is what a resume needs.
@pytest.mark.filterwarnings("ignore:Using ModelCheckpoint with manual optimization")
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")  # the resume reuses it
def test_a_short_fit_through_the_cli_resumes_exactly(tmp_path):
    """Four training steps straight, or two, a checkpoint, and two more after a resume (mid-epoch:
    an epoch is 3 steps): the same weights, targets, α, replay and context buffers and generator
    states. The buffers and generators live only in the checkpoint, so this fails without it."""
    straight = _cli_fit(tmp_path / "a", 32)
    _cli_fit(tmp_path / "b", 16)
    resumed = _cli_fit(tmp_path / "b", 32, f"--ckpt_path={tmp_path}/b/ckpt/last.ckpt")
    assert straight.global_step == resumed.global_step == 32  # 4 optimizers × 2 gradient steps × 4
    assert_same_state(straight, resumed)
    assert sorted(straight.replay) == sorted(resumed.replay) == [0, 1, 2, 3]
    for slot in straight.replay:
        for key in straight.replay[slot]:
            torch.testing.assert_close(straight.replay[slot][key], resumed.replay[slot][key], rtol=0, atol=0)
            torch.testing.assert_close(straight.context[slot][key], resumed.context[slot][key], rtol=0, atol=0)
        assert torch.equal(straight.task_generators[slot].get_state(), resumed.task_generators[slot].get_state())
    # The checkpoint alone rebuilds the agent, its family, buffers and generators.
    loaded = PEARL.load_from_checkpoint(tmp_path / "b" / "ckpt" / "last.ckpt", weights_only=False)
    assert loaded.family == Navigation2D(horizon=6, episodes=3) and loaded.latent_dim == 5
    assert_same_state(resumed, loaded)
    torch.testing.assert_close(loaded.replay[0]["obs"], resumed.replay[0]["obs"], rtol=0, atol=0)


@pytest.mark.distributed
@pytest.mark.parametrize("ddp_case", ["pearl"])
def test_ddp_gradient_equals_one_process_on_the_union_of_tasks(ddp_case, ddp_run):
    """2 gloo processes × 4 tasks, each collecting into its own buffers: the averaged gradient
    of one gradient step (float64) equals one process's on the 8 tasks (per-task generators make
    the union's data and samples the same; the KL is a sum over the global meta-batch)."""
    single, half, ddp = ddp_run
    assert single["held"] == list(range(8)) and ddp["held"] == [0, 1, 2, 3]  # rank 0's own tasks
    assert single["grads"].keys() == ddp["grads"].keys() and single["grads"]
    for name, grad in single["grads"].items():
        assert grad.dtype == torch.float64
        torch.testing.assert_close(ddp["grads"][name], grad, rtol=1e-9, atol=1e-12, msg=name)
    assert max((half["grads"][n] - g).abs().max() for n, g in single["grads"].items()) > 1e-6  # not vacuous
    for key in ("val/return", "val/return_first", "val/baseline/oracle"):
        assert abs(ddp["val"][key] - single["val"][key]) < 1e-5, key
    assert ddp["val"]["val/tasks"] == single["val"]["val/tasks"] == 5


def test_pearl_collects_trains_and_evaluates_on_half_cheetah_vel():
    """The full-scale config's family (mujoco extra): a collection, a loss that reaches every
    trainable parameter, and an evaluation trial, at tiny sizes."""
    pytest.importorskip("mujoco", reason="the mujoco extra: pip install lightning-meta[mujoco]")
    from lightning_meta.envs import HalfCheetahVel

    family = HalfCheetahVel(horizon=4, episodes=2)
    torch.manual_seed(0)
    model = PEARL(family, **TINY, learn_alpha=False)
    spec = specs(family, 2)
    model.collect_step(model._cast_tasks(spec.tasks), [0, 1])
    assert model.replay[0]["obs"].shape == ((1 + 1 + 1) * 4, family.obs_dim)
    loss, _ = model.sac_loss(*model.gradient_batch([0, 1]))
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert torch.isfinite(model.episode_returns(spec)).all()
