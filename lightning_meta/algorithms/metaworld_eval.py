"""Scoring a meta-trained agent on Meta-World ML1 with Meta-World's own protocol (`metaworld.evaluation`).

`metaworld.evaluation.metalearning_evaluation(agent, eval_envs, num_evals, adaptation_steps,
adaptation_episodes, evaluation_episodes)` is Meta-World's meta-RL test: for each of
`num_evals` rounds, every environment of the vector env switches to its next held-out goal
(`sample_tasks`), the agent acts for `adaptation_episodes` episodes and `adapt()`s, then is scored by
`evaluation`: `evaluation_episodes` episodes per task with `eval_action`, each ending on success
(Meta-World turns `terminate_on_success` on), and the success rate is the fraction of those
episodes that ended in `info["success"]`. The defaults are Meta-World's (10 rounds, 1 adaptation
step of 10 episodes, 3 evaluation episodes) on `make_ml_envs(env_name, split="test")` with 20
environments; `test_envs` builds those with the episode length and the number of environments as
arguments, and Gymnasium's vector autoreset mode set explicitly to same-step (what
`evaluation` reads: `infos["final_info"]` on the step an episode ends).

What Meta-World's `evaluation` (3.1.1) counts: `evaluation_episodes` episodes *per task name*,
the first to end, and every environment of ML1 has the same task name (e.g. `reach-v3`). So on
ML1 it scores the first 3 episodes to end across all the environments (the goals), and as
episodes end on success, the first to end are the quickest successes: one goal reached early
in a round scores that round 1.0 whatever the other goals do (tests/test_metaworld.py shows it
on a stand-in vector env: 1 goal of 10 reachable, success rate 1.0). `score` therefore runs the
same protocol (the adaptation loop is `metalearning_evaluation`'s) with an evaluation that keeps
every environment's first `evaluation_episodes` episodes, and reports both: `success_rate` and
`return` per goal (each environment's own episodes, averaged over environments, then rounds),
and `metaworld_success_rate` and `metaworld_return`, Meta-World's statistic on the same
episodes (the first `evaluation_episodes` to end per task name, in its order: by step, then
environment index). The evaluation runs until every environment has its episodes, longer than
Meta-World's stops, so an agent's own random draws after the first round differ from a run of
`metalearning_evaluation` itself; with one round, or an agent without random draws, Meta-World's
numbers are reproduced exactly (tested).

`MAMLRLAgent` puts a trained `MAMLRL` behind Meta-World's `MetaLearningAgent` protocol:
`init()` restarts every environment at the meta-learned θ; `adapt_action` samples the Gaussian
policy (the exploration the inner step was trained on); `step` records the transitions;
`adapt()` takes the learner's own inner step (one VPG step at `inner_lr` on the recorded
episodes, the linear baseline and advantage normalisation of training) per environment;
`eval_action` is the adapted policy's mean. `RandomAgent` acts uniformly in [-1, 1] (the
floor). Pre-adaptation scores run the same protocol with `adaptation_steps=0`.

`PEARLAgent` does the same for a trained `PEARL`, whose adaptation is inference, not a gradient
step: `init()` empties every environment's context and draws its z from the prior N(0, I);
`adapt_action` is the actor's mean action for (observation, z) (PEARL's own evaluation: the
exploration comes from z, resampled each episode); `step` adds each transition (s, a, r) to its
environment's context and, when an environment's episode ends, draws its z for the next episode
from q(z | its context so far) (posterior sampling); `adapt()` sets each environment's evaluation
z to the mean of q(z | every transition since `init()`); `eval_action` is the actor's mean action
with that z. Without adaptation (`adaptation_steps=0`) the evaluation z is the prior's mean, 0.

`RL2Agent` puts a trained `RL2` (continuous actions) behind it: one trial per environment from
`init()` (zero GRU state) to the end of the evaluation, the GRU state carried across the
adaptation episodes and into the evaluation episodes, never reset at an episode's end (the
RL² trial), with the input (observation, previous action, previous reward, done flag) of
training. `adapt_action` samples the Gaussian policy (as the learner's own rollouts), `step`
records the reward and done flag for the next input, `adapt()` does nothing (adapting is the
hidden state), `eval_action` takes the policy's mean (or a sample, `sample_eval=True`) and
`reset(env_mask)` sets the done flag. One gap of the protocol: `metaworld.evaluation` hands the
agent no rewards while evaluating (only `eval_action` and `reset`), so the previous-reward input
is 0 from the second evaluation step on (the first sees the last adaptation reward), inputs
training never showed: the RL² number on this protocol can understate what the agent would do
in its own trial.

Meta-World is imported on first use (the `metaworld` extra).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_meta.algorithms.maml_rl import MAMLRL, Trajectories
from lightning_meta.algorithms.pearl import PEARL
from lightning_meta.algorithms.rl2 import RL2
from lightning_meta.envs.metaworld_ml1 import benchmark, require_metaworld
from lightning_meta.inner_loop import named_params
from lightning_meta.task import Params


def test_envs(env_name: str, num_envs: int = 20, horizon: int = 500, seed: int = 0) -> Any:
    """Meta-World's ML1 test-split vector env (`metaworld.make_ml_envs_test`): `num_envs`
    environments over ML1's 50 held-out goals of `seed`, episodes of `horizon` steps, synchronous,
    with Gymnasium's vector autoreset mode set explicitly to same-step (`metaworld.evaluation`
    reads the ended episode's `final_info` on the step it ends)."""
    require_metaworld("Meta-World's evaluation")
    import gymnasium as gym
    import metaworld

    if num_envs < 1 or 50 % num_envs:
        raise ValueError(f"num_envs={num_envs} must divide ML1's 50 test goals (Meta-World splits them evenly)")
    # `metaworld.make_ml_envs_test(env_name, seed=seed, ...)` exactly (the same partial's arguments),
    # on the ML1 benchmark this process already built for the family: `metaworld.ML1` takes ~1 s.
    return metaworld._make_ml_envs_inner(
        benchmark(env_name, seed),
        meta_batch_size=num_envs,
        seed=seed,
        split="test",
        vector_strategy="sync",
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
        terminate_on_success=True,
        task_select="pseudorandom",
        max_episode_steps=horizon,
    )


