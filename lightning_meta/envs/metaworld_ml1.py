"""Meta-World ML1 as a task family (the `metaworld` extra: `pip install 'lightning-meta[metaworld]'`).

ML1 (Yu et al. 2019; Meta-World 3.x, Gymnasium-native) is one Sawyer manipulation environment
(`reach-v3`, `push-v3`, `pick-place-v3`, ...) with 50 training goals and 50 held-out test goals
(object and target positions: `metaworld.ML1(env_name, seed)`, the test goals drawn with seed + 1,
so they differ from the training ones). The goal is hidden from the observation (ML1's
`partially_observable`: the last 3 of the 39 observation entries are zero), so the agent must
infer it from rewards. Rewards are Meta-World's own (`reward_function_version="v2"`, in [0, 10]);
`info["success"]` is what Meta-World scores.

A task is `{"goal": index of the goal in its split [n] (long), "test": 0 for ML1's train
goals, 1 for its test goals [n] (long)}`. `sample_tasks` draws goals uniformly from this family's
`split`; `held_out()` is the same family over the test goals, which `RLTaskDataModule` uses for
validation and test: training sees only the training goals, evaluation only the held-out ones.
Any family object steps tasks of both splits.

How the batched family steps (as `lightning_meta.envs.locomotion` does for HalfCheetah): the
state of a task is everything its next step reads, `[tasks, state_dim]` float64: the 39-entry
observation, Meta-World's unclipped previous frame (18 entries, its frame stacking), MuJoCo's
`qpos`, `qvel`, `qacc_warmstart`, the mocap body's position and quaternion (the arm is moved
by its mocap target), and the last step's `info["success"]` (`MetaWorldML1.success`). `step`
writes the state into a Meta-World environment set to the task's goal (one simulator per
distinct goal, built and reset on first use: the goal fixes the object placement and the
reward's reference points), steps it with Meta-World's own `step`, and reads the state back. So
a step is a pure function of (task, state, action), whatever was stepped before (the Gymnasium
twin `metaworld_gym.MetaWorldML1Env` and tests/test_metaworld.py check it step by step).
The dynamics are deterministic: `sample_noise` is empty.

What differs from Meta-World's own training envs: episodes have the family's `horizon` (ML1:
500, the environments' `max_path_length`; smaller values are truncations for cheap runs) and
never end early; every episode of a goal starts from the same reset state (Meta-World's reset
is deterministic once the goal is set).

`metaworld` is imported when a family first needs it, so `lightning_meta.envs` imports without
it; constructing the family without it raises an ImportError naming the fix. Nothing here
imports Lightning (DESIGN.md layering).
"""

from __future__ import annotations

import copy
import importlib.util
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_meta.envs.families import Noise, TaskFamily, Tasks

INSTALL_HINT = "pip install 'lightning-meta[metaworld]' (Meta-World 3.1.1, which pins mujoco==3.3.0)"

OBS_DIM = 39
"""Meta-World v3's observation: hand, gripper, objects (18), the previous frame (18), goal (3)."""
FRAME = 18
ACTION_DIM = 4
"""Hand displacement (x, y, z) and gripper effort, each in [-1, 1]."""


def metaworld_missing() -> str | None:
    """Why the Meta-World family cannot run here (None when it can): for skips and errors."""
    for module in ("gymnasium", "mujoco", "metaworld"):
        if importlib.util.find_spec(module) is None:
            return f"the `{module}` package is not installed: {INSTALL_HINT}"
    return None


def require_metaworld(what: str) -> None:
    """Raise an ImportError naming the extra if Meta-World is missing."""
    if (reason := metaworld_missing()) is not None:
        raise ImportError(f"{what} needs Meta-World: {reason}")


