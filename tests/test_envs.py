"""Meta-RL task families: reward formulas by hand, batched torch vs Gymnasium transitions,
seeded task sampling, the vector envs' autoreset mode, and the baselines on known tasks."""

from __future__ import annotations

import copy
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode

from lightning_meta.envs import BernoulliBandit, Navigation2D, TabularMDP, step_noise
from lightning_meta.envs import baselines as B
from lightning_meta.envs.gym_envs import make_vector_env


def test_bandit_reward_is_one_exactly_when_the_uniform_is_below_the_arms_probability():
    family = BernoulliBandit(arms=3, pulls=2)
    tasks = {"probs": torch.tensor([[0.2, 0.7, 0.5], [0.2, 0.7, 0.5]])}
    state = family.initial_state(tasks)
    _, reward = family.step(tasks, state, torch.tensor([1, 0]), {"u": torch.tensor([0.69, 0.21])})
    assert reward.tolist() == [1.0, 0.0]


def test_mdp_step_by_hand():
    family = TabularMDP(states=3, actions=2, horizon=2, episodes=1)
    transitions = torch.zeros(1, 3, 2, 3)
    transitions[0, 0, 1] = torch.tensor([0.25, 0.5, 0.25])
    rewards = torch.zeros(1, 3, 2)
    rewards[0, 0, 1] = 1.5
    tasks = {"transitions": transitions, "rewards": rewards}
    for u, expected in ((0.1, 0), (0.3, 1), (0.74, 1), (0.8, 2), (0.99999, 2)):
        state, reward = family.step(
            tasks, torch.tensor([0]), torch.tensor([1]), {"u": torch.tensor([u]), "z": torch.tensor([-0.5])}
        )
        assert state.item() == expected and reward.item() == 1.0
    assert family.observe(tasks, torch.tensor([2])).tolist() == [[0.0, 0.0, 1.0]]


@pytest.mark.parametrize("family", [BernoulliBandit(4, 7), TabularMDP(4, 3, 5, 2)], ids=repr)
def test_sample_tasks_is_a_function_of_the_seed(family):
    a = family.sample_tasks(3, np.random.default_rng(5))
    b = family.sample_tasks(3, np.random.default_rng(5))
    c = family.sample_tasks(3, np.random.default_rng(6))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    if isinstance(family, TabularMDP):
        torch.testing.assert_close(a["transitions"].sum(-1), torch.ones(3, 4, 3))


@pytest.mark.parametrize(
    ("env_id", "kwargs"),
    [("lightning_meta/Bandit-v0", {"arms": 5, "pulls": 12}), ("lightning_meta/TabularMDP-v0", {"episodes": 4})],
)
def test_gymnasium_env_and_batched_family_give_identical_transitions(env_id, kwargs):
    env = gym.make(env_id, **kwargs)
    family = env.unwrapped.family
    task = env.unwrapped.sample_tasks(1, np.random.default_rng(3))[0]
    obs, info = env.reset(seed=11, options={"task": task})
    assert all(np.array_equal(info["task"][k], task[k]) for k in task)
    # The noise the env will draw, in its order, from a copy of its generator.
    rng = copy.deepcopy(env.unwrapped.np_random)
    keys = family.sample_noise(1, np.random.default_rng(0))  # "u", then "z" for the MDP
    noise = {key: torch.zeros(1, family.episodes, family.horizon) for key in keys}
    for e in range(family.episodes):
        for t in range(family.horizon):
            for key in noise:  # "u" then "z"
                draw = rng.random() if key == "u" else rng.standard_normal()
                noise[key][0, e, t] = float(np.float32(draw))
    tasks = {key: torch.from_numpy(value)[None] for key, value in task.items()}
    actions = torch.from_numpy(np.random.default_rng(0).integers(family.num_actions, size=family.trial_steps))
    state, gym_rewards, torch_rewards, step = family.initial_state(tasks), [], [], 0
    for e in range(family.episodes):
        if e > 0:
            obs, _ = env.reset()
            state = family.initial_state(tasks)
        for t in range(family.horizon):
            torch.testing.assert_close(torch.from_numpy(obs)[None], family.observe(tasks, state))
            obs, reward, terminated, truncated, info = env.step(int(actions[step]))
            state, r = family.step(tasks, state, actions[step : step + 1], step_noise(noise, e, t))
            gym_rewards.append(reward)
            torch_rewards.append(r.item())
            assert (terminated or truncated) == (t == family.horizon - 1)
            step += 1
        torch.testing.assert_close(torch.from_numpy(obs)[None], family.observe(tasks, state))
    assert len(set(gym_rewards)) > 1  # the noise matters
    np.testing.assert_allclose(gym_rewards, torch_rewards, rtol=0, atol=1e-6)


def _vector_bandit_trial(mode: AutoresetMode) -> np.ndarray:
    env = gym.make("lightning_meta/Bandit-v0", arms=3, pulls=6)
    tasks = env.unwrapped.sample_tasks(2, np.random.default_rng(0))
    tasks[0]["probs"][:] = 1.0  # every real pull of task 0 wins
    envs = make_vector_env("lightning_meta/Bandit-v0", tasks, seed=0, autoreset_mode=mode, arms=3, pulls=6)
    rewards = [envs.step(np.zeros(2, dtype=np.int64))[1] for _ in range(6)]
    return np.stack(rewards)


