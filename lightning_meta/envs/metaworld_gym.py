"""Meta-World ML1 as a Gymnasium 1.x environment with the project's task interface (the `metaworld` extra).

`MetaWorldML1Env` is Meta-World's own environment, stepped as it is (no state restore: the
reference the batched `MetaWorldML1` family is tested against), with the interface of
`gym_envs`: `sample_tasks(n, rng)` (the batched family's tasks for the same generator),
`set_task(task)` or `reset(options={"task": task})`, `info["task"]`, and Meta-World's own
`info` (`success`, `near_object`, ...) passed through. Episodes are truncated after `horizon`
steps and never terminate early.

Registered id (`lightning_meta.envs.gym_envs.register`): `lightning_meta/MetaWorldML1-v0`;
`gymnasium.make` imports this module, and Meta-World, only then.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from lightning_meta.envs.gym_envs import TaskArrays, TaskHolder
from lightning_meta.envs.metaworld_ml1 import MetaWorldML1, make_env


class MetaWorldML1Env(TaskHolder, gym.Env):
    """`MetaWorldML1` as a Gymnasium environment.

    Args:
        env_name: the Meta-World v3 environment.
        horizon: steps per episode; truncated after it.
        episodes: episodes per trial; recorded for trial-level tools.
        split: the goals `sample_tasks` draws ("train" or "test").
        benchmark_seed: the seed of `metaworld.ML1`.
    """

    metadata = {"render_modes": []}  # noqa: RUF012 (Gymnasium's convention)

    def __init__(
        self,
        env_name: str = "reach-v3",
        horizon: int = 500,
        episodes: int = 1,
        split: str = "train",
        benchmark_seed: int = 0,
    ) -> None:
        self.family = MetaWorldML1(env_name, horizon, episodes, split, benchmark_seed)
        self.task: TaskArrays | None = None
        self._env: Any = None
        self._envs: dict[tuple[int, int], Any] = {}
        self.t = 0
        probe, _ = make_env(env_name, benchmark_seed, split == "test", 0)
        self._envs[(int(split == "test"), 0)] = probe  # goal 0's simulator: reused, not built again at reset
        self.observation_space = probe.observation_space
        self.action_space = probe.action_space

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._take_task(options)
        key = (int(self.task["test"]), int(self.task["goal"]))
        if key not in self._envs:
            self._envs[key], _ = make_env(self.family.env_name, self.family.benchmark_seed, bool(key[0]), key[1])
        self._env = self._envs[key]
        obs, info = self._env.reset()
        self.t = 0
        return obs, {**info, "task": self._task_info()}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self._env is None:
            raise RuntimeError("call reset() before step()")
        obs, reward, _, _, info = self._env.step(np.asarray(action, dtype=np.float32))
        self.t += 1
        return obs, float(reward), False, self.t >= self.family.horizon, {**info, "task": self._task_info()}
