"""Meta-World ML1 (the `metaworld` extra): the task family, its Gymnasium twin, Meta-World's
evaluation protocol through the MAML-RL adapter, and a fit through the CLI.

Every test but the first needs Meta-World and is skipped, with the reason, without it: the
Makefile installs the extra, so CI runs them.
"""

from __future__ import annotations

import importlib.util
import pickle

import numpy as np
import pytest
import torch

from lightning_meta.data.rl import TaskSpecStream
from lightning_meta.data.sampler import TEST, TRAIN, VAL
from lightning_meta.envs.metaworld_ml1 import MetaWorldML1, metaworld_missing

MISSING = metaworld_missing()
needs_metaworld = pytest.mark.skipif(MISSING is not None, reason=f"Meta-World ML1 untested: {MISSING}")
ENV = "reach-v3"
pytestmark = pytest.mark.filterwarnings("ignore:.*Box observation space maximum and minimum values are equal")


def test_without_the_extra_constructing_the_family_names_the_fix(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "metaworld" else real_find_spec(n, *a))
    with pytest.raises(ImportError, match=r"needs Meta-World.*pip install 'lightning-meta\[metaworld\]'"):
        MetaWorldML1(ENV)


def _rand_vecs(test: bool) -> np.ndarray:
    from lightning_meta.envs.metaworld_ml1 import ml1_tasks

    return np.stack([pickle.loads(t.data)["rand_vec"] for t in ml1_tasks(ENV, 0, test)])


@needs_metaworld
def test_sample_tasks_is_deterministic_and_train_and_test_goals_are_disjoint():
    family = MetaWorldML1(ENV, horizon=5)
    a, b = (family.sample_tasks(16, np.random.default_rng(3)) for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a) and (a["test"] == 0).all()
    assert not torch.equal(a["goal"], family.sample_tasks(16, np.random.default_rng(4))["goal"])
    held = family.held_out()
    assert held == family and held.split == "test" and family.split == "train"
    assert (held.sample_tasks(4, np.random.default_rng(3))["test"] == 1).all()
    # ML1's goals: 50 per split, none shared between the splits.
    train, test = _rand_vecs(False), _rand_vecs(True)
    assert len(train) == len(test) == 50
    assert not (np.abs(train[:, None] - test[None]).max(-1) < 1e-9).any()
    # The DataModule's streams: training on train goals, validation and test on held-out ones.
    assert (TaskSpecStream(family, 0, TRAIN)[tuple(range(6))].tasks["test"] == 0).all()
    for stream in (VAL, TEST):
        assert (TaskSpecStream(family.held_out(), 0, stream)[tuple(range(6))].tasks["test"] == 1).all()
    with pytest.raises(ValueError, match="not a Meta-World v3 environment"):
        MetaWorldML1("reach-v9")


def _towards_goal(hand: np.ndarray, goal: np.ndarray) -> np.ndarray:
    """A proportional controller to the goal (reach succeeds within 5 cm), gripper open."""
    return np.append(np.clip(10 * (goal - hand), -1, 1), -1.0).astype(np.float32)


