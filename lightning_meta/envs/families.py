"""Meta-RL task families as batched torch environments: many tasks stepped as tensors at once.

A family is a distribution over tasks (an MDP each) plus the dynamics of a task, written for a
whole batch of tasks so that training steps every task of a meta-batch with one tensor
operation, no Python loop per environment. A *trial* is `episodes` consecutive episodes of
`horizon` steps on one task (Duan et al. 2016, RL²): the agent meta-learns to use the early
episodes of a trial to do well in the later ones.

Randomness is explicit: a task's trial noise (the uniforms and normals its transitions and
rewards consume) is drawn up front by `sample_noise`, and `step` takes the noise of this step.
So a trial is a pure function of (task, noise, actions): seeded by global task index, the same
on every DDP rank layout and after a resume, and the Gymnasium twins in `gym_envs.py` (which draw
the same noise, in the same order, from their own `np_random`) give identical transitions.

Families (task, observation, reward):
- `BernoulliBandit` (Duan et al. 2016 §4.1): k arms with success probabilities p ~ U[0, 1]; a
  trial is n pulls, each an episode of one step; reward 1 with probability p[a].
- `TabularMDP` (Duan et al. 2016 §4.2): |S| states, |A| actions, transitions P(·|s, a) ~ flat
  Dirichlet, mean rewards R(s, a) ~ N(1, 1), observed rewards R(s, a) + N(0, 1); episodes of H
  steps start in state 0; the observation is the state one-hot.
- `Navigation2D` (Finn et al. 2017 §5.3): a point starts at the origin, the goal is uniform in
  the unit square [-0.5, 0.5]², actions are 2D moves clipped to [-0.1, 0.1] per coordinate, the
  reward is minus the distance to the goal after the move, H = 100 (deterministic, no noise; no
  early termination near the goal). Standing still scores about -38 per episode.

Pure torch and numpy: nothing here imports Lightning (DESIGN.md layering).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

Tasks = dict[str, Tensor]
"""A batch of task parameters, every tensor with the task dimension first."""

Noise = dict[str, Tensor]
"""A batch of trial noise, every tensor `[tasks, episodes, horizon]`; one step's is `[tasks]`."""


@dataclass
class TaskSpecBatch:
    """Tasks to roll out, task dimension first.

    Attributes:
        tasks: the task parameters (`TaskFamily.sample_tasks`).
        noise: one trial's environment noise per task (`TaskFamily.sample_noise`).
        action_noise: one uniform per step of the trial for the agent's action sampling,
            `[tasks, episodes, horizon]`.
        index: the tasks' global indices in their stream.
    """

    tasks: Tasks
    noise: Noise
    action_noise: Tensor
    index: Tensor

    def __len__(self) -> int:
        return self.index.shape[0]


class TaskFamily(ABC):
    """A distribution of tasks and their batched dynamics.

    Args:
        episodes: episodes per trial (the agent's hidden state is kept across them).
        horizon: steps per episode.
    """

    obs_dim: int
    num_actions: int
    """Discrete families: the number of actions. Continuous ones: the action's dimension."""
    discrete: bool = True
    """Whether actions are indices `[tasks]` (long) or vectors `[tasks, num_actions]`."""

    def __init__(self, episodes: int, horizon: int) -> None:
        if episodes < 1 or horizon < 1:
            raise ValueError(f"episodes={episodes} and horizon={horizon} must be positive")
        self.episodes, self.horizon = episodes, horizon

    @property
    def trial_steps(self) -> int:
        """Steps in one trial."""
        return self.episodes * self.horizon

    @abstractmethod
    def sample_tasks(self, n: int, rng: np.random.Generator) -> Tasks:
        """`n` tasks drawn from `rng`."""

    def held_out(self) -> TaskFamily:
        """The family whose tasks validation and test draw (`RLTaskDataModule`): itself, unless the
        benchmark fixes separate held-out tasks (Meta-World ML1's test goals)."""
        return self

    @abstractmethod
    def sample_noise(self, n: int, rng: np.random.Generator) -> Noise:
        """The noise of `n` trials, each tensor `[n, episodes, horizon]`."""

    def initial_state(self, tasks: Tasks) -> Tensor:
        """The state every episode starts in, `[tasks]` (long): state 0."""
        return torch.zeros(_num_tasks(tasks), dtype=torch.long, device=_device(tasks))

    @abstractmethod
    def observe(self, tasks: Tasks, state: Tensor) -> Tensor:
        """The observation of each task's state, `[tasks, obs_dim]`."""

    @abstractmethod
    def step(self, tasks: Tasks, state: Tensor, action: Tensor, noise: Noise) -> tuple[Tensor, Tensor]:
        """One step of every task: (next state `[tasks]`, reward `[tasks]`), `noise` this step's."""

    def config(self) -> dict[str, int]:
        """The constructor arguments, to compare two families."""
        return {"episodes": self.episodes, "horizon": self.horizon}

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.config() == other.config()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), tuple(self.config().items())))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


def _num_tasks(tasks: Tasks) -> int:
    return next(iter(tasks.values())).shape[0]


def _device(tasks: Tasks) -> torch.device:
    return next(iter(tasks.values())).device


