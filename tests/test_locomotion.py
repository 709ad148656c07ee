"""MuJoCo locomotion families (the `mujoco` extra): rewards re-derived by hand from plain
`HalfCheetah-v5` / `Ant-v5` steps, batched family vs Gymnasium twin transitions (bit-identical),
purity of the shared simulator, seeded task sampling, the vector envs' autoreset mode and the
zero/random-action baselines.

`make install` installs the extra, so CI runs all of this; where MuJoCo is absent the tests that
step a simulator are skipped with the reason (and the fix) printed by `-ra`.
"""

from __future__ import annotations

import importlib.util
import pickle

import numpy as np
import pytest
import torch

from lightning_meta.envs import AntDir, HalfCheetahDir, HalfCheetahVel
from lightning_meta.envs import baselines as B
from lightning_meta.envs.locomotion import mujoco_missing

MISSING = mujoco_missing()
needs_mujoco = pytest.mark.skipif(MISSING is not None, reason=f"MuJoCo families untested: {MISSING}")

FAMILIES = {
    "lightning_meta/HalfCheetahVel-v0": HalfCheetahVel,
    "lightning_meta/HalfCheetahDir-v0": HalfCheetahDir,
    "lightning_meta/AntDir-v0": AntDir,
}


def _actions(family, steps: int, tasks: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.uniform(-1, 1, (steps, tasks, family.num_actions)).astype(np.float32))


@needs_mujoco
@pytest.mark.parametrize("family_class", [HalfCheetahVel, HalfCheetahDir, AntDir], ids=lambda c: c.__name__)
def test_reward_is_the_papers_reweighting_of_gymnasiums_info(family_class):
    """One step of the family against the same step of Gymnasium's stock environment, whose
    info terms are re-weighted by hand to the papers' weights."""
    import gymnasium as gym

    family = family_class(horizon=5)
    stock_id = "Ant-v5" if family_class is AntDir else "HalfCheetah-v5"
    stock = gym.make(stock_id, reset_noise_scale=0.0).unwrapped  # stock weights, same start pose
    stock.reset(seed=0)
    action = _actions(family, 2, 1, seed=3)
    key = "velocity" if family_class is HalfCheetahVel else "direction"
    for target in (0.7, 1.9) if key == "velocity" else (1.0, -1.0):
        tasks = {key: torch.tensor([target])}
        state = family.initial_state(tasks)
        stock.reset(seed=0)
        for t in range(2):  # the second step starts from a moving robot
            x_before = stock.data.qpos[0]
            obs, _, _, _, info = stock.step(action[t, 0].numpy())
            velocity = (stock.data.qpos[0] - x_before) / 0.05
            ctrl = 0.05 * float(np.sum(np.square(action[t, 0].numpy().astype(np.float64))))
            if family_class is HalfCheetahVel:
                assert velocity == pytest.approx(info["x_velocity"], abs=1e-12)
                expected = -abs(velocity - target) - ctrl
                np.testing.assert_allclose(info["reward_ctrl"], -2 * ctrl, rtol=1e-6)  # stock weight 0.1
            elif family_class is HalfCheetahDir:
                expected = target * velocity + 0.5 * info["reward_ctrl"]
            else:  # stock Ant-v5: ctrl weight 0.5 (ours 0.005), contact 5e-4 (same), healthy 1 (ours 0.05)
                expected = target * velocity + 0.01 * info["reward_ctrl"] + info["reward_contact"] + 0.05
                assert info["reward_survive"] == 1.0
            state, reward = family.step(tasks, state, action[t], {})
            assert reward.item() == pytest.approx(expected, rel=1e-6, abs=1e-9)
            stock_obs = obs[: family.obs_dim]  # Ant-v5's stock observation appends contact forces
            np.testing.assert_array_equal(family.observe(tasks, state)[0].numpy(), stock_obs)


