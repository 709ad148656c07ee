"""The task families as Gymnasium 1.x environments, for any Gymnasium tool.

One environment is one task at a time: `sample_tasks(n, rng)` draws tasks (numpy arrays, the
same tasks as the batched family's `sample_tasks` for the same generator), `set_task(task)`
(or `reset(options={"task": task})`) switches to one, and `info["task"]` carries it. An episode
is one episode of a trial (a bandit pull is an episode of one step); the task stays across
`reset`s until it is changed, so a trial is `episodes` consecutive episodes.

Each step draws its noise from the environment's `np_random` in a fixed order (bandit: one
uniform; MDP: one uniform for the next state, then one normal for the reward) and applies the
same formula as the batched family, so both give identical transitions for the same task,
actions and noise (tests/test_envs.py).

Registered ids: `lightning_meta/Bandit-v0`, `lightning_meta/TabularMDP-v0`,
`lightning_meta/Navigation2D-v0`, and the MuJoCo families' `lightning_meta/HalfCheetahVel-v0`,
`lightning_meta/HalfCheetahDir-v0`, `lightning_meta/AntDir-v0` (`locomotion_gym.py`, the
`mujoco` extra).

Gymnasium's vector environments autoreset on the *next* step by default: the step after an
episode ends returns the reset observation with reward 0 and ignores the action, so a sampler
that counts every step as a transition would record fake pulls. `make_vector_env` always sets
the mode explicitly (same-step by default: every step is a real transition, the last
observation of an ended episode is in `info["final_obs"]`).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from lightning_meta.envs.families import BernoulliBandit, Navigation2D, TabularMDP, TaskFamily

TaskArrays = dict[str, np.ndarray]
"""One task's parameters, as numpy arrays."""


class TaskHolder:
    """The task interface every family's Gymnasium twin shares: `sample_tasks`, `set_task`, the
    task in `info`. A mixin without a Gymnasium base, so the MuJoCo and Meta-World twins put it
    in front of (or beside) their own environment class; `self.family` is the batched family."""

    family: TaskFamily
    task: TaskArrays | None = None

    def sample_tasks(self, n: int, rng: np.random.Generator) -> list[TaskArrays]:
        """`n` tasks from `rng`, as the batched family draws them."""
        batch = self.family.sample_tasks(n, rng)
        return [{key: value[i].numpy() for key, value in batch.items()} for i in range(n)]

    def set_task(self, task: TaskArrays) -> None:
        """Switch to `task`; a family with `task_keys` refuses a task that lacks one."""
        missing = set(getattr(self.family, "task_keys", ())) - set(task)
        if missing:
            raise ValueError(f"task {task} lacks {sorted(missing)}: use sample_tasks() to make one")
        self.task = {key: np.asarray(value) for key, value in task.items()}

    def _task_info(self) -> TaskArrays:
        # A fresh dict per call: users keep infos, and Gymnasium's checker refuses shared ones.
        return {key: value.copy() for key, value in self.task.items()}

    def _take_task(self, options: dict[str, Any] | None) -> None:
        """At `reset`: the task in `options`, else the current one, else one drawn from the
        environment's `np_random` (seeded by `reset(seed=...)`)."""
        if options and "task" in options:
            self.set_task(options["task"])
        if self.task is None:
            self.set_task(self.sample_tasks(1, self.np_random)[0])


class _TaskEnv(TaskHolder, gym.Env):
    """Shared task handling; subclasses define the spaces and `_reset_state` / `_step`."""

    def __init__(self) -> None:
        self.task = None
        self.t = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._take_task(options)
        self.t = 0
        self.state = self._initial_state()
        return self._obs(), self._info()

    def _initial_state(self) -> Any:
        return 0  # the first state of every episode

    def _info(self) -> dict[str, TaskArrays]:
        return {"task": self._task_info()}

    def _obs(self) -> np.ndarray:
        raise NotImplementedError


