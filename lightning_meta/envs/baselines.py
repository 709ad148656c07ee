"""Hand-designed baselines that the meta-learned agents are scored against, on the same tasks
and the same trial noise (Duan et al. 2016 Tables 1 and 2).

Bandits: random, greedy, ε-greedy, UCB1 (constant c), Thompson sampling (Beta(1, 1) prior) and
the oracle that knows p and always pulls the best arm. Tabular MDPs: random and the oracle that
knows the MDP and follows its finite-horizon optimal policy (value iteration). 2D navigation:
standing still and the oracle that moves straight to the goal. MuJoCo locomotion
(`HalfCheetahVel`, `HalfCheetahDir`, `AntDir`): zero actions and uniformly random actions in
[−1, 1] (the floor a meta-RL agent must clear; no oracle, which would need a trained policy per
task); the same two for Meta-World ML1 (`MetaWorldML1`). Each returns the trial return of
every task, `[tasks]`, stepping the batched family (`rollout`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_meta.envs.families import BernoulliBandit, Navigation2D, Noise, TabularMDP, TaskFamily, Tasks, step_noise
from lightning_meta.envs.locomotion import LocomotionFamily
from lightning_meta.envs.metaworld_ml1 import MetaWorldML1

Policy = Callable[[Tensor, Tensor, int], Tensor]
"""(state `[tasks]`, observation `[tasks, obs_dim]`, step within the episode) -> action `[tasks]`."""


def rollout(
    family: TaskFamily,
    tasks: Tasks,
    noise: Noise,
    policy: Policy,
    update: Callable[[Tensor, Tensor], None] | None = None,
) -> Tensor:
    """Run one trial of every task under `policy`; `update(action, reward)` after each step.
    Returns the trial returns, `[tasks]`."""
    total = torch.zeros(next(iter(tasks.values())).shape[0])
    for episode in range(family.episodes):
        state = family.initial_state(tasks)
        for t in range(family.horizon):
            action = policy(state, family.observe(tasks, state), t)
            state, reward = family.step(tasks, state, action, step_noise(noise, episode, t))
            total += reward
            if update is not None:
                update(action, reward)
    return total


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_policy(family: TaskFamily, tasks: Tasks, noise: Noise, seed: int = 0) -> Tensor:
    """Uniformly random actions."""
    gen = _generator(seed)
    return rollout(family, tasks, noise, lambda s, o, t: torch.randint(family.num_actions, s.shape, generator=gen))


class _ArmStats:
    """Pull counts and reward sums per arm, `[tasks, arms]`."""

    def __init__(self, tasks: int, arms: int) -> None:
        self.pulls = torch.zeros(tasks, arms)
        self.wins = torch.zeros(tasks, arms)

    def update(self, action: Tensor, reward: Tensor) -> None:
        rows = torch.arange(action.shape[0])
        self.pulls[rows, action] += 1
        self.wins[rows, action] += reward

    def unpulled(self) -> Tensor:
        """The first arm never pulled, or -1."""
        never = self.pulls == 0
        return torch.where(never.any(1), never.float().argmax(1), -1)

    def means(self) -> Tensor:
        return self.wins / self.pulls.clamp(min=1)


def _index_policy(family: BernoulliBandit, tasks: Tasks, noise: Noise, index: Callable[[_ArmStats], Tensor]) -> Tensor:
    """Pull every arm once, then the arm of highest `index` (ties to the lowest arm)."""
    stats = _ArmStats(tasks["probs"].shape[0], family.arms)

    def act(state: Tensor, obs: Tensor, t: int) -> Tensor:
        first = stats.unpulled()
        return torch.where(first >= 0, first, index(stats).argmax(1))

    return rollout(family, tasks, noise, act, stats.update)


def greedy(family: BernoulliBandit, tasks: Tasks, noise: Noise) -> Tensor:
    """Each arm once, then the best empirical mean."""
    return _index_policy(family, tasks, noise, _ArmStats.means)


def ucb1(family: BernoulliBandit, tasks: Tasks, noise: Noise, c: float = 1.0) -> Tensor:
    """UCB1 (Auer et al. 2002): mean + c·sqrt(2 ln t / pulls); c = 1 is the textbook constant."""

    def index(stats: _ArmStats) -> Tensor:
        t = stats.pulls.sum(1, keepdim=True)
        return stats.means() + c * torch.sqrt(2 * torch.log(t) / stats.pulls.clamp(min=1))

    return _index_policy(family, tasks, noise, index)


def epsilon_greedy(family: BernoulliBandit, tasks: Tasks, noise: Noise, epsilon: float = 0.1, seed: int = 0) -> Tensor:
    """With probability ε a random arm, else the best empirical mean (unpulled arms count 1)."""
    stats, gen = _ArmStats(tasks["probs"].shape[0], family.arms), _generator(seed)

    def act(state: Tensor, obs: Tensor, t: int) -> Tensor:
        means = torch.where(stats.pulls == 0, torch.ones_like(stats.pulls), stats.means())
        explore = torch.rand(state.shape, generator=gen) < epsilon
        return torch.where(explore, torch.randint(family.arms, state.shape, generator=gen), means.argmax(1))

    return rollout(family, tasks, noise, act, stats.update)


def thompson(family: BernoulliBandit, tasks: Tasks, noise: Noise, seed: int = 0) -> Tensor:
    """Thompson sampling with a Beta(1, 1) prior per arm."""
    stats = _ArmStats(tasks["probs"].shape[0], family.arms)

    def act(state: Tensor, obs: Tensor, t: int) -> Tensor:
        alpha, beta = 1 + stats.wins, 1 + stats.pulls - stats.wins
        return torch.distributions.Beta(alpha, beta).sample().argmax(1)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return rollout(family, tasks, noise, act, stats.update)


def bandit_oracle(family: BernoulliBandit, tasks: Tasks, noise: Noise) -> Tensor:
    """Always the arm of highest p (knows the task)."""
    best = tasks["probs"].argmax(1)
    return rollout(family, tasks, noise, lambda s, o, t: best)


def value_iteration(family: TabularMDP, tasks: Tasks) -> Tensor:
    """The finite-horizon optimal actions of each task, `[tasks, horizon, states]`."""
    P, R = tasks["transitions"].double(), tasks["rewards"].double()
    value = torch.zeros(R.shape[:2], dtype=torch.float64)
    actions = []
    for _ in range(family.horizon):
        q = R + torch.einsum("nsat,nt->nsa", P, value)
        value, best = q.max(-1)
        actions.append(best)
    return torch.stack(actions[::-1], 1)  # step t uses the plan with horizon - t steps to go


def mdp_oracle(family: TabularMDP, tasks: Tasks, noise: Noise) -> Tensor:
    """The optimal policy of each task's known MDP."""
    plan = value_iteration(family, tasks)
    rows = torch.arange(plan.shape[0])
    return rollout(family, tasks, noise, lambda s, o, t: plan[rows, t, s])