@needs_mujoco
@pytest.mark.parametrize("env_id", list(FAMILIES))
def test_gymnasium_twin_and_batched_family_give_identical_transitions(env_id):
    """Three tasks stepped together by the batched family (one shared simulator, interleaved)
    against each task alone in its registered Gymnasium environment, over two episodes."""
    import gymnasium as gym

    horizon, episodes = 12, 2
    env = gym.make(env_id, horizon=horizon, episodes=episodes)
    family = env.unwrapped.family
    assert family == FAMILIES[env_id](horizon=horizon, episodes=episodes)
    assert env.observation_space.shape == (family.obs_dim,) and env.action_space.shape == (family.num_actions,)
    gym_tasks = env.unwrapped.sample_tasks(3, np.random.default_rng(4))
    tasks = family.sample_tasks(3, np.random.default_rng(4))
    for key in tasks:
        np.testing.assert_array_equal(np.stack([t[key] for t in gym_tasks]), tasks[key].numpy())
    with pytest.raises(ValueError, match=f"lacks \\['{family.task_keys[0]}'\\].*sample_tasks"):
        env.unwrapped.set_task({})  # a task without the family's keys, refused by name
    actions = _actions(family, episodes * horizon, 3)
    batched_obs, batched_rewards = [], []
    for _ in range(episodes):
        state = family.initial_state(tasks)
        batched_obs.append(family.observe(tasks, state))
        for _ in range(horizon):
            state, reward = family.step(tasks, state, actions[len(batched_rewards)], {})
            batched_obs.append(family.observe(tasks, state))
            batched_rewards.append(reward)
    for i, task in enumerate(gym_tasks):
        obs, info = env.reset(seed=i, options={"task": task})
        assert all(np.array_equal(info["task"][k], task[k]) for k in task)
        step = 0
        for e in range(episodes):
            if e > 0:
                obs, _ = env.reset()  # the task stays across resets
            np.testing.assert_array_equal(obs, batched_obs[e * (horizon + 1)][i].numpy())
            for t in range(horizon):
                obs, reward, terminated, truncated, info = env.step(actions[step, i].numpy())
                np.testing.assert_array_equal(obs, batched_obs[e * (horizon + 1) + t + 1][i].numpy())
                assert reward == batched_rewards[step][i].item()
                assert not terminated and truncated == (t == horizon - 1)
                step += 1
        assert all(np.array_equal(info["task"][k], task[k]) for k in task)


@needs_mujoco
def test_step_is_a_pure_function_of_state_and_action():
    """The shared simulator keeps nothing between calls: a step repeated after other tasks were
    stepped, or with the tasks in another order, gives the same result bit for bit."""
    family = HalfCheetahVel(horizon=5)
    tasks = family.sample_tasks(2, np.random.default_rng(0))
    state = family.initial_state(tasks)
    actions = _actions(family, 4, 2)
    for t in range(3):
        state, _ = family.step(tasks, state, actions[t], {})
    first = family.step(tasks, state, actions[3], {})
    family.step(tasks, family.initial_state(tasks), actions[0], {})  # disturb the simulator
    again = family.step(tasks, state, actions[3], {})
    swap = [1, 0]
    swapped = family.step({k: v[swap] for k, v in tasks.items()}, state[swap], actions[3][swap], {})
    for a, b, c in zip(first, again, swapped, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c[swap])
    assert state.dtype == torch.float64 and state.shape == (2, 9 + 9 + 9)  # qpos, qvel, warm start


@pytest.mark.parametrize("family_class", [HalfCheetahVel, HalfCheetahDir, AntDir], ids=lambda c: c.__name__)
def test_sample_tasks_is_a_function_of_the_seed(family_class):
    family = family_class()
    a = family.sample_tasks(200, np.random.default_rng(5))
    b = family.sample_tasks(200, np.random.default_rng(5))
    c = family.sample_tasks(200, np.random.default_rng(6))
    (key,) = a
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])
    if key == "velocity":
        assert a[key].min() >= 0 and a[key].max() <= 2.0 and a[key].std() > 0.4  # U[0, 2]: std 0.58
        assert HalfCheetahVel(max_velocity=3.0).sample_tasks(200, np.random.default_rng(5))[key].max() > 2.0
    else:
        assert set(a[key].tolist()) == {-1.0, 1.0} and abs(a[key].mean()) < 0.2
    assert family.sample_noise(3, np.random.default_rng(0)) == {}