@lru_cache(maxsize=8)
def benchmark(env_name: str, seed: int) -> Any:
    """`metaworld.ML1(env_name, seed)`, built once per process (it resets the env 100 times)."""
    require_metaworld("Meta-World ML1")
    import metaworld

    if env_name not in metaworld.ML1.ENV_NAMES:
        raise ValueError(f"{env_name!r} is not a Meta-World v3 environment; one of {sorted(metaworld.ML1.ENV_NAMES)}")
    return metaworld.ML1(env_name, seed=seed)


def ml1_tasks(env_name: str, seed: int, test: bool) -> list[Any]:
    """ML1's `Task`s (Meta-World's type) of one split."""
    bench = benchmark(env_name, seed)
    return bench.test_tasks if test else bench.train_tasks


def make_env(env_name: str, seed: int, test: bool, goal: int) -> tuple[Any, np.ndarray]:
    """A bare Meta-World environment (no wrappers) set to one goal and reset, and its first observation."""
    bench = benchmark(env_name, seed)
    env = bench.train_classes[env_name]()
    env.set_task(ml1_tasks(env_name, seed, test)[goal])
    obs, _ = env.reset()
    return env, obs


def read_state(env: Any, obs: np.ndarray, success: float) -> np.ndarray:
    """The family's state vector of a Meta-World environment whose last observation is `obs`."""
    data = env.data
    return np.concatenate(
        [
            np.asarray(obs, dtype=np.float64),
            np.asarray(env._prev_obs, dtype=np.float64),
            data.qpos,
            data.qvel,
            data.qacc_warmstart,
            data.mocap_pos.ravel(),
            data.mocap_quat.ravel(),
            [success],
        ]
    )


def write_state(env: Any, state: np.ndarray) -> None:
    """Restore `read_state`'s vector; the step counter is zeroed (the family truncates episodes)."""
    data, model = env.data, env.model
    nq, nv, nm = model.nq, model.nv, model.nmocap
    i = OBS_DIM
    env._prev_obs = state[i : i + FRAME].copy()
    i += FRAME
    for target, size in ((data.qpos, nq), (data.qvel, nv), (data.qacc_warmstart, nv)):
        target[:] = state[i : i + size]
        i += size
    data.mocap_pos[:] = state[i : i + 3 * nm].reshape(nm, 3)
    i += 3 * nm
    data.mocap_quat[:] = state[i : i + 4 * nm].reshape(nm, 4)
    env.curr_path_length = 0
    env._did_see_sim_exception = False