def stand_still(family: Navigation2D, tasks: Tasks, noise: Noise) -> Tensor:
    """Zero moves (about -38 per 100-step episode)."""
    return rollout(family, tasks, noise, lambda s, o, t: torch.zeros_like(s))


def navigation_oracle(family: Navigation2D, tasks: Tasks, noise: Noise) -> Tensor:
    """The largest allowed move towards the known goal (each step minimises the distance)."""
    return rollout(family, tasks, noise, lambda s, o, t: tasks["goal"] - s)


def zero_action(family: LocomotionFamily | MetaWorldML1, tasks: Tasks, noise: Noise) -> Tensor:
    """All-zero controls: the robot settles where it stands and pays no control cost."""
    return rollout(family, tasks, noise, lambda s, o, t: torch.zeros(s.shape[0], family.num_actions))


def random_action(family: LocomotionFamily | MetaWorldML1, tasks: Tasks, noise: Noise, seed: int = 0) -> Tensor:
    """Controls uniform in [−1, 1] (the action space), independent per task and step."""
    gen = _generator(seed)
    return rollout(
        family, tasks, noise, lambda s, o, t: torch.rand(s.shape[0], family.num_actions, generator=gen) * 2 - 1
    )


LABELS = {
    "random": "random",
    "greedy": "greedy",
    "epsilon_greedy": "ε-greedy",
    "ucb1": "UCB1",
    "thompson": "Thompson sampling",
    "oracle": "oracle",
    "stand_still": "stand still",
    "zero_action": "zero action",
    "random_action": "random action (uniform in [-1, 1])",
}
"""A table label for each baseline name of `baselines` (benchmark scripts)."""


def baselines(family: TaskFamily) -> dict[str, Callable[[Tasks, Noise], Tensor]]:
    """The baselines of `family`, by name: each maps (tasks, noise) to trial returns."""
    if isinstance(family, BernoulliBandit):
        return {
            "random": lambda tasks, noise: random_policy(family, tasks, noise),
            "greedy": lambda tasks, noise: greedy(family, tasks, noise),
            "epsilon_greedy": lambda tasks, noise: epsilon_greedy(family, tasks, noise),
            "ucb1": lambda tasks, noise: ucb1(family, tasks, noise),
            "thompson": lambda tasks, noise: thompson(family, tasks, noise),
            "oracle": lambda tasks, noise: bandit_oracle(family, tasks, noise),
        }
    if isinstance(family, TabularMDP):
        return {
            "random": lambda tasks, noise: random_policy(family, tasks, noise),
            "oracle": lambda tasks, noise: mdp_oracle(family, tasks, noise),
        }
    if isinstance(family, Navigation2D):
        return {
            "stand_still": lambda tasks, noise: stand_still(family, tasks, noise),
            "oracle": lambda tasks, noise: navigation_oracle(family, tasks, noise),
        }
    if isinstance(family, (LocomotionFamily, MetaWorldML1)):
        return {
            "zero_action": lambda tasks, noise: zero_action(family, tasks, noise),
            "random_action": lambda tasks, noise: random_action(family, tasks, noise),
        }
    return {}