def test_families_import_and_compare_without_mujoco_and_name_the_fix(monkeypatch):
    family = HalfCheetahVel(horizon=7, max_velocity=3.0)
    assert family == pickle.loads(pickle.dumps(family)) and family != HalfCheetahVel(horizon=7)
    assert (family.obs_dim, family.num_actions, AntDir().obs_dim, AntDir().num_actions) == (17, 6, 27, 8)
    with pytest.raises(ValueError, match="max_velocity=0"):
        HalfCheetahVel(max_velocity=0)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "mujoco" else real_find_spec(n, *a))
    with pytest.raises(ImportError, match=r"HalfCheetahVel needs MuJoCo.*lightning-meta\[mujoco\]"):
        family.initial_state(family.sample_tasks(1, np.random.default_rng(0)))


@needs_mujoco
def test_family_pickles_after_use_and_rejects_a_wrong_action_shape():
    family = AntDir(horizon=3)
    tasks = family.sample_tasks(2, np.random.default_rng(0))
    state = family.initial_state(tasks)
    copy = pickle.loads(pickle.dumps(family))  # the simulator is left behind and rebuilt
    assert torch.equal(copy.initial_state(tasks), state)
    with pytest.raises(ValueError, match=r"action has shape \(2, 6\); expected \(2, 8\)"):
        family.step(tasks, state, torch.zeros(2, 6), {})


@needs_mujoco
def test_vector_env_autoreset_mode_is_explicit_and_same_step_keeps_every_transition():
    """Gymnasium's default (next-step) autoreset spends a step on the reset, reward 0, action
    ignored; `make_vector_env` sets same-step, where the last real observation is in info."""
    import gymnasium as gym
    from gymnasium.vector import AutoresetMode

    from lightning_meta.envs.gym_envs import make_vector_env

    env_id, horizon = "lightning_meta/HalfCheetahDir-v0", 3
    tasks = [{"direction": np.float32(1.0)}, {"direction": np.float32(-1.0)}]
    action = np.full((2, 6), 0.5, dtype=np.float32)  # ctrl cost 0.075 per step: no real step pays 0
    rewards = {}
    for mode in (AutoresetMode.SAME_STEP, AutoresetMode.NEXT_STEP):
        envs = make_vector_env(env_id, tasks, seed=0, autoreset_mode=mode, horizon=horizon)
        assert envs.metadata["autoreset_mode"] == mode
        steps = [envs.step(action) for _ in range(horizon + 1)]
        rewards[mode] = np.stack([s[1] for s in steps])
        if mode == AutoresetMode.SAME_STEP:
            _, _, _, truncated, info = steps[horizon - 1]
            assert truncated.all() and "final_obs" in info
            single = gym.make(env_id, horizon=horizon)
            obs, _ = single.reset(seed=0, options={"task": tasks[0]})
            np.testing.assert_array_equal(steps[horizon - 1][0][0], obs)  # already the reset observation
    assert (rewards[AutoresetMode.SAME_STEP] != 0).all()
    assert (rewards[AutoresetMode.NEXT_STEP][horizon] == 0).all()  # the reset step: a fake transition
    np.testing.assert_array_equal(
        rewards[AutoresetMode.SAME_STEP][:horizon], rewards[AutoresetMode.NEXT_STEP][:horizon]
    )


@needs_mujoco
def test_zero_and_random_action_baselines():
    family = HalfCheetahDir(horizon=20)
    tasks = {"direction": torch.tensor([1.0, -1.0])}
    named = B.baselines(family)
    assert set(named) == {"zero_action", "random_action"}
    zero = named["zero_action"](tasks, {})
    assert zero[0] == -zero[1] and zero[0] != 0  # no control cost; the same drift scored ±1
    random = B.random_action(family, tasks, {}, seed=1)
    assert torch.equal(random, B.random_action(family, tasks, {}, seed=1))
    assert not torch.equal(random, B.random_action(family, tasks, {}, seed=2))
    # Forward terms of opposite sign cancel only under identical actions, so check the cost by hand.
    gen = torch.Generator().manual_seed(1)
    costs = sum(0.05 * ((torch.rand(2, 6, generator=gen) * 2 - 1) ** 2).sum(1) for _ in range(20))
    vel = HalfCheetahVel(horizon=20)
    still = {"velocity": torch.tensor([0.0, 0.0])}
    moving = B.random_action(vel, still, {}, seed=1)
    assert (moving <= -costs + 1e-4).all()  # −|v − 0| ≤ 0 each step, on top of the cost