class MetaWorldML1(TaskFamily):
    """One Meta-World v3 environment's ML1 goals as a task family; see the module docstring.

    Args:
        env_name: the Meta-World v3 environment (`reach-v3`, `push-v3`, `pick-place-v3`, ...).
        horizon: steps per episode (ML1: 500).
        episodes: episodes per trial.
        split: the goals `sample_tasks` draws: "train" (ML1's training goals) or "test" (its
            held-out goals; what `held_out()` returns).
        benchmark_seed: the seed of `metaworld.ML1` (its 50 + 50 goals).
    """

    discrete = False
    obs_dim = OBS_DIM
    num_actions = ACTION_DIM
    task_keys = ("goal", "test")  # a task: ML1's goal index and whether it is a held-out goal

    def __init__(
        self,
        env_name: str = "reach-v3",
        horizon: int = 500,
        episodes: int = 1,
        split: str = "train",
        benchmark_seed: int = 0,
    ) -> None:
        super().__init__(episodes=episodes, horizon=horizon)
        require_metaworld(f"MetaWorldML1({env_name!r})")
        if split not in ("train", "test"):
            raise ValueError(f"split={split!r}: choose 'train' or 'test'")
        if horizon > 500:
            raise ValueError(f"horizon={horizon}: Meta-World environments allow at most 500 steps per episode")
        self.env_name, self.split, self.benchmark_seed = env_name, split, benchmark_seed
        self.num_goals = len(ml1_tasks(env_name, benchmark_seed, split == "test"))  # validates env_name
        self._sims: dict[tuple[int, int], Any] = {}
        self._initial: dict[tuple[int, int], Tensor] = {}

    def config(self) -> dict[str, Any]:
        return {
            "env_name": self.env_name,
            "horizon": self.horizon,
            "episodes": self.episodes,
            "split": self.split,
            "benchmark_seed": self.benchmark_seed,
        }

    def __eq__(self, other: object) -> bool:
        # The model's and the data's family are the same whichever split they draw from.
        if type(self) is not type(other):
            return False
        ours, theirs = dict(self.config()), dict(other.config())  # type: ignore[attr-defined]
        ours.pop("split"), theirs.pop("split")
        return ours == theirs

    def __hash__(self) -> int:
        return hash((type(self), self.env_name, self.horizon, self.episodes, self.benchmark_seed))

    def __getstate__(self) -> dict[str, Any]:
        # Simulators are rebuilt on demand: MuJoCo objects do not pickle (checkpoints, DDP spawn).
        return {**self.__dict__, "_sims": {}}

    def held_out(self) -> MetaWorldML1:
        """The same family drawing ML1's held-out test goals."""
        other = copy.copy(self)
        other.split = "test"
        other.num_goals = len(ml1_tasks(self.env_name, self.benchmark_seed, True))
        return other

    def sample_tasks(self, n: int, rng: np.random.Generator) -> Tasks:
        goals = rng.integers(0, self.num_goals, size=n)
        return {
            "goal": torch.from_numpy(goals.astype(np.int64)),
            "test": torch.full((n,), int(self.split == "test"), dtype=torch.long),
        }

    def sample_noise(self, n: int, rng: np.random.Generator) -> Noise:
        return {}  # deterministic dynamics and resets

    def simulator(self, test: int, goal: int) -> Any:
        """The Meta-World environment set to one goal (built and reset on first use)."""
        key = (int(test), int(goal))
        if key not in self._sims:
            env, obs = make_env(self.env_name, self.benchmark_seed, bool(test), int(goal))
            self._sims[key] = env
            self._initial[key] = torch.from_numpy(read_state(env, obs, 0.0))
        return self._sims[key]

    def _keys(self, tasks: Tasks) -> list[tuple[int, int]]:
        return list(zip(tasks["test"].tolist(), tasks["goal"].tolist(), strict=True))

    def initial_state(self, tasks: Tasks) -> Tensor:
        """Each goal's state after Meta-World's reset, `[tasks, state_dim]` float64."""
        rows = []
        for key in self._keys(tasks):
            self.simulator(*key)
            rows.append(self._initial[key])
        return torch.stack(rows).to(tasks["goal"].device)

    def observe(self, tasks: Tasks, state: Tensor) -> Tensor:
        """Meta-World's 39-entry observation (goal entries zero: ML1 hides the goal)."""
        return state[:, :OBS_DIM]

    def success(self, state: Tensor) -> Tensor:
        """`info["success"]` of the step that led to `state` (0 after a reset), `[tasks]`."""
        return state[:, -1]

    def step(self, tasks: Tasks, state: Tensor, action: Tensor, noise: Noise) -> tuple[Tensor, Tensor]:
        """Step each task in turn through its goal's simulator (a Python loop; see the module docstring)."""
        if action.shape != (state.shape[0], self.num_actions):
            raise ValueError(f"action has shape {tuple(action.shape)}; expected {(state.shape[0], self.num_actions)}")
        states = state.detach().cpu().double().numpy()
        actions = action.detach().cpu().numpy().astype(np.float32)  # Meta-World's action space dtype
        next_states = np.empty_like(states)
        rewards = np.empty(states.shape[0])
        for i, key in enumerate(self._keys(tasks)):
            env = self.simulator(*key)
            write_state(env, states[i])
            obs, reward, _, _, info = env.step(actions[i])
            next_states[i] = read_state(env, obs, float(info["success"]))
            rewards[i] = reward
        return torch.from_numpy(next_states).to(state.device), torch.from_numpy(rewards).to(state.device)