def score(
    agent: Any,
    envs: Any,
    num_evals: int = 10,
    adaptation_steps: int = 1,
    adaptation_episodes: int = 10,
    evaluation_episodes: int = 3,
) -> dict[str, float]:
    """Meta-World's meta-RL protocol (`metalearning_evaluation`, its defaults), scored per goal and
    as Meta-World scores it (see the module docstring): `success_rate`, `return` (each
    environment's first `evaluation_episodes` episodes, the mean over environments, then rounds)
    and `metaworld_success_rate`, `metaworld_return` (Meta-World's first-to-end per task name)."""
    require_metaworld("Meta-World's evaluation")
    from metaworld.evaluation import Timestep

    envs.call("toggle_sample_tasks_on_reset", False)
    envs.call("toggle_terminate_on_success", False)
    totals = np.zeros(4)
    for _ in range(num_evals):
        envs.call("sample_tasks")
        agent.init()
        for _ in range(adaptation_steps):  # `metalearning_evaluation`'s adaptation loop
            obs, _ = envs.reset()
            episodes_elapsed = np.zeros((envs.num_envs,), dtype=np.uint16)
            while not (episodes_elapsed >= adaptation_episodes).all():
                actions, aux_policy_outs = agent.adapt_action(obs)
                next_obs, rewards, terminations, truncations, _ = envs.step(actions)
                agent.step(Timestep(obs, actions, rewards, terminations, truncations, aux_policy_outs))
                episodes_elapsed += np.logical_or(terminations, truncations)
                obs = next_obs
            agent.adapt()
        totals += _evaluation(agent, envs, evaluation_episodes)
    success, mean_return, mw_success, mw_return = totals / num_evals
    return {
        "success_rate": float(success),
        "return": float(mean_return),
        "metaworld_success_rate": float(mw_success),
        "metaworld_return": float(mw_return),
    }


