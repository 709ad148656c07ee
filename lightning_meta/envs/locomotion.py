"""MuJoCo locomotion task families (the `mujoco` extra): HalfCheetah-Vel, HalfCheetah-Dir, Ant-Dir.

The meta-RL locomotion benchmarks of MAML (Finn et al. 2017 §5.3, Fig. 5) and PEARL (Rakelly et
al. 2019, Fig. 3), as reward re-weightings of Gymnasium's `HalfCheetah-v5` and `Ant-v5`: the
simulator, its observation and its cost terms are Gymnasium's, configured with the papers'
weights, and only the forward term depends on the task.

- `HalfCheetahVel`: target velocity v ~ U[0, 2] (MAML; PEARL's oyster code draws U[0, 3]),
  reward −|forward velocity − v| − 0.05·‖a‖².
- `HalfCheetahDir`: direction d = ±1 with probability ½ each, reward d·forward velocity − 0.05·‖a‖².
- `AntDir` (MAML's Ant forward/backward): d = ±1, reward d·forward velocity − 0.005·‖a‖²
  − 5·10⁻⁴·‖clip(contact forces, ±1)‖² + 0.05 while the torso height is in [0.2, 1].

The forward velocity is the root's x displacement over the step divided by the step's duration
(`(qpos_after[0] − qpos_before[0]) / dt`, dt = 0.05 s for both robots); this is
`info["x_velocity"]` of `HalfCheetah-v5`. `Ant-v5`'s own `info["x_velocity"]` differences the
torso's Cartesian position, which MuJoCo last computed at the start of the final physics
substep, so it lags by a substep and is not a function of the state: the Ant-Dir reward uses
the root joint's `qpos[0]` instead (the rllab original used the torso's instantaneous velocity).

What differs from the papers' rllab / mujoco-py environments, on purpose:
- Episodes have a fixed horizon (200 steps, as in both papers) and never terminate early: the
  batched interface has no done signal, so Ant-Dir pays its survival bonus only while healthy
  instead of ending the episode (MAML ended it).
- Every episode starts exactly at the model's initial pose (Gymnasium's reset noise off):
  `TaskFamily.initial_state` takes no noise, and the Gymnasium twins must match it. rllab
  added N(0, 0.01²) noise to the initial joint positions.
- The Ant observation leaves out the external contact forces (`cfrc_ext`): with MuJoCo ≥ 2.0
  the old environments observed zeros there, and they are not a function of the state.
- Gymnasium's control cost squares the action as given (MuJoCo clamps the control to [−1, 1]);
  rllab clipped before the cost. Policies whose actions stay in [−1, 1] see no difference.

How the batched families step: the state of a task is the simulator state that determines its
next step, `[tasks, nq + 2·nv]` float64: joint positions `qpos`, joint velocities `qvel` and
the constraint solver's warm start `qacc_warmstart` (without it, a restored state steps to
within ~1e-13 of the original, with it exactly). `step` keeps the family's pure
(tasks, state, action, noise) → (next state, reward) interface, but it is *not* batched in
tensors: for each task it writes the state into one MuJoCo simulator, steps it with
Gymnasium's `step`, reads the new state and the cost terms back. Because the whole state is
restored every time, one simulator serves every task and the result does not depend on which
tasks were stepped before (tests/test_locomotion.py checks it against the Gymnasium twins
step by step). The dynamics are deterministic: `sample_noise` is empty.

MuJoCo and Gymnasium are imported when a family first steps, so `lightning_meta.envs` imports
without them; constructing the simulator without them raises an ImportError naming the fix.
Pure torch, numpy and Gymnasium: nothing here imports Lightning (DESIGN.md layering).
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_meta.envs.families import Noise, TaskFamily, Tasks

INSTALL_HINT = "pip install 'lightning-meta[mujoco]' (Gymnasium's MuJoCo environments: gymnasium[mujoco])"

ArrayLike = Any
"""A float64 numpy array or torch tensor: the reward formulas serve both twins."""


def mujoco_missing() -> str | None:
    """Why the MuJoCo families cannot run here (None when they can): for skips and errors."""
    for module in ("gymnasium", "mujoco"):
        if importlib.util.find_spec(module) is None:
            return f"the `{module}` package is not installed: {INSTALL_HINT}"
    return None


class LocomotionFamily(TaskFamily):
    """A task family over one Gymnasium MuJoCo robot; see the module docstring.

    Subclasses name the Gymnasium environment class and its constructor arguments (the
    papers' cost weights), the observation slice of the state, and the task distribution and
    reward.

    Args:
        horizon: steps per episode (H; both papers: 200).
        episodes: episodes per trial.
    """

    discrete = False
    gym_class: str
    """`module:Class` of the Gymnasium environment simulated."""
    gym_kwargs: dict[str, Any]
    """Its constructor arguments."""
    nq: int
    nv: int
    skipped_positions: int
    """Leading `qpos` entries left out of the observation (the root's x, or x and y)."""
    dt = 0.05
    """Seconds per environment step (Gymnasium's frame_skip × timestep for both robots)."""

    def __init__(self, horizon: int = 200, episodes: int = 1) -> None:
        super().__init__(episodes=episodes, horizon=horizon)
        self.obs_dim = self.nq - self.skipped_positions + self.nv
        self._sim: Any = None
        self._initial: Tensor | None = None

    def config(self) -> dict[str, Any]:
        return {"horizon": self.horizon, "episodes": self.episodes}

    def __getstate__(self) -> dict[str, Any]:
        # The simulator is rebuilt on demand: MuJoCo objects do not pickle (checkpoints, DDP spawn).
        return {**self.__dict__, "_sim": None}

    def simulator(self) -> Any:
        """The Gymnasium environment that steps every task (built on first use)."""
        if self._sim is None:
            if (reason := mujoco_missing()) is not None:
                raise ImportError(f"{type(self).__name__} needs MuJoCo: {reason}")
            module, name = self.gym_class.split(":")
            env = getattr(importlib.import_module(module), name)(**self.gym_kwargs)
            env.reset(seed=0)  # no reset noise: the initial pose, whatever the seed
            if (env.model.nq, env.model.nv) != (self.nq, self.nv):
                raise RuntimeError(
                    f"{self.gym_class} has nq, nv = {env.model.nq}, {env.model.nv}, not {self.nq}, {self.nv}"
                )
            if not np.isclose(env.dt, self.dt):
                raise RuntimeError(f"{self.gym_class} steps {env.dt} s, not {self.dt} s")
            self._sim = env
            self._initial = torch.from_numpy(read_state(env))
        return self._sim

    def sample_noise(self, n: int, rng: np.random.Generator) -> Noise:
        return {}  # deterministic dynamics and resets

    def initial_state(self, tasks: Tasks) -> Tensor:
        """The simulator state after a reset, `[tasks, nq + 2·nv]` float64."""
        self.simulator()
        first = next(iter(tasks.values()))
        return self._initial.to(first.device).expand(first.shape[0], -1).clone()

    def observe(self, tasks: Tasks, state: Tensor) -> Tensor:
        """Gymnasium's observation: `qpos` without the root's leading coordinates, then `qvel`."""
        return state[:, self.skipped_positions : self.nq + self.nv]

    def step(self, tasks: Tasks, state: Tensor, action: Tensor, noise: Noise) -> tuple[Tensor, Tensor]:
        """Step each task in turn through the simulator (a Python loop; see the module docstring)."""
        if action.shape != (state.shape[0], self.num_actions):
            raise ValueError(f"action has shape {tuple(action.shape)}; expected {(state.shape[0], self.num_actions)}")
        env = self.simulator()
        states = state.detach().cpu().double().numpy()
        actions = action.detach().cpu().numpy().astype(np.float32)  # the action space's dtype, as the twins use
        next_states = np.empty_like(states)
        terms: dict[str, list[float]] = {}
        for i in range(states.shape[0]):
            write_state(env, states[i])
            _, _, _, _, info = env.step(actions[i])
            next_states[i] = read_state(env)
            for key in self.cost_terms:
                terms.setdefault(key, []).append(float(info[key]))
        velocity = (next_states[:, 0] - states[:, 0]) / self.dt
        costs = {key: torch.tensor(values, dtype=torch.float64) for key, values in terms.items()}
        task = {key: value.detach().cpu().double() for key, value in tasks.items()}
        reward = self.reward(task, torch.from_numpy(velocity), costs)
        return torch.from_numpy(next_states).to(state.device), reward.to(state.device)

    task_keys: tuple[str, ...]
    """The entries of a task."""
    cost_terms: tuple[str, ...] = ("reward_ctrl",)
    """The `info` entries (already negative costs or bonuses) added to the forward term."""

    def reward(self, task: dict[str, ArrayLike], velocity: ArrayLike, info: dict[str, ArrayLike]) -> ArrayLike:
        """The reward from the task, the forward velocity and Gymnasium's cost terms; numpy or torch."""
        return self.forward_reward(task, velocity) + sum(info[key] for key in self.cost_terms)

    def forward_reward(self, task: dict[str, ArrayLike], velocity: ArrayLike) -> ArrayLike:
        """The task-dependent term."""
        raise NotImplementedError


def read_state(env: Any) -> np.ndarray:
    """(qpos, qvel, qacc_warmstart) of a Gymnasium MuJoCo environment, float64."""
    data = env.unwrapped.data
    return np.concatenate([data.qpos, data.qvel, data.qacc_warmstart])


def write_state(env: Any, state: np.ndarray) -> None:
    """Restore `read_state`'s vector (no `mj_forward`: `mj_step` recomputes everything it reads)."""
    data = env.unwrapped.data
    nq, nv = data.qpos.shape[0], data.qvel.shape[0]
    data.qpos[:] = state[:nq]
    data.qvel[:] = state[nq : nq + nv]
    data.qacc_warmstart[:] = state[nq + nv :]


def sample_directions(n: int, rng: np.random.Generator) -> Tensor:
    """±1 with probability ½ each, float32 `[n]`."""
    return torch.from_numpy((2 * rng.integers(0, 2, size=n) - 1).astype(np.float32))


class _HalfCheetah(LocomotionFamily):
    gym_class = "gymnasium.envs.mujoco.half_cheetah_v5:HalfCheetahEnv"
    gym_kwargs = {"ctrl_cost_weight": 0.05, "reset_noise_scale": 0.0}  # noqa: RUF012 (read-only)
    nq = nv = 9
    skipped_positions = 1
    num_actions = 6


class HalfCheetahVel(_HalfCheetah):
    """HalfCheetah running at a target velocity v ~ U[0, max_velocity]; see the module docstring.

    Args:
        horizon: steps per episode (H).
        episodes: episodes per trial.
        max_velocity: the upper end of the target distribution (MAML: 2; PEARL's code: 3).
    """

    task_keys = ("velocity",)

    def __init__(self, horizon: int = 200, episodes: int = 1, max_velocity: float = 2.0) -> None:
        super().__init__(horizon, episodes)
        if max_velocity <= 0:
            raise ValueError(f"max_velocity={max_velocity} must be positive")
        self.max_velocity = max_velocity

    def config(self) -> dict[str, Any]:
        return {**super().config(), "max_velocity": self.max_velocity}

    def sample_tasks(self, n: int, rng: np.random.Generator) -> Tasks:
        return {"velocity": torch.from_numpy(rng.uniform(0.0, self.max_velocity, size=n).astype(np.float32))}

    def forward_reward(self, task: dict[str, ArrayLike], velocity: ArrayLike) -> ArrayLike:
        return -abs(velocity - task["velocity"])


class HalfCheetahDir(_HalfCheetah):
    """HalfCheetah running forward (d = 1) or backward (d = −1); see the module docstring.

    Args:
        horizon: steps per episode (H).
        episodes: episodes per trial.
    """

    task_keys = ("direction",)

    def sample_tasks(self, n: int, rng: np.random.Generator) -> Tasks:
        return {"direction": sample_directions(n, rng)}

    def forward_reward(self, task: dict[str, ArrayLike], velocity: ArrayLike) -> ArrayLike:
        return task["direction"] * velocity


class AntDir(LocomotionFamily):
    """Ant running forward (d = 1) or backward (d = −1) along x; see the module docstring.

    Args:
        horizon: steps per episode (H).
        episodes: episodes per trial.
    """

    gym_class = "gymnasium.envs.mujoco.ant_v5:AntEnv"
    gym_kwargs = {  # noqa: RUF012 (read-only)
        "ctrl_cost_weight": 0.005,
        "contact_cost_weight": 5e-4,
        "healthy_reward": 0.05,
        "terminate_when_unhealthy": False,
        "include_cfrc_ext_in_observation": False,
        "reset_noise_scale": 0.0,
    }
    nq, nv = 15, 14
    skipped_positions = 2
    num_actions = 8
    cost_terms = ("reward_ctrl", "reward_contact", "reward_survive")
    task_keys = ("direction",)

    def sample_tasks(self, n: int, rng: np.random.Generator) -> Tasks:
        return {"direction": sample_directions(n, rng)}

    def forward_reward(self, task: dict[str, ArrayLike], velocity: ArrayLike) -> ArrayLike:
        return task["direction"] * velocity