@needs_metaworld
@pytest.mark.parametrize(("env_name", "horizon"), [("reach-v3", 45), ("push-v3", 20)])
def test_batched_family_and_gymnasium_twin_give_identical_transitions_and_success(env_name, horizon):
    """The same task, state and actions: bit-identical observations, rewards and `info["success"]`
    in the batched family (one simulator per goal, state restored every step; a goal twice in
    the batch) and Meta-World's own environment behind `lightning_meta/MetaWorldML1-v0`."""
    import gymnasium as gym

    family = MetaWorldML1(env_name, horizon=horizon)
    tasks = family.sample_tasks(2, np.random.default_rng(0))
    tasks = {k: v.repeat_interleave(2) for k, v in tasks.items()}  # [g0, g0, g1, g1]
    rng = np.random.default_rng(1)
    env = gym.make("lightning_meta/MetaWorldML1-v0", env_name=env_name, horizon=horizon)
    twin = []
    for i in range(4):
        obs, info = env.reset(options={"task": {k: v[i].numpy() for k, v in tasks.items()}})
        assert int(info["task"]["goal"]) == int(tasks["goal"][i])
        steps = [(obs, None, None, None)]
        goal = env.unwrapped._env._target_pos.copy()
        for t in range(horizon):
            # rows 0 and 2 steer to the goal (on reach they succeed after ~35 steps); 1 and 3 act at random
            action = _towards_goal(obs[:3], goal) if i % 2 == 0 else rng.uniform(-1, 1, 4).astype(np.float32)
            obs, reward, terminated, truncated, info = env.step(action)
            assert not terminated and truncated == (t == horizon - 1)
            assert {"success", "near_object", "task"} <= set(info)
            steps.append((obs, reward, float(info["success"]), action))
        twin.append(steps)
    state = family.initial_state(tasks)
    for i in range(4):
        np.testing.assert_array_equal(family.observe(tasks, state)[i].numpy(), twin[i][0][0])
    for t in range(1, horizon + 1):
        action = torch.from_numpy(np.stack([twin[i][t][3] for i in range(4)]))
        state, reward = family.step(tasks, state, action, {})
        for i in range(4):
            obs, r, success, _ = twin[i][t]
            np.testing.assert_array_equal(family.observe(tasks, state)[i].numpy(), obs)
            assert reward[i].item() == r and family.success(state)[i].item() == success
    if env_name == "reach-v3":
        assert family.success(state)[[0, 2]].tolist() == [1.0, 1.0]  # the success flag does pass through
    copy = pickle.loads(pickle.dumps(family))  # simulators are left behind and rebuilt
    assert torch.equal(copy.initial_state(tasks), family.initial_state(tasks))
    with pytest.raises(ValueError, match=r"action has shape \(4, 3\); expected \(4, 4\)"):
        family.step(tasks, state, torch.zeros(4, 3), {})


@needs_metaworld
def test_evaluation_envs_autoreset_same_step_explicitly_and_report_the_ended_episode():
    """`metaworld.evaluation` reads `final_info` on the step an episode ends: Gymnasium's
    same-step autoreset. The default next-step mode would spend a step on a fake transition."""
    from gymnasium.vector import AutoresetMode

    from lightning_meta.algorithms.metaworld_eval import test_envs

    envs = test_envs(ENV, num_envs=2, horizon=3)
    assert envs.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP
    envs.call("sample_tasks")  # each environment's first held-out goal, as the protocol does
    envs.reset()
    for t in range(3):
        _, reward, terminated, truncated, info = envs.step(np.zeros((2, 4)))
        assert (reward > 0).all()  # a real transition every step (Meta-World's reward is positive)
        assert not terminated.any() and truncated.all() == (t == 2) and ("final_info" in info) == (t == 2)
    assert "success" in info["final_info"] and "episode" in info["final_info"]  # what `evaluation` reads
    with pytest.raises(ValueError, match="must divide"):
        test_envs(ENV, num_envs=3)


@needs_metaworld
def test_metaworld_evaluation_scores_a_maml_rl_learner_through_the_adapter():
    from lightning_meta.algorithms import MAMLRL
    from lightning_meta.algorithms.metaworld_eval import MAMLRLAgent, RandomAgent, score, test_envs

    torch.manual_seed(0)
    horizon = 4
    learner = MAMLRL(MetaWorldML1(ENV, horizon=horizon), hidden_sizes=(8,), trajectories=2)
    theta = {n: p.detach().clone() for n, p in learner.policy.named_parameters()}
    results = {}
    for steps in (0, 1, 1):
        agent = MAMLRLAgent(learner, num_envs=2, seed=0)
        envs = test_envs(ENV, num_envs=2, horizon=horizon)  # fresh: the same held-out goals each time
        result = score(agent, envs, num_evals=1, adaptation_steps=steps, adaptation_episodes=2)
        moved = any(not torch.equal(agent.params[n][i], theta[n]) for n in theta for i in range(2))
        assert moved == (steps == 1)  # the inner step ran (or, with no adaptation, did not)
        assert 0.0 <= result["success_rate"] <= 1.0 and np.isfinite(result["return"])
        assert results.setdefault(steps, result) == result  # deterministic for the seeds
    assert 0.0 <= score(RandomAgent(2), envs, 1, 0)["success_rate"] <= 1.0
    for n, p in learner.policy.named_parameters():
        assert torch.equal(p, theta[n])  # adapting never touches the learner


