"""RL² (Duan et al. 2016, "RL²: Fast Reinforcement Learning via Slow Reinforcement Learning").

A recurrent agent sees (observation, previous action, previous reward, done flag) and keeps its
GRU state across the episodes of a trial, resetting it only between trials: learning a new task
happens in the hidden state, and the weights are meta-trained by an ordinary RL algorithm on
trials of tasks from the family. The paper used TRPO with GAE; this is PPO (clipped ratio, GAE,
entropy bonus), written here in torch: per training step one trial of each of this rank's
tasks is rolled out from the batched family (`lightning_meta.envs`), then `ppo_epochs` ×
`minibatches` optimizer steps are taken on it (Lightning's manual optimization, so
`trainer.max_steps` counts those optimizer steps).

The value head predicts *normalised* returns (running mean and variance of the value targets,
kept as buffers so checkpoints carry them): with raw targets, n = 100 pulls give returns up to
~80 and a value loss in the thousands that swamps the policy's gradient in the shared GRU, and
such an agent has been seen to climb to 73 and collapse back to random (tests/test_rl2.py
holds the regression test).

Discrete families get a categorical policy; continuous ones (2D navigation, the MuJoCo
locomotion families) a diagonal Gaussian whose mean is the policy head's output and whose
log standard deviation is one learned parameter per action dimension (state-independent, as
in the MAML and RL² papers' Gaussian MLP policies). The Gaussian's standard normals are drawn
from a generator seeded by each task's action-sampling uniforms (`TaskSpecBatch.action_noise`),
so the sampled actions are still a function of the task's global index (DDP layouts and
resumes see the same draws). The environment gets the action clipped to ±`action_clip` (the
locomotion families' action box); the previous-action input is that clipped action, and PPO's
ratio uses the density of the unclipped sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.distributions import Normal

from lightning_meta.algorithms.rl_base import MetaRLLearner
from lightning_meta.envs.families import TaskFamily, TaskSpecBatch, step_noise


@dataclass
class Rollout:
    """One trial per task, time first: `inputs` `[steps, tasks, input_dim]`, the rest `[steps, tasks]`
    (continuous actions: `[steps, tasks, action_dim]`)."""

    inputs: Tensor
    actions: Tensor
    log_probs: Tensor
    values: Tensor
    rewards: Tensor


def gae(rewards: Tensor, values: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over whole trials (`[steps, tasks]`; the trial is the RL
    episode, so nothing is bootstrapped past its end). Returns (advantages, λ-returns)."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        next_value = values[t + 1] if t + 1 < rewards.shape[0] else torch.zeros_like(values[t])
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        advantages[t] = running
    return advantages, advantages + values


def sample_categorical(probs: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF sample of each row of `probs` from one uniform each (clamped for float error)."""
    return (probs.cumsum(-1) <= u[:, None]).sum(-1).clamp(max=probs.shape[-1] - 1)


def action_normals(action_noise: Tensor, num_actions: int) -> Tensor:
    """Standard normals `[tasks, episodes, horizon, num_actions]` for a Gaussian policy: each
    task's from a generator seeded by its first action-sampling uniform, a function of the
    task's global index like the uniform itself."""
    seeds = (action_noise[:, 0, 0].detach().double().cpu() * 2**32).long().tolist()
    shape = (*action_noise.shape[1:3], num_actions)
    normals = [torch.randn(shape, generator=torch.Generator().manual_seed(seed)) for seed in seeds]
    return torch.stack(normals).to(action_noise.device)


