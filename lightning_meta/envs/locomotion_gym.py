"""The MuJoCo locomotion families as Gymnasium 1.x environments (the `mujoco` extra).

Each is Gymnasium's own `HalfCheetah-v5` / `Ant-v5` class with the papers' cost weights
(`LocomotionFamily.gym_kwargs`) and the task's reward in place of the forward reward; the
interface is `gym_envs`'s: `sample_tasks(n, rng)` (the batched family's tasks for the same
generator), `set_task(task)` or `reset(options={"task": task})`, `info["task"]`, and
`info["forward_velocity"]` (the velocity the reward scores). Episodes are truncated after
`horizon` steps and never terminate early, and every reset returns the initial pose, as the
batched families do (`lightning_meta.envs.locomotion` says why); the same task, state and
actions give bit-identical observations and rewards in both (tests/test_locomotion.py).

Registered ids (`lightning_meta.envs.gym_envs.register`): `lightning_meta/HalfCheetahVel-v0`,
`lightning_meta/HalfCheetahDir-v0`, `lightning_meta/AntDir-v0`. Importing this module needs
MuJoCo; `gymnasium.make` of those ids imports it only then.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium.envs.mujoco.ant_v5 import AntEnv
from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv

from lightning_meta.envs.gym_envs import TaskHolder
from lightning_meta.envs.locomotion import AntDir, HalfCheetahDir, HalfCheetahVel, LocomotionFamily


class _LocomotionTaskEnv(TaskHolder):
    """Task handling on top of a Gymnasium MuJoCo class (first in the bases, so it wraps its
    `reset` and `step`)."""

    family: LocomotionFamily

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        obs, info = super().reset(seed=seed, options=options)
        self._take_task(options)
        self.t = 0
        return obs, {**info, "task": self._task_info()}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        action = np.asarray(action, dtype=np.float32)  # as the batched family passes it
        x_before = float(self.data.qpos[0])
        obs, _, _, _, info = super().step(action)
        velocity = (float(self.data.qpos[0]) - x_before) / self.family.dt
        task = {key: np.float64(value) for key, value in self.task.items()}
        terms = {key: np.float64(info[key]) for key in self.family.cost_terms}
        reward = float(self.family.reward(task, np.float64(velocity), terms))
        self.t += 1
        info = {**info, "forward_velocity": velocity, "task": self._task_info()}
        return obs, reward, False, self.t >= self.family.horizon, info


class HalfCheetahVelEnv(_LocomotionTaskEnv, HalfCheetahEnv):
    """`HalfCheetahVel` as a Gymnasium environment.

    Args:
        horizon: steps per episode; truncated after it.
        episodes: episodes per trial; recorded for trial-level tools.
        max_velocity: the upper end of the target distribution.
        render_mode: Gymnasium's.
    """

    def __init__(
        self, horizon: int = 200, episodes: int = 1, max_velocity: float = 2.0, render_mode: str | None = None
    ) -> None:
        self.family, self.task, self.t = HalfCheetahVel(horizon, episodes, max_velocity), None, 0
        HalfCheetahEnv.__init__(self, **self.family.gym_kwargs, render_mode=render_mode)


class HalfCheetahDirEnv(_LocomotionTaskEnv, HalfCheetahEnv):
    """`HalfCheetahDir` as a Gymnasium environment.

    Args:
        horizon: steps per episode; truncated after it.
        episodes: episodes per trial; recorded for trial-level tools.
        render_mode: Gymnasium's.
    """

    def __init__(self, horizon: int = 200, episodes: int = 1, render_mode: str | None = None) -> None:
        self.family, self.task, self.t = HalfCheetahDir(horizon, episodes), None, 0
        HalfCheetahEnv.__init__(self, **self.family.gym_kwargs, render_mode=render_mode)


class AntDirEnv(_LocomotionTaskEnv, AntEnv):
    """`AntDir` as a Gymnasium environment.

    Args:
        horizon: steps per episode; truncated after it.
        episodes: episodes per trial; recorded for trial-level tools.
        render_mode: Gymnasium's.
    """

    def __init__(self, horizon: int = 200, episodes: int = 1, render_mode: str | None = None) -> None:
        self.family, self.task, self.t = AntDir(horizon, episodes), None, 0
        AntEnv.__init__(self, **self.family.gym_kwargs, render_mode=render_mode)