def _tiny_pearl(horizon: int, **kwargs):
    from lightning_meta.algorithms import PEARL

    torch.manual_seed(0)
    family = MetaWorldML1(ENV, horizon=horizon)
    return PEARL(family, hidden_size=8, layers=1, encoder_hidden_size=8, encoder_layers=1, **kwargs)


@needs_metaworld
def test_metaworld_evaluation_scores_a_pearl_learner_through_the_adapter():
    """The adapter collects (s, a, r) context while adapting, resamples z from the posterior at
    each episode's end, and evaluates with the posterior's mean: checked against the learner's own
    encoder on the transitions the protocol handed it."""
    from lightning_meta.algorithms.metaworld_eval import PEARLAgent, score, test_envs

    horizon, episodes = 4, 2
    learner = _tiny_pearl(horizon)
    weights = {n: t.clone() for n, t in learner.state_dict().items()}

    class Recording(PEARLAgent):
        def init(self) -> None:
            super().init()
            self.seen, self.zs, self.evals = [], [], []

        def step(self, timestep) -> None:
            self.zs.append(self.z.clone())  # the z this step's action used
            self.seen.append(timestep)
            super().step(timestep)

        def eval_action(self, observations):
            action = super().eval_action(observations)
            self.evals.append((observations, action))
            return action

    results = {}
    for steps in (0, 1, 1):
        agent = Recording(learner, num_envs=2, seed=0)
        envs = test_envs(ENV, num_envs=2, horizon=horizon)  # fresh: the same held-out goals each time
        result = score(agent, envs, num_evals=1, adaptation_steps=steps, adaptation_episodes=episodes)
        assert 0.0 <= result["success_rate"] <= 1.0 and np.isfinite(result["return"])
        assert results.setdefault(steps, result) == result  # deterministic for the seeds
        low, high = envs.single_action_space.low, envs.single_action_space.high
        actions = [t.action for t in agent.seen] + [a for _, a in agent.evals]
        assert agent.evals and all(a.shape == (2, 4) and a.dtype == np.float64 for a in actions)
        assert all((a >= low).all() and (a <= high).all() for a in actions)
        if steps == 0:
            assert not agent.seen and torch.equal(agent.eval_z, torch.zeros(2, learner.latent_dim))
            continue
        assert len(agent.seen) == horizon * episodes
        # z: fixed within an episode, redrawn from the posterior for the second (every env)
        assert all(torch.equal(z, agent.zs[0]) for z in agent.zs[:horizon])
        assert all(torch.equal(z, agent.zs[horizon]) for z in agent.zs[horizon:])
        assert (agent.zs[horizon] != agent.zs[0]).all(dim=1).all()
        # evaluation z: the mean of q(z | every adaptation transition), moved off the prior's mean
        fields = {"obs": "observation", "action": "action", "reward": "reward"}
        recorded = {k: np.stack([getattr(t, name) for t in agent.seen], 1) for k, name in fields.items()}
        context = learner.context_vectors({k: torch.as_tensor(v, dtype=torch.float32) for k, v in recorded.items()})
        with torch.no_grad():
            mean, _ = learner.posterior(context)
        torch.testing.assert_close(agent.eval_z, mean)
        # the second episode's z: a draw from q(z | the first episode), with the agent's seeded noise
        g = torch.Generator().manual_seed(0)
        _, prior_z, eps = (torch.randn(2, learner.latent_dim, generator=g) for _ in range(3))  # built, init(), redraw
        with torch.no_grad():
            mean_1, var_1 = learner.posterior(context[:, :horizon])
        torch.testing.assert_close(agent.zs[0], prior_z)
        torch.testing.assert_close(agent.zs[horizon], mean_1 + var_1.sqrt() * eps)
        assert (agent.eval_z.abs() > 1e-4).any(dim=1).all()
        obs, action = agent.evals[0]
        with torch.no_grad():
            expected = learner.act(torch.as_tensor(obs, dtype=torch.float32), mean, None)
        np.testing.assert_allclose(action, expected.double().numpy(), rtol=1e-6)
    for n, t in learner.state_dict().items():
        assert torch.equal(t, weights[n])  # adapting never touches the learner