def _evaluation(agent: Any, envs: Any, episodes: int) -> np.ndarray:
    """`metaworld.evaluation.evaluation`, run until every environment has `episodes` episodes:
    (per-goal success rate, per-goal mean return, Meta-World's success rate, Meta-World's return)."""
    terminate_on_success = np.all(envs.get_attr("terminate_on_success")).item()
    envs.call("toggle_terminate_on_success", True)
    obs, _ = envs.reset()
    agent.reset(np.ones(envs.num_envs, dtype=np.bool_))
    names = envs.get_attr("task_name")
    ended: list[tuple[int, float, float]] = []  # (environment, success, return), in Meta-World's order
    counts = np.zeros(envs.num_envs, dtype=int)
    while (counts < episodes).any():
        actions = agent.eval_action(obs)
        obs, _, terminations, truncations, infos = envs.step(actions)
        dones = np.logical_or(terminations, truncations)
        agent.reset(dones)
        for i in np.flatnonzero(dones):
            final = infos["final_info"]
            ended.append((int(i), float(final["success"][i]), float(final["episode"]["r"][i])))
            counts[i] += 1
    envs.call("toggle_terminate_on_success", terminate_on_success)
    per_env = [[(s, r) for j, s, r in ended if j == i][:episodes] for i in range(envs.num_envs)]
    per_name: dict[str, list[tuple[float, float]]] = {}
    for j, s, r in ended:
        per_name.setdefault(names[j], []).append((s, r))
    first = [sr[:episodes] for sr in per_name.values()]
    return np.array(
        [
            np.mean([np.mean([s for s, _ in e]) for e in per_env]),
            np.mean([np.mean([r for _, r in e]) for e in per_env]),
            np.mean([sum(s for s, _ in f) / episodes for f in first]),
            np.mean([[r for _, r in f] for f in first]),
        ]
    )