class RL2(MetaRLLearner):
    """RL² with a GRU policy and value, meta-trained by PPO; see the module docstring.

    Args:
        family: the task family (`lightning_meta.envs`), the same as the DataModule's.
        hidden_size: GRU units (the paper: 256).
        gamma: discount over the trial.
        gae_lambda: GAE's λ (the paper: 0.3).
        clip: PPO's ratio clip ε.
        entropy_coef: weight of the entropy bonus.
        value_coef: weight of the value loss.
        ppo_epochs: passes over each rollout.
        minibatches: minibatches (of whole trials) per pass; 1 makes the DDP gradient equal to
            one process's on the union of the ranks' tasks.
        max_grad_norm: gradient norm clip of each optimizer step (None: off).
        normalize_values: predict normalised value targets (see the module docstring).
        value_norm_decay: decay of the running mean/variance of the value targets, per step.
        init_log_std: continuous families: the Gaussian policy's initial log standard deviation.
        action_clip: continuous families: the environment gets actions clipped to ±this (None: as sampled).
        optimizer: see `MetaRLLearner`.
        lr_scheduler: see `MetaRLLearner`.
    """

    def __init__(
        self,
        family: TaskFamily,
        hidden_size: int = 256,
        gamma: float = 0.99,
        gae_lambda: float = 0.3,
        clip: float = 0.2,
        entropy_coef: float = 0.01,
        value_coef: float = 0.5,
        ppo_epochs: int = 4,
        minibatches: int = 1,
        max_grad_norm: float | None = 1.0,
        normalize_values: bool = True,
        value_norm_decay: float = 0.99,
        init_log_std: float = 0.0,
        action_clip: float | None = 1.0,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        if action_clip is not None and action_clip <= 0:
            raise ValueError(f"action_clip={action_clip} must be positive (or None: no clipping)")
        super().__init__(family, optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.automatic_optimization = False
        self.gamma, self.gae_lambda, self.clip = gamma, gae_lambda, clip
        self.entropy_coef, self.value_coef, self.max_grad_norm = entropy_coef, value_coef, max_grad_norm
        self.ppo_epochs, self.minibatches = ppo_epochs, minibatches
        self.normalize_values, self.value_norm_decay = normalize_values, value_norm_decay
        self.input_dim = family.obs_dim + family.num_actions + 2
        self.gru = nn.GRU(self.input_dim, hidden_size)
        self.policy = nn.Linear(hidden_size, family.num_actions)
        self.value = nn.Linear(hidden_size, 1)
        self.discrete, self.action_clip = family.discrete, action_clip
        if not family.discrete:
            self.log_std = nn.Parameter(torch.full((family.num_actions,), float(init_log_std)))
        # Debiased exponential moving averages of the value targets' mean and mean square.
        self.register_buffer("target_mean", torch.zeros(()))
        self.register_buffer("target_square", torch.zeros(()))
        self.register_buffer("target_weight", torch.zeros(()))

    def heads(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """Policy logits (continuous: the Gaussian's mean) and the (normalised) value of GRU outputs."""
        return self.policy(hidden), self.value(hidden).squeeze(-1)

    def policy_step(
        self, obs: Tensor, prev_action: Tensor, prev_reward: Tensor, prev_done: Tensor, hidden: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One step of the recurrent policy for `[tasks]` at once: its input x = [observation,
        previous action, previous reward, done flag], the logits (continuous: the Gaussian's mean)
        and value of the GRU output, and the next hidden state."""
        x = torch.cat([obs, prev_action, prev_reward[:, None], prev_done[:, None]], 1)
        out, hidden = self.gru(x[None], hidden)
        logits, value = self.heads(out[0])
        return x, logits, value, hidden

    def env_action(self, action: Tensor) -> Tensor:
        """A continuous action as the environment gets it: clipped to ±`action_clip` if set."""
        return action if self.action_clip is None else action.clamp(-self.action_clip, self.action_clip)

    def log_prob_and_entropy(self, logits: Tensor, actions: Tensor) -> tuple[Tensor, Tensor]:
        """Log-probability of `actions` under the policy head's `logits`, and the mean entropy."""
        if self.discrete:
            log_probs = F.log_softmax(logits, -1)
            return log_probs.gather(-1, actions[..., None]).squeeze(-1), -(log_probs.exp() * log_probs).sum(-1).mean()
        dist = Normal(logits, self.log_std.exp())
        return dist.log_prob(actions).sum(-1), dist.entropy().sum(-1).mean()

    def sequence(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """Logits and values along whole trials (`[steps, tasks, input_dim]`), from a zero state."""
        hidden, _ = self.gru(inputs)
        return self.heads(hidden)

    def value_stats(self) -> tuple[Tensor, Tensor]:
        """Mean and standard deviation that map the value head's output to returns."""
        if not self.normalize_values or self.target_weight == 0:
            return torch.zeros((), device=self.device), torch.ones((), device=self.device)
        mean = self.target_mean / self.target_weight
        var = self.target_square / self.target_weight - mean**2
        return mean, var.clamp(min=1e-4).sqrt()

    def update_value_stats(self, targets: Tensor) -> None:
        d = self.value_norm_decay
        self.target_mean.mul_(d).add_((1 - d) * targets.mean())
        self.target_square.mul_(d).add_((1 - d) * (targets**2).mean())
        self.target_weight.mul_(d).add_(1 - d)

    @torch.no_grad()
    def rollout(self, batch: TaskSpecBatch) -> Rollout:
        """One trial of every task of `batch`, the hidden state kept across its episodes."""
        family, tasks, n = self.family, batch.tasks, len(batch)
        like = {"device": self.device, "dtype": self.policy.weight.dtype}
        hidden = torch.zeros(1, n, self.gru.hidden_size, **like)
        prev_action = torch.zeros(n, family.num_actions, **like)  # none yet
        prev_reward = torch.zeros(n, **like)
        prev_done = torch.zeros(n, **like)
        steps: dict[str, list[Tensor]] = {k: [] for k in ("inputs", "actions", "log_probs", "values", "rewards")}
        normals = None if self.discrete else action_normals(batch.action_noise, family.num_actions).to(**like)
        for episode in range(family.episodes):
            state = family.initial_state(tasks)
            for t in range(family.horizon):
                obs = family.observe(tasks, state).to(prev_action.dtype)
                x, logits, value, hidden = self.policy_step(obs, prev_action, prev_reward, prev_done, hidden)
                if self.discrete:
                    action = sample_categorical(F.log_softmax(logits, -1).exp(), batch.action_noise[:, episode, t])
                    env_action = action
                else:
                    action = logits + self.log_std.exp() * normals[:, episode, t]
                    env_action = self.env_action(action)
                log_prob, _ = self.log_prob_and_entropy(logits, action)
                state, reward = family.step(tasks, state, env_action, step_noise(batch.noise, episode, t))
                reward = reward.to(x.dtype)  # the MuJoCo families reward in float64
                for key, v in zip(steps, (x, action, log_prob, value, reward), strict=True):
                    steps[key].append(v)
                prev_action = F.one_hot(action, family.num_actions).to(x.dtype) if self.discrete else env_action
                prev_reward, prev_done = reward.to(x.dtype), torch.full_like(prev_done, float(t == family.horizon - 1))
        return Rollout(**{key: torch.stack(v) for key, v in steps.items()})

    def episode_returns(self, batch: TaskSpecBatch) -> Tensor:
        rewards = self.rollout(batch).rewards  # [steps, tasks]
        return rewards.T.reshape(len(batch), self.family.episodes, self.family.horizon).sum(-1)

    def ppo_loss(self, rollout: Rollout, advantages: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """PPO's clipped objective, value loss (on normalised targets) and entropy bonus."""
        logits, values = self.sequence(rollout.inputs)
        new_log_probs, entropy = self.log_prob_and_entropy(logits, rollout.actions)
        log_ratio = new_log_probs - rollout.log_probs
        ratio = log_ratio.exp()
        clipped = ratio.clamp(1 - self.clip, 1 + self.clip)
        policy_loss = -torch.minimum(ratio * advantages, clipped * advantages).mean()
        value_loss = F.mse_loss(values, targets)
        loss = policy_loss + self.value_coef * value_loss - self.entropy_coef * entropy
        with torch.no_grad():
            stats = {
                "policy_loss": policy_loss,
                "value_loss": value_loss,
                "entropy": entropy,
                "approx_kl": ((ratio - 1) - log_ratio).mean(),
                "clip_fraction": ((ratio - 1).abs() > self.clip).float().mean(),
            }
        return loss, stats

    def advantages_and_targets(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        """Normalised advantages and normalised value targets of a rollout (statistics over all
        ranks' trials, so DDP matches one process on the union); updates the value statistics."""
        mean, std = self.value_stats()
        advantages, returns = gae(rollout.rewards, rollout.values * std + mean, self.gamma, self.gae_lambda)
        everyone = self.gather(returns.T.contiguous())
        if self.normalize_values:
            self.update_value_stats(everyone)
        mean, std = self.value_stats()
        all_advantages = self.gather(advantages.T.contiguous())
        advantages = (advantages - all_advantages.mean()) / (all_advantages.std() + 1e-8)
        return advantages, (returns - mean) / std

    def training_step(self, batch: TaskSpecBatch, batch_idx: int) -> None:
        optimizer = self.optimizers()
        rollout = self.rollout(batch)
        advantages, targets = self.advantages_and_targets(rollout)
        chunks = torch.arange(len(batch), device=self.device).chunk(self.minibatches)
        for _ in range(self.ppo_epochs):
            for idx in chunks:
                part = Rollout(*(getattr(rollout, k)[:, idx] for k in Rollout.__dataclass_fields__))
                loss, stats = self.ppo_loss(part, advantages[:, idx], targets[:, idx])
                optimizer.zero_grad()
                self.manual_backward(loss)
                if self.max_grad_norm is not None:
                    self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
                optimizer.step()
        if (scheduler := self.lr_schedulers()) is not None:
            scheduler.step()
        n = len(batch)
        self.log("train/return", rollout.rewards.sum(0).mean(), prog_bar=True, batch_size=n)
        for key, value in stats.items():  # the last minibatch's
            self.log(f"train/{key}", value, batch_size=n)