@needs_metaworld
def test_the_pearl_adapter_refuses_next_observation_context():
    from lightning_meta.algorithms.metaworld_eval import PEARLAgent

    with pytest.raises(ValueError, match="use_next_obs_in_context=False"):
        PEARLAgent(_tiny_pearl(4, use_next_obs_in_context=True), num_envs=2)


@needs_metaworld
def test_metaworld_evaluation_scores_an_rl2_learner_with_its_hidden_state_carried_into_evaluation():
    """One trial per environment: the GRU state after adapting is the GRU run from zero over every
    adaptation input (never reset at an episode's end), and the first evaluation action comes
    from that state, with the last action, reward and the done flag as its input."""
    from lightning_meta.algorithms import RL2
    from lightning_meta.algorithms.metaworld_eval import RL2Agent, score, test_envs

    torch.manual_seed(0)
    horizon, episodes = 4, 2
    learner = RL2(MetaWorldML1(ENV, horizon=horizon), hidden_size=8)
    weights = {n: t.clone() for n, t in learner.state_dict().items()}

    class Recording(RL2Agent):
        def init(self) -> None:
            super().init()
            self.seen, self.evals, self.adapted = [], [], None

        def step(self, timestep) -> None:
            self.seen.append(timestep)
            super().step(timestep)

        def adapt(self) -> None:
            super().adapt()
            self.adapted = self.hidden.clone()

        def eval_action(self, observations):
            before = self.hidden.clone()
            action = super().eval_action(observations)
            self.evals.append((observations, before, action))
            return action

    results = {}
    for steps in (0, 1, 1):
        agent = Recording(learner, num_envs=2, seed=0)
        envs = test_envs(ENV, num_envs=2, horizon=horizon)
        result = score(agent, envs, num_evals=1, adaptation_steps=steps, adaptation_episodes=episodes)
        assert 0.0 <= result["success_rate"] <= 1.0 and np.isfinite(result["return"])
        assert results.setdefault(steps, result) == result  # deterministic for the seeds
        low, high = envs.single_action_space.low, envs.single_action_space.high
        actions = [t.action for t in agent.seen] + [a for *_, a in agent.evals]
        assert agent.evals and all(a.shape == (2, 4) and a.dtype == np.float64 for a in actions)
        assert all((a >= low).all() and (a <= high).all() for a in actions)
        if steps == 0:
            assert not agent.seen and torch.equal(agent.evals[0][1], torch.zeros(1, 2, 8))  # a fresh trial
            continue
        assert len(agent.seen) == horizon * episodes
        # the adaptation inputs, rebuilt from what the protocol handed the agent
        t32 = lambda v: torch.as_tensor(np.asarray(v), dtype=torch.float32)  # noqa: E731
        inputs, prev = [], (torch.zeros(2, 4), torch.zeros(2), torch.zeros(2))
        for t in agent.seen:
            inputs.append(torch.cat([t32(t.observation), prev[0], prev[1][:, None], prev[2][:, None]], 1))
            prev = (t32(t.action), t32(t.reward), t32(np.logical_or(t.terminated, t.truncated)))
        assert prev[2].tolist() == [1.0, 1.0] and inputs[horizon][:, -1].tolist() == [1.0, 1.0]  # done flags
        with torch.no_grad():
            _, hidden = learner.gru(torch.stack(inputs))
        torch.testing.assert_close(agent.adapted, hidden)  # carried across both episodes, never reset
        obs, before, action = agent.evals[0]
        torch.testing.assert_close(before, hidden)  # ... and into the evaluation
        x = torch.cat([t32(obs), prev[0], prev[1][:, None], torch.ones(2, 1)], 1)  # the last adaptation reward
        with torch.no_grad():
            out, _ = learner.gru(x[None], hidden)
            mean = learner.heads(out[0])[0].clamp(-1, 1)
        np.testing.assert_allclose(action, mean.double().numpy(), rtol=1e-6)
    for n, t in learner.state_dict().items():
        assert torch.equal(t, weights[n])  # adapting never touches the learner