class MAMLRLAgent:
    """A trained `MAMLRL` as Meta-World's `MetaLearningAgent`; see the module docstring.

    Args:
        learner: the trained learner (its family a `MetaWorldML1` of the same environment).
        num_envs: the vector env's number of environments.
        seed: the seed of the exploration noise of the adaptation episodes.
    """

    def __init__(self, learner: MAMLRL, num_envs: int, seed: int = 0) -> None:
        self.learner, self.num_envs = learner, num_envs
        self.generator = torch.Generator().manual_seed(seed)
        self.init()

    def _dtype(self) -> torch.dtype:
        return self.learner.policy.log_std.dtype

    def init(self) -> None:
        """Every environment back at the meta-learned parameters, no recorded transitions."""
        theta = {name: p.detach() for name, p in named_params(self.learner.policy).items()}
        self.params: Params = {name: p.expand(self.num_envs, *p.shape).clone() for name, p in theta.items()}
        self.buffer: list[tuple[Tensor, Tensor, Tensor]] = []

    def _distribution(self, obs: np.ndarray) -> tuple[Tensor, Tensor]:
        x = torch.as_tensor(np.asarray(obs), dtype=self._dtype())
        with torch.no_grad():
            return self.learner.distribution(self.params, x)

    def adapt_action(self, observations: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Sampled actions (the inner step's exploration), `[envs, 4]`, scaled as in training."""
        mean, log_std = self._distribution(observations)
        action = mean + log_std.exp() * torch.randn(mean.shape, generator=self.generator, dtype=mean.dtype)
        self._last_obs = torch.as_tensor(np.asarray(observations), dtype=mean.dtype)
        self._last_action = action
        return (self.learner.action_scale * action).numpy().astype(np.float64), {}

    def step(self, timestep: Any) -> None:
        """Record one transition of every environment (the policy's unscaled action)."""
        reward = torch.as_tensor(np.asarray(timestep.reward), dtype=self._dtype())
        self.buffer.append((self._last_obs, self._last_action, reward))

    def adapt(self) -> None:
        """One inner step per environment on its recorded episodes (equal lengths: no early ends)."""
        obs, actions, rewards = (torch.stack(parts, 1) for parts in zip(*self.buffer, strict=True))
        self.buffer = []
        envs, steps = rewards.shape
        horizon = self.learner.family.horizon
        if steps % horizon:
            raise ValueError(f"{steps} recorded steps are not whole episodes of {horizon} steps")
        n = steps // horizon
        data = self.learner.with_advantages(
            Trajectories(
                obs.view(envs, n, horizon, -1), actions.view(envs, n, horizon, -1), rewards.view(envs, n, horizon)
            )
        )
        adapted = []
        with torch.enable_grad():
            for i in range(envs):
                own = {name: p[i].detach().requires_grad_() for name, p in self.params.items()}
                step = self.learner.adapt_task(own, data, i, first_order=True)
                adapted.append({name: p.detach() for name, p in step.items()})
        self.params = {name: torch.stack([a[name] for a in adapted]) for name in self.params}

    def eval_action(self, observations: np.ndarray) -> np.ndarray:
        """The adapted policy's mean action, `[envs, 4]`."""
        mean, _ = self._distribution(observations)
        return (self.learner.action_scale * mean).numpy().astype(np.float64)

    def reset(self, env_mask: np.ndarray) -> None:
        """Nothing to reset: the policy is feed-forward."""


class PEARLAgent:
    """A trained `PEARL` as Meta-World's `MetaLearningAgent`; see the module docstring.

    Args:
        learner: the trained learner (its family a `MetaWorldML1` of the same environment), with
            (s, a, r) context: Meta-World's `Timestep` carries no next observation.
        num_envs: the vector env's number of environments.
        seed: the seed of the z draws (prior and posterior samples) of the adaptation episodes.
    """

    def __init__(self, learner: PEARL, num_envs: int, seed: int = 0) -> None:
        if learner.use_next_obs:
            raise ValueError(
                "PEARLAgent needs use_next_obs_in_context=False: Meta-World's Timestep has no next observation "
                "(and same-step autoreset replaces the last one with the next episode's first)"
            )
        self.learner, self.num_envs = learner, num_envs
        self.generator = torch.Generator().manual_seed(seed)
        self.init()

    def _like(self) -> Tensor:
        return self.learner.policy.net[0].weight

    def _tensor(self, values: np.ndarray) -> Tensor:
        like = self._like()
        return torch.as_tensor(np.asarray(values), dtype=like.dtype).to(like.device)

    def _z_noise(self) -> Tensor:
        like = self._like()
        return torch.randn(self.num_envs, self.learner.latent_dim, generator=self.generator, dtype=like.dtype).to(
            like.device
        )

    def init(self) -> None:
        """Every environment: no context, z ~ N(0, I) for its first episode, evaluation z 0 (the prior's mean)."""
        self.context: list[Tensor] = []  # one [envs, context_dim] block per step
        self.z = self._z_noise()
        self.eval_z = torch.zeros_like(self.z)

    def _act(self, observations: np.ndarray, z: Tensor) -> np.ndarray:
        self._last_obs = self._tensor(observations)
        with torch.no_grad():
            action = self.learner.act(self._last_obs, z, None)
        self._last_action = action
        return action.cpu().numpy().astype(np.float64)

    def adapt_action(self, observations: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The actor's mean action with each environment's current z, `[envs, 4]`."""
        return self._act(observations, self.z), {}

    def posterior(self) -> tuple[Tensor, Tensor]:
        """q(z | every transition since `init()`) of each environment: (mean, var) `[envs, latent]`."""
        if not self.context:
            raise ValueError("no context yet: q(z | c) needs at least one transition")
        with torch.no_grad():
            return self.learner.posterior(torch.stack(self.context, 1))

    def step(self, timestep: Any) -> None:
        """Add each environment's transition to its context; where an episode ended, draw its next z
        from the posterior."""
        data = {"obs": self._last_obs, "action": self._last_action, "reward": self._tensor(timestep.reward)}
        with torch.no_grad():
            self.context.append(self.learner.context_vectors(data))
        ended = torch.as_tensor(np.logical_or(timestep.terminated, timestep.truncated))
        if ended.any():
            mean, var = self.posterior()
            sample = mean + var.sqrt() * self._z_noise()
            self.z = torch.where(ended[:, None].to(sample.device), sample, self.z)

    def adapt(self) -> None:
        """Each environment's evaluation z: the posterior mean over all its context so far."""
        self.eval_z = self.posterior()[0]

    def eval_action(self, observations: np.ndarray) -> np.ndarray:
        """The actor's mean action with the evaluation z, `[envs, 4]`."""
        return self._act(observations, self.eval_z)

    def reset(self, env_mask: np.ndarray) -> None:
        """Nothing to reset: z stays fixed while evaluating."""


class RL2Agent:
    """A trained `RL2` (continuous actions) as Meta-World's `MetaLearningAgent`; see the module docstring.

    Args:
        learner: the trained learner (its family a `MetaWorldML1` of the same environment).
        num_envs: the vector env's number of environments.
        seed: the seed of the sampled actions.
        sample_eval: evaluation actions sampled from the policy instead of its mean.
    """

    def __init__(self, learner: RL2, num_envs: int, seed: int = 0, sample_eval: bool = False) -> None:
        if learner.discrete:
            raise ValueError("RL2Agent drives Meta-World's continuous actions: the learner's policy is categorical")
        self.learner, self.num_envs, self.sample_eval = learner, num_envs, sample_eval
        self.generator = torch.Generator().manual_seed(seed)
        self.init()

    def _like(self) -> Tensor:
        return self.learner.policy.weight

    def _zeros(self, *shape: int) -> Tensor:
        like = self._like()
        return torch.zeros(*shape, dtype=like.dtype, device=like.device)

    def init(self) -> None:
        """A new trial in every environment: zero GRU state, no previous action, reward or done."""
        self.hidden = self._zeros(1, self.num_envs, self.learner.gru.hidden_size)
        self.prev_action = self._zeros(self.num_envs, self.learner.family.num_actions)
        self.prev_reward, self.prev_done = self._zeros(self.num_envs), self._zeros(self.num_envs)

    def _act(self, observations: np.ndarray, sample: bool) -> np.ndarray:
        like = self._like()
        obs = torch.as_tensor(np.asarray(observations), dtype=like.dtype).to(like.device)
        with torch.no_grad():
            _, mean, _, self.hidden = self.learner.policy_step(
                obs, self.prev_action, self.prev_reward, self.prev_done, self.hidden
            )
            action = mean
            if sample:
                normals = torch.randn(mean.shape, generator=self.generator, dtype=mean.dtype).to(mean.device)
                action = mean + self.learner.log_std.exp() * normals
        env_action = self.learner.env_action(action)
        # The next input's previous action; reward and done until `step` or `reset` says otherwise.
        self.prev_action, self.prev_reward, self.prev_done = (
            env_action,
            torch.zeros_like(self.prev_reward),
            torch.zeros_like(self.prev_done),
        )
        return env_action.cpu().numpy().astype(np.float64)

    def adapt_action(self, observations: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Actions sampled from the policy (as in training), `[envs, 4]`; the GRU state moves on."""
        return self._act(observations, sample=True), {}

    def step(self, timestep: Any) -> None:
        """The transition's reward and done flag, for the next input."""
        like = self._like()
        self.prev_reward = torch.as_tensor(np.asarray(timestep.reward), dtype=like.dtype).to(like.device)
        done = np.logical_or(timestep.terminated, timestep.truncated)
        self.prev_done = torch.as_tensor(done, dtype=like.dtype).to(like.device)

    def adapt(self) -> None:
        """Nothing: RL² adapts in its hidden state, which carries on into the evaluation."""

    def eval_action(self, observations: np.ndarray) -> np.ndarray:
        """The policy's mean action (a sample with `sample_eval`), `[envs, 4]`; the GRU state moves on."""
        return self._act(observations, sample=self.sample_eval)

    def reset(self, env_mask: np.ndarray) -> None:
        """The done flag of the environments whose episode ended (the GRU state is kept: one trial)."""
        mask = torch.as_tensor(np.asarray(env_mask), dtype=torch.bool).to(self.prev_done.device)
        self.prev_done = torch.where(mask, torch.ones_like(self.prev_done), self.prev_done)


class RandomAgent:
    """Uniform actions in [-1, 1] (Meta-World's action box); adapts to nothing.

    Args:
        num_envs: the vector env's number of environments.
        seed: the seed of the actions.
    """

    def __init__(self, num_envs: int, seed: int = 0) -> None:
        self.num_envs, self.rng = num_envs, np.random.default_rng(seed)

    def init(self) -> None: ...

    def _act(self) -> np.ndarray:
        return self.rng.uniform(-1.0, 1.0, size=(self.num_envs, 4))

    def adapt_action(self, observations: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return self._act(), {}

    def step(self, timestep: Any) -> None: ...

    def adapt(self) -> None: ...

    def eval_action(self, observations: np.ndarray) -> np.ndarray:
        return self._act()

    def reset(self, env_mask: np.ndarray) -> None: ...