class BanditEnv(_TaskEnv):
    """A Bernoulli bandit task (`BernoulliBandit`): one pull per episode.

    Args:
        arms: number of arms (k).
        pulls: pulls per trial (n); recorded for trial-level tools, an episode is one pull.
    """

    def __init__(self, arms: int = 5, pulls: int = 10) -> None:
        super().__init__()
        self.family = BernoulliBandit(arms, pulls)
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(1,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(arms)

    def _obs(self) -> np.ndarray:
        return np.zeros(1, dtype=np.float32)

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        u = np.float32(self.np_random.random())
        reward = float(u < self.task["probs"][int(action)])
        return self._obs(), reward, True, False, self._info()


class TabularMDPEnv(_TaskEnv):
    """A random tabular MDP task (`TabularMDP`): episodes of `horizon` steps from state 0.

    Args:
        states: |S|.
        actions: |A|.
        horizon: steps per episode (H); the episode is truncated after it.
        episodes: episodes per trial (n); recorded for trial-level tools.
    """

    def __init__(self, states: int = 10, actions: int = 5, horizon: int = 10, episodes: int = 10) -> None:
        super().__init__()
        self.family = TabularMDP(states, actions, horizon, episodes)
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(states,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(actions)

    def _obs(self) -> np.ndarray:
        obs = np.zeros(self.family.states, dtype=np.float32)
        obs[self.state] = 1.0
        return obs

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        u = np.float32(self.np_random.random())
        z = np.float32(self.np_random.standard_normal())
        a = int(action)
        reward = float(np.float32(self.task["rewards"][self.state, a] + z))
        cdf = np.cumsum(self.task["transitions"][self.state, a])
        self.state = min(int((cdf <= u).sum()), self.family.states - 1)
        self.t += 1
        return self._obs(), reward, False, self.t >= self.family.horizon, self._info()


class Navigation2DEnv(_TaskEnv):
    """2D navigation to a goal (`Navigation2D`): episodes of `horizon` steps from the origin.

    Args:
        horizon: steps per episode (H); the episode is truncated after it.
        episodes: episodes per trial; recorded for trial-level tools.
        max_move: the per-coordinate clip of an action.
    """

    def __init__(self, horizon: int = 100, episodes: int = 1, max_move: float = 0.1) -> None:
        super().__init__()
        self.family = Navigation2D(horizon, episodes, max_move)
        reach = horizon * max_move  # the farthest an episode can go from the origin
        self.observation_space = gym.spaces.Box(-reach, reach, shape=(2,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-max_move, max_move, shape=(2,), dtype=np.float32)

    def _initial_state(self) -> np.ndarray:
        return np.zeros(2, dtype=np.float32)

    def _obs(self) -> np.ndarray:
        return np.asarray(self.state, dtype=np.float32).copy()

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        move = np.clip(np.asarray(action, dtype=np.float32), -self.family.max_move, self.family.max_move)
        self.state = (self.state + move).astype(np.float32)
        reward = -float(np.linalg.norm(self.state - self.task["goal"]))
        self.t += 1
        return self._obs(), reward, False, self.t >= self.family.horizon, self._info()


def make_vector_env(
    env_id: str,
    tasks: list[TaskArrays],
    seed: int | None = None,
    autoreset_mode: AutoresetMode = AutoresetMode.SAME_STEP,
    **kwargs: Any,
) -> SyncVectorEnv:
    """A `SyncVectorEnv` of one environment per task, with the autoreset mode set explicitly.

    Args:
        env_id: a registered id, e.g. "lightning_meta/Bandit-v0".
        tasks: one task per sub-environment.
        seed: seeds sub-environment i with `seed + i` at the first reset (None: unseeded).
        autoreset_mode: Gymnasium's autoreset mode; same-step by default (see the module docstring).
        kwargs: the environment's constructor arguments.
    """
    envs = SyncVectorEnv([lambda: gym.make(env_id, **kwargs) for _ in tasks], autoreset_mode=autoreset_mode)
    for env, task in zip(envs.envs, tasks, strict=True):
        env.unwrapped.set_task(task)
    if seed is not None:
        envs.reset(seed=seed)
    return envs


def register() -> None:
    """Register the ids with Gymnasium (done on import of `lightning_meta.envs`)."""
    for env_id, entry_point in (
        ("lightning_meta/Bandit-v0", "lightning_meta.envs.gym_envs:BanditEnv"),
        ("lightning_meta/TabularMDP-v0", "lightning_meta.envs.gym_envs:TabularMDPEnv"),
        ("lightning_meta/Navigation2D-v0", "lightning_meta.envs.gym_envs:Navigation2DEnv"),
        # The `mujoco` extra's; their module (and MuJoCo) is imported by `gymnasium.make` only.
        ("lightning_meta/HalfCheetahVel-v0", "lightning_meta.envs.locomotion_gym:HalfCheetahVelEnv"),
        ("lightning_meta/HalfCheetahDir-v0", "lightning_meta.envs.locomotion_gym:HalfCheetahDirEnv"),
        ("lightning_meta/AntDir-v0", "lightning_meta.envs.locomotion_gym:AntDirEnv"),
        # The `metaworld` extra's (Meta-World ML1, one environment's goals; `env_name` an argument).
        ("lightning_meta/MetaWorldML1-v0", "lightning_meta.envs.metaworld_gym:MetaWorldML1Env"),
    ):
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=entry_point, disable_env_checker=False)