@needs_metaworld
@pytest.mark.filterwarnings("ignore:Using ModelCheckpoint with manual optimization")
def test_a_one_step_fit_through_the_cli_with_the_config(tmp_path):
    from tests.helpers import cli_fit_with_checkpoints

    cli = cli_fit_with_checkpoints(
        "metaworld_ml1/maml_rl.yaml",
        tmp_path,
        1,
        1,
        "--trainer.val_check_interval=1",
        "--model.init_args.hidden_sizes=[8]",
        "--model.init_args.trajectories=2",
        "--model.init_args.cg_iters=2",
        "--model.init_args.family.init_args.horizon=4",
        "--data.init_args.family.init_args.horizon=4",
        "--data.init_args.tasks_per_batch=2",
        "--data.init_args.val_tasks=2",
        "--data.init_args.eval_tasks_per_batch=2",
    )
    assert cli.model.global_step == 1 and isinstance(cli.model.family, MetaWorldML1)
    metrics = cli.trainer.callback_metrics
    for key in ("val/return", "val/return_before", "val/baseline/random_action", "train/return"):
        assert torch.isfinite(metrics[key]), key
    from lightning_meta.algorithms import MAMLRL

    loaded = MAMLRL.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert loaded.family == MetaWorldML1(ENV, horizon=4) and loaded.family.env_name == ENV


def test_linear_baseline_solves_a_singular_float32_system_like_metaworlds_observations():
    """Meta-World's observation has constant entries (zero padding, the hidden goal) and, at a
    reset, the previous frame equal to the current one: in float32 the ridge term is lost next
    to Gram entries of ~1e7 and the system is exactly singular (this stopped the first
    benchmark run). The baseline falls back to float64, as rllab's numpy fit was."""
    from lightning_meta.algorithms.policy_gradient import linear_baseline

    g = torch.Generator().manual_seed(0)
    obs = torch.rand(2, 10, 100, 6, generator=g) * 20 - 10
    obs[..., 0], obs[..., 1], obs[..., 3] = 1.0, 0.0, obs[..., 2]
    returns = torch.rand(2, 10, 100, generator=g)
    fitted = linear_baseline(obs, returns)
    assert fitted.dtype == torch.float32 and torch.isfinite(fitted).all()
    torch.testing.assert_close(fitted.double(), linear_baseline(obs.double(), returns.double()), atol=1e-5, rtol=0)


@needs_metaworld
@pytest.mark.filterwarnings("ignore:Using ModelCheckpoint with manual optimization")
def test_a_one_step_pearl_fit_through_the_cli_with_the_config_is_scored_by_the_protocol(tmp_path):
    """configs/metaworld_ml1/pearl.yaml trains (one training step: collection + 2 gradient steps,
    validation) and its learner is one `PEARLAgent` accepts: (s, a, r) context."""
    from lightning_meta.algorithms import PEARL
    from lightning_meta.algorithms.metaworld_eval import PEARLAgent, score, test_envs
    from tests.helpers import cli_fit_with_checkpoints

    cli = cli_fit_with_checkpoints(
        "metaworld_ml1/pearl.yaml",
        tmp_path,
        6,  # optimizer steps: 3 per gradient step (α is fixed)
        6,
        "--trainer.val_check_interval=1",
        "--model.init_args.family.init_args.horizon=4",
        "--data.init_args.family.init_args.horizon=4",
        "--model.init_args.hidden_size=8",
        "--model.init_args.encoder_hidden_size=8",
        "--model.init_args.gradient_steps=2",
        "--model.init_args.batch_size=4",
        "--model.init_args.context_batch=4",
        "--model.init_args.meta_batch=2",
        "--data.init_args.train_pool=3",
        "--data.init_args.tasks_per_batch=2",
        "--data.init_args.val_tasks=2",
        "--data.init_args.eval_tasks_per_batch=2",
    )
    model = cli.model
    assert isinstance(model, PEARL) and isinstance(model.family, MetaWorldML1) and not model.use_next_obs
    assert model.global_step == 6 and model.family == MetaWorldML1(ENV, horizon=4, episodes=3)
    metrics = cli.trainer.callback_metrics
    for key in ("val/return_first", "val/return_last", "train/return"):
        assert torch.isfinite(metrics[key]), key
    model.eval()
    result = score(PEARLAgent(model, 2), test_envs(ENV, 2, horizon=4), num_evals=1, adaptation_episodes=1)
    assert 0.0 <= result["success_rate"] <= 1.0 and np.isfinite(result["return"])