class BernoulliBandit(TaskFamily):
    """Bernoulli multi-armed bandits (Duan et al. 2016 §4.1): p ~ U[0, 1] per arm, n pulls.

    Args:
        arms: number of arms (k).
        pulls: pulls per trial (n); each pull is an episode of one step.
    """

    obs_dim = 1  # a constant: a bandit has one state

    def __init__(self, arms: int = 5, pulls: int = 10) -> None:
        super().__init__(episodes=pulls, horizon=1)
        if arms < 2:
            raise ValueError(f"arms={arms} must be at least 2")
        self.arms = self.num_actions = arms

    def config(self) -> dict[str, int]:
        return {"arms": self.arms, "pulls": self.episodes}

    def sample_tasks(self, n: int, rng: np.random.Generator) -> Tasks:
        return {"probs": torch.from_numpy(rng.random((n, self.arms)).astype(np.float32))}

    def sample_noise(self, n: int, rng: np.random.Generator) -> Noise:
        return {"u": torch.from_numpy(rng.random((n, self.episodes, 1)).astype(np.float32))}

    def observe(self, tasks: Tasks, state: Tensor) -> Tensor:
        return torch.zeros(state.shape[0], 1, dtype=tasks["probs"].dtype, device=state.device)

    def step(self, tasks: Tasks, state: Tensor, action: Tensor, noise: Noise) -> tuple[Tensor, Tensor]:
        p = tasks["probs"].gather(1, action[:, None]).squeeze(1)
        return state, (noise["u"] < p).to(p.dtype)


class TabularMDP(TaskFamily):
    """Random tabular MDPs (Duan et al. 2016 §4.2): Dirichlet transitions, Gaussian rewards.

    Args:
        states: |S|.
        actions: |A|.
        horizon: steps per episode (H).
        episodes: episodes per trial (n).
    """

    def __init__(self, states: int = 10, actions: int = 5, horizon: int = 10, episodes: int = 10) -> None:
        super().__init__(episodes=episodes, horizon=horizon)
        if states < 1 or actions < 2:
            raise ValueError(f"states={states} must be positive and actions={actions} at least 2")
        self.states, self.num_actions = states, actions
        self.obs_dim = states

    def config(self) -> dict[str, int]:
        return {"states": self.states, "actions": self.num_actions, "horizon": self.horizon, "episodes": self.episodes}

    def sample_tasks(self, n: int, rng: np.random.Generator) -> Tasks:
        S, A = self.states, self.num_actions
        transitions = rng.dirichlet(np.ones(S), size=(n, S, A))
        rewards = rng.normal(1.0, 1.0, size=(n, S, A))
        return {
            "transitions": torch.from_numpy(transitions.astype(np.float32)),
            "rewards": torch.from_numpy(rewards.astype(np.float32)),
        }

    def sample_noise(self, n: int, rng: np.random.Generator) -> Noise:
        shape = (n, self.episodes, self.horizon)
        return {
            "u": torch.from_numpy(rng.random(shape).astype(np.float32)),
            "z": torch.from_numpy(rng.standard_normal(shape).astype(np.float32)),
        }

    def observe(self, tasks: Tasks, state: Tensor) -> Tensor:
        return torch.nn.functional.one_hot(state, self.states).to(tasks["rewards"].dtype)

    def step(self, tasks: Tasks, state: Tensor, action: Tensor, noise: Noise) -> tuple[Tensor, Tensor]:
        rows = torch.arange(state.shape[0], device=state.device)
        reward = tasks["rewards"][rows, state, action] + noise["z"]
        # Inverse-CDF sampling of the next state from one uniform; clamped because the float32
        # cumulative sum may end just below 1.
        cdf = tasks["transitions"][rows, state, action].cumsum(-1)
        next_state = (cdf <= noise["u"][:, None]).sum(-1).clamp(max=self.states - 1)
        return next_state, reward


class Navigation2D(TaskFamily):
    """2D navigation to a goal (Finn et al. 2017 §5.3); see the module docstring.

    Args:
        horizon: steps per episode (H).
        episodes: episodes per trial.
        max_move: the per-coordinate clip of an action.
    """

    obs_dim = 2
    num_actions = 2
    discrete = False

    def __init__(self, horizon: int = 100, episodes: int = 1, max_move: float = 0.1) -> None:
        super().__init__(episodes=episodes, horizon=horizon)
        self.max_move = max_move

    def config(self) -> dict[str, float]:
        return {"horizon": self.horizon, "episodes": self.episodes, "max_move": self.max_move}

    def sample_tasks(self, n: int, rng: np.random.Generator) -> Tasks:
        return {"goal": torch.from_numpy(rng.uniform(-0.5, 0.5, size=(n, 2)).astype(np.float32))}

    def sample_noise(self, n: int, rng: np.random.Generator) -> Noise:
        return {}  # deterministic dynamics

    def initial_state(self, tasks: Tasks) -> Tensor:
        return torch.zeros_like(tasks["goal"])

    def observe(self, tasks: Tasks, state: Tensor) -> Tensor:
        return state

    def step(self, tasks: Tasks, state: Tensor, action: Tensor, noise: Noise) -> tuple[Tensor, Tensor]:
        next_state = state + action.clamp(-self.max_move, self.max_move)
        return next_state, -(next_state - tasks["goal"]).norm(dim=-1)


def step_noise(noise: Noise, episode: int, t: int) -> Noise:
    """The noise of step `t` of episode `episode`, `[tasks]` each."""
    return {key: value[:, episode, t] for key, value in noise.items()}