def test_make_vector_env_sets_same_step_autoreset_so_every_step_is_a_real_pull():
    envs = make_vector_env("lightning_meta/Bandit-v0", [{"probs": np.ones(3, np.float32)}], arms=3)
    assert envs.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP
    assert _vector_bandit_trial(AutoresetMode.SAME_STEP)[:, 0].tolist() == [1.0] * 6
    # Gymnasium's default: every other step is a reset step with reward 0, a fake pull.
    assert _vector_bandit_trial(AutoresetMode.NEXT_STEP)[:, 0].tolist() == [1.0, 0.0] * 3


def test_gym_env_passes_gymnasiums_checker():
    from gymnasium.utils.env_checker import check_env

    for env_id in ("lightning_meta/Bandit-v0", "lightning_meta/TabularMDP-v0", "lightning_meta/Navigation2D-v0"):
        check_env(gym.make(env_id).unwrapped, skip_render_check=True)


def test_baselines_on_known_tasks():
    family = BernoulliBandit(arms=3, pulls=20)
    tasks = {"probs": torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])}
    noise = family.sample_noise(2, np.random.default_rng(0))
    assert B.bandit_oracle(family, tasks, noise).tolist() == [20.0, 20.0]
    # Deterministic arms: after one pull of each, the greedy and UCB1 indices find the winner.
    assert B.greedy(family, tasks, noise).tolist() == [18.0, 18.0]
    assert B.thompson(family, tasks, noise).min() >= 14
    many = BernoulliBandit(3, 3000)
    r = B.random_policy(many, tasks, many.sample_noise(2, np.random.default_rng(1)))
    torch.testing.assert_close(r / 3000, tasks["probs"].mean(1), atol=0.03, rtol=0)


def test_every_baseline_has_a_table_label():
    from lightning_meta.envs import AntDir, HalfCheetahVel  # built without MuJoCo: it loads on the first step

    families = (BernoulliBandit(3, 4), TabularMDP(), Navigation2D(), HalfCheetahVel(), AntDir())
    names = {name for family in families for name in B.baselines(family)}
    assert names and names <= set(B.LABELS), names - set(B.LABELS)


def test_value_iteration_oracle_beats_random_and_matches_a_hand_solved_mdp():
    family = TabularMDP(states=2, actions=2, horizon=3, episodes=1)
    # Action 1 in state 0 moves to state 1 for reward 0; state 1 pays 2 per step whatever the action.
    transitions = torch.zeros(1, 2, 2, 2)
    transitions[0, 0, 0, 0] = transitions[0, 0, 1, 1] = transitions[0, 1, :, 1] = 1.0
    rewards = torch.tensor([[[1.0, 0.0], [2.0, 2.0]]])
    tasks = {"transitions": transitions, "rewards": rewards}
    noise = {"u": torch.full((1, 1, 3), 0.5), "z": torch.zeros(1, 1, 3)}
    assert B.mdp_oracle(family, tasks, noise).item() == 4.0  # 0 + 2 + 2 beats 1 + 1 + 1
    plan = B.value_iteration(family, tasks)[0, :, 0]  # the actions in state 0 at steps 0, 1, 2
    assert plan[0] == 1 and plan[2] == 0  # move first; on the last step take the 1 (step 1 is a tie)


def test_envs_do_not_import_lightning():
    code = (
        "import sys; import lightning_meta.envs.families, lightning_meta.envs.baselines; "
        "assert 'pytorch_lightning' not in sys.modules and 'lightning' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_navigation_by_hand_and_against_its_gymnasium_twin():
    family = Navigation2D(horizon=4)
    tasks = {"goal": torch.tensor([[0.3, -0.05]])}
    state, reward = family.step(tasks, family.initial_state(tasks), torch.tensor([[0.5, -0.02]]), {})
    torch.testing.assert_close(state, torch.tensor([[0.1, -0.02]]))  # the move is clipped to ±0.1
    torch.testing.assert_close(reward, -torch.tensor([(0.2**2 + 0.03**2) ** 0.5]))
    env = gym.make("lightning_meta/Navigation2D-v0", horizon=4)
    obs, _ = env.reset(seed=0, options={"task": {"goal": np.array([0.3, -0.05], np.float32)}})
    state = family.initial_state(tasks)
    for action in ([0.5, -0.02], [0.05, 0.3], [-0.2, 0.0], [0.01, 0.01]):
        obs, reward, terminated, truncated, _ = env.step(np.array(action, np.float32))
        state, r = family.step(tasks, state, torch.tensor([action]), {})
        np.testing.assert_allclose(obs, state[0].numpy(), atol=1e-7)
        assert reward == pytest.approx(r.item(), abs=1e-6)
    assert truncated and not terminated


def test_navigation_baselines_stand_still_near_minus_38_and_the_oracle_reaches_the_goal():
    family = Navigation2D()
    tasks = family.sample_tasks(2000, np.random.default_rng(0))
    still = B.stand_still(family, tasks, {})
    assert still.mean().item() == pytest.approx(-38.3, abs=1.0)  # 100 × E|goal|, goal ~ U[-0.5, 0.5]²
    oracle = B.navigation_oracle(family, tasks, {})
    assert (oracle > still).all() and oracle.mean() > -3.5