class _StandInML1:
    """A vector env as Meta-World's evaluation sees ML1's (every environment the same task name):
    environment i reaches its goal at step 3 of every episode if `reachable[i]`, else never (its
    episodes are truncated at the horizon); the episode's return is its length."""

    def __init__(self, reachable: list[bool], horizon: int = 20) -> None:
        self.reachable, self.horizon, self.num_envs = np.array(reachable), horizon, len(reachable)
        self.terminate_on_success = False

    def get_attr(self, name: str) -> list:
        values = {"task_name": "SawyerReachEnvV3", "terminate_on_success": self.terminate_on_success}
        return [values[name]] * self.num_envs

    def call(self, name: str, *args) -> None:
        if name == "toggle_terminate_on_success":
            self.terminate_on_success = args[0]

    def reset(self):
        self.t = np.zeros(self.num_envs, dtype=int)
        return np.zeros((self.num_envs, 39)), {}

    def step(self, actions):
        self.t += 1
        success = self.reachable & (self.t == 3)
        terminated = success & self.terminate_on_success
        truncated = (self.t >= self.horizon) & ~terminated
        done = terminated | truncated
        info = {"final_info": {"success": success.astype(float), "episode": {"r": self.t.astype(float)}}}
        self.t[done] = 0
        return np.zeros((self.num_envs, 39)), np.zeros(self.num_envs), terminated, truncated, info


class _StillAgent:
    """Meta-World's `MetaLearningAgent` protocol with zero actions and no random draws."""

    def init(self) -> None: ...

    def adapt_action(self, observations):
        return np.zeros((observations.shape[0], 4)), {}

    def step(self, timestep) -> None: ...

    def adapt(self) -> None: ...

    def eval_action(self, observations):
        return np.zeros((observations.shape[0], 4))

    def reset(self, env_mask) -> None: ...


@needs_metaworld
@pytest.mark.parametrize("reached", [0, 1, 3, 10])
def test_score_counts_every_goal_where_metaworlds_evaluation_counts_the_first_episodes_to_end(reached):
    """On ML1 every environment has the same task name, and Meta-World's `evaluation` scores the
    first `evaluation_episodes` episodes to end across all of them: the quickest successes. One
    goal of ten reached scores 1.0 there; `score`'s `success_rate` is per goal (0.1), and its
    `metaworld_success_rate` / `metaworld_return` reproduce Meta-World's numbers on the same episodes."""
    from metaworld.evaluation import metalearning_evaluation

    from lightning_meta.algorithms.metaworld_eval import score

    reachable = [i < reached for i in range(10)]
    protocol = {"num_evals": 2, "adaptation_steps": 1, "adaptation_episodes": 2, "evaluation_episodes": 3}
    theirs, their_return, _ = metalearning_evaluation(_StillAgent(), _StandInML1(reachable), **protocol)
    ours = score(_StillAgent(), _StandInML1(reachable), **protocol)
    assert theirs == (1.0 if reached else 0.0)  # Meta-World's number: any early success fills its 3 episodes
    assert ours["success_rate"] == pytest.approx(reached / 10)  # per goal: what was reached
    assert ours["return"] == pytest.approx((3 * reached + 20 * (10 - reached)) / 10)
    assert ours["metaworld_success_rate"] == theirs and ours["metaworld_return"] == pytest.approx(their_return)
