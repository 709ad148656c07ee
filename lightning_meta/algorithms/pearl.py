"""PEARL (Rakelly et al. 2019, "Efficient Off-Policy Meta-Reinforcement Learning via Probabilistic
Context Variables").

A context encoder maps each transition (s, a, r[, s']) of a task to a Gaussian factor over a
latent task variable z; the posterior q(z | c) is the product of the factors (permutation
invariant, and it sharpens as context accumulates), pulled towards N(0, I) by a KL term (weight
`kl_weight`, the information bottleneck). A soft actor-critic conditioned on z learns off-policy
from per-task replay buffers; the encoder is trained by the critics' Bellman error through z.
Adapting to a new task is inference, not gradient descent: act with z from the prior, collect
context, infer the posterior, act with z from it.

Layout of one training step (one "iteration" of the reference code, oyster
`rlkit/core/rl_algorithm.py`): for each of this rank's tasks (the DataModule's batch; with
`RLTaskDataModule(train_pool=N)` the tasks come from a fixed pool of N training tasks, as in the
paper), collect `initial_episodes` prior episodes the first time a task is seen, then clear its
context buffer and collect `prior_episodes` episodes with z ~ N(0, I) (into the replay and the
context buffer: the context buffer holds only this recent data, as oyster's `enc_replay_buffer`)
and `posterior_episodes` with z ~ q(z | context) (replay only: oyster's
`num_extra_rl_steps_posterior`); then take `gradient_steps` gradient steps, each on `meta_batch`
of the tasks this rank holds data for, `batch_size` replay transitions and `context_batch`
context transitions per task.

What differs from oyster, on purpose:
- SAC with twin Q critics and *target Q networks* (Haarnoja et al. 2018b), not the original's
  separate value network V and its target; the temperature α is learned towards a target entropy
  (`learn_alpha`), or fixed (`learn_alpha=False`, α = `init_alpha`; oyster's setting is α = 1
  with `reward_scale` 5).
- All losses are summed into one backward per gradient step (the actor's Q is evaluated with the
  critics' parameters detached, so each loss reaches exactly the parameters it trains) and then
  every optimizer steps: one backward per step is what DDP averages correctly, and every
  parameter gets a gradient each step. Oyster steps the critics first and evaluates the actor
  on the updated critics.
- The meta-batch is drawn without replacement from the tasks this rank holds (oyster: with
  replacement from all training tasks).

Randomness: each task of the pool has its own generator (seeded by `seed` and the task's pool
index) that draws its exploration noise, z samples and replay indices, so a task's data and
samples are the same whichever rank holds it; a per-rank generator picks the meta-batch. The
replay and context buffers and every generator's state are saved in the checkpoint (all ranks'
under DDP), so a resumed fit continues exactly (tested). Lightning's manual optimization with
one optimizer each for the encoder, the actor, the critics and α: `trainer.max_steps` counts
optimizer steps, `len(self.optimizers())` per gradient step.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_lightning.cli import OptimizerCallable
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.func import functional_call

from lightning_meta.algorithms.policy_gradient import gaussian_log_prob
from lightning_meta.algorithms.rl_base import MetaRLLearner
from lightning_meta.envs.families import TaskFamily, Tasks, TaskSpecBatch, step_noise

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0  # oyster's TanhGaussianPolicy clamp
FIELDS = ("obs", "action", "reward", "next_obs")


def product_of_gaussians(mean: Tensor, var: Tensor, dim: int = -2) -> tuple[Tensor, Tensor]:
    """The normalised product of Gaussian factors N(mean_n, var_n) along `dim`: precisions add,
    and the mean is the precision-weighted mean. Variances are clamped at 1e-7 (as oyster)."""
    var = var.clamp(min=1e-7)
    post_var = 1.0 / (1.0 / var).sum(dim)
    return post_var * (mean / var).sum(dim), post_var


def kl_to_standard_normal(mean: Tensor, var: Tensor) -> Tensor:
    """KL(N(mean, diag var) || N(0, I)), summed over the last dimension."""
    return 0.5 * (var + mean**2 - 1.0 - var.log()).sum(-1)


def mlp(inputs: int, hidden: int, layers: int, outputs: int) -> nn.Sequential:
    """`layers` hidden ReLU layers of `hidden` units, then a linear output."""
    modules: list[nn.Module] = []
    for i in range(layers):
        modules += [nn.Linear(inputs if i == 0 else hidden, hidden), nn.ReLU()]
    modules.append(nn.Linear(hidden if layers else inputs, outputs))
    return nn.Sequential(*modules)


class TanhGaussianPolicy(nn.Module):
    """a = scale · tanh(u), u ~ N(μ(x), σ(x)²), with the tanh change of variables in log π.

    log π is the density of the normalised action a / scale ∈ (-1, 1)ᵈ, so the default target
    entropy −d means the same whatever the action bound (the bound only shifts log π by a
    constant, which changes no gradient).

    Args:
        inputs: input size (observation + latent).
        actions: action dimension.
        hidden: units per hidden layer.
        layers: hidden layers.
        scale: the action bound.
    """

    def __init__(self, inputs: int, actions: int, hidden: int, layers: int, scale: float) -> None:
        super().__init__()
        self.net = mlp(inputs, hidden, layers, 2 * actions)
        self.actions, self.scale = actions, scale

    def forward(self, x: Tensor, eps: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(action, log π(action), μ, log σ); `eps` ~ N(0, I) reparameterises the sample, None
        takes the mean action (log π is then that of the mean)."""
        mean, log_std = self.net(x).split(self.actions, -1)
        log_std = log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)
        u = mean if eps is None else mean + log_std.exp() * eps
        log_prob = gaussian_log_prob(mean, log_std, u)
        log_prob = log_prob - (2 * (math.log(2) - u - F.softplus(-2 * u))).sum(-1)  # log(1 - tanh(u)²), stably
        return self.scale * torch.tanh(u), log_prob, mean, log_std


def _seed(*keys: int) -> int:
    return int(np.random.SeedSequence([k & 0xFFFFFFFF for k in keys]).generate_state(1, np.uint64)[0] >> 1)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class PEARL(MetaRLLearner):
    """PEARL: probabilistic context encoder + soft actor-critic; see the module docstring.

    Args:
        family: the task family (continuous actions), the same as the DataModule's.
        latent_dim: size of z (the paper: 5).
        hidden_size: units per hidden layer of the actor and critics (oyster: 300).
        layers: hidden layers of the actor and critics (oyster: 3).
        encoder_hidden_size: units per hidden layer of the context encoder (oyster: 200).
        encoder_layers: hidden layers of the context encoder (oyster: 3).
        kl_weight: weight of KL(q(z | c) || N(0, I)), summed over the tasks of the global
            meta-batch (oyster's `kl_lambda`: 0.1).
        use_next_obs_in_context: context transitions are (s, a, r, s') instead of (s, a, r).
        discount: γ.
        reward_scale: rewards are multiplied by this in the Bellman target (oyster: 5).
        tau: soft target update rate (oyster: 0.005).
        learn_alpha: learn the temperature α towards `target_entropy`; False keeps α fixed.
        init_alpha: α at the start (fixed α if not learned).
        target_entropy: the entropy α is tuned for; None: −(action dimension).
        policy_mean_weight: L2 penalty on the actor's pre-tanh means (oyster: 1e-3).
        policy_std_weight: L2 penalty on the actor's log σ (oyster: 1e-3).
        action_scale: the action bound; None: the family's `max_move` if it has one, else 1.
        initial_episodes: prior episodes collected for a task the first time it is seen
            (oyster's `num_initial_steps` / `max_path_length`).
        prior_episodes: episodes per task and step with z ~ N(0, I), into the replay and the
            context buffer (oyster's `num_steps_prior` / `max_path_length`).
        posterior_episodes: episodes per task and step with z ~ q(z | context), into the replay
            buffer only (oyster's `num_extra_rl_steps_posterior` / `max_path_length`).
        gradient_steps: gradient steps per training step (oyster's `num_train_steps_per_itr`).
        meta_batch: tasks per gradient step, per rank (oyster: 16).
        batch_size: replay transitions per task and gradient step (oyster: 256).
        context_batch: context transitions per task and gradient step (oyster's
            `embedding_batch_size`: 100 for HalfCheetah-Vel).
        replay_capacity: transitions kept per task (the oldest are dropped; oyster: 10⁶).
        seed: seeds the per-task and per-rank generators.
        optimizer: builds each of the four optimizers (encoder, actor, critics, α); default Adam.
    """

    reports_last_episode = True
    """`{stage}/return` is the last episode's (after adaptation; MetaRLLearner), not the trial's."""

    def __init__(
        self,
        family: TaskFamily,
        latent_dim: int = 5,
        hidden_size: int = 300,
        layers: int = 3,
        encoder_hidden_size: int = 200,
        encoder_layers: int = 3,
        kl_weight: float = 0.1,
        use_next_obs_in_context: bool = False,
        discount: float = 0.99,
        reward_scale: float = 1.0,
        tau: float = 0.005,
        learn_alpha: bool = True,
        init_alpha: float = 1.0,
        target_entropy: float | None = None,
        policy_mean_weight: float = 1e-3,
        policy_std_weight: float = 1e-3,
        action_scale: float | None = None,
        initial_episodes: int = 1,
        prior_episodes: int = 1,
        posterior_episodes: int = 1,
        gradient_steps: int = 100,
        meta_batch: int = 16,
        batch_size: int = 256,
        context_batch: int = 100,
        replay_capacity: int = 1_000_000,
        seed: int = 0,
        optimizer: OptimizerCallable = torch.optim.Adam,
    ) -> None:
        if family.discrete:
            raise ValueError(f"PEARL's actor is a tanh-Gaussian over continuous actions: {family!r} is discrete")
        for name, value in (("latent_dim", latent_dim), ("gradient_steps", gradient_steps), ("meta_batch", meta_batch)):
            if value < 1:
                raise ValueError(f"{name}={value} must be at least 1")
        for name, value in (("batch_size", batch_size), ("context_batch", context_batch)):
            if value < 1:
                raise ValueError(f"{name}={value} must be at least 1")
        if prior_episodes < 1:
            raise ValueError(f"prior_episodes={prior_episodes} must be at least 1: they fill the context buffer")
        super().__init__(family, optimizer, None)
        self.save_hyperparameters(ignore=["optimizer"])
        self.automatic_optimization = False
        self.latent_dim, self.kl_weight, self.use_next_obs = latent_dim, kl_weight, use_next_obs_in_context
        self.discount, self.reward_scale, self.tau = discount, reward_scale, tau
        self.learn_alpha = learn_alpha
        self.target_entropy = -float(family.num_actions) if target_entropy is None else target_entropy
        self.policy_mean_weight, self.policy_std_weight = policy_mean_weight, policy_std_weight
        self.initial_episodes, self.prior_episodes, self.posterior_episodes = (
            initial_episodes,
            prior_episodes,
            posterior_episodes,
        )
        self.gradient_steps, self.meta_batch = gradient_steps, meta_batch
        self.batch_size, self.context_batch, self.replay_capacity = batch_size, context_batch, replay_capacity
        self.seed = seed
        obs, act = family.obs_dim, family.num_actions
        scale = action_scale if action_scale is not None else float(getattr(family, "max_move", 1.0))
        self.context_dim = obs + act + 1 + (obs if use_next_obs_in_context else 0)
        self.encoder = mlp(self.context_dim, encoder_hidden_size, encoder_layers, 2 * latent_dim)
        self.policy = TanhGaussianPolicy(obs + latent_dim, act, hidden_size, layers, scale)
        self.q1 = mlp(obs + act + latent_dim, hidden_size, layers, 1)
        self.q2 = mlp(obs + act + latent_dim, hidden_size, layers, 1)
        self.q1_target, self.q2_target = copy.deepcopy(self.q1), copy.deepcopy(self.q2)
        for p in (*self.q1_target.parameters(), *self.q2_target.parameters()):
            p.requires_grad_(False)
        log_alpha = torch.tensor(math.log(init_alpha))
        if learn_alpha:
            self.log_alpha = nn.Parameter(log_alpha)
        else:
            self.register_buffer("log_alpha", log_alpha)
        # Per-task buffers (pool index -> field -> tensor) and generators; not module state: the
        # checkpoint hooks save them (every rank's).
        self.replay: dict[int, dict[str, Tensor]] = {}
        self.context: dict[int, dict[str, Tensor]] = {}
        self.task_generators: dict[int, torch.Generator] = {}
        self.rank_generator: torch.Generator | None = None
        self.collected_steps = 0

    # ---------------------------------------------------------------- inference over z

    def context_vectors(self, data: dict[str, Tensor]) -> Tensor:
        """Transitions `[..., field]` -> context inputs `[..., context_dim]` (actions normalised by the bound)."""
        parts = [data["obs"], data["action"] / self.policy.scale, data["reward"][..., None]]
        if self.use_next_obs:
            parts.append(data["next_obs"])
        return torch.cat(parts, -1)

    def posterior(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """q(z | c) of each task's context `[tasks, transitions, context_dim]`: (mean, var) `[tasks, latent]`."""
        params = self.encoder(context)
        mean, var = params[..., : self.latent_dim], F.softplus(params[..., self.latent_dim :])
        return product_of_gaussians(mean, var)

    # ---------------------------------------------------------------- acting and collecting

    def _task_generator(self, slot: int) -> torch.Generator:
        if slot not in self.task_generators:
            self.task_generators[slot] = _generator(_seed(self.seed, 1, slot))
        return self.task_generators[slot]

    def _noise(self, generators: list[torch.Generator], *shape: int) -> Tensor:
        """One standard normal block per task, from each task's generator: `[tasks, *shape]`."""
        like = self.policy.net[0].weight
        return torch.stack([torch.randn(shape, generator=g, dtype=like.dtype) for g in generators]).to(like.device)

    def _family_noise(self, generators: list[torch.Generator], episodes: int) -> dict[str, Tensor]:
        """The family's own noise for `episodes` episodes of each task (whole trials drawn from a
        numpy generator seeded by the task's generator, cut to `episodes`)."""
        family, trials = self.family, math.ceil(episodes / self.family.episodes)
        per_task = []
        for g in generators:
            rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=g)))
            draws = [family.sample_noise(1, rng) for _ in range(trials)]
            per_task.append({k: torch.cat([d[k] for d in draws], 1)[:, :episodes] for k in draws[0]})
        return {k: torch.cat([n[k] for n in per_task]).to(self.device) for k in per_task[0]}

    def act(self, obs: Tensor, z: Tensor, eps: Tensor | None) -> Tensor:
        """Actions for observations `[tasks, obs]` and latents `[tasks, latent]` (eps None: the mean)."""
        return self.policy(torch.cat([obs, z], -1), eps)[0]

    def run_episode(
        self, tasks: Tasks, z: Tensor, noise: dict[str, Tensor], episode: int, eps: Tensor | None
    ) -> tuple[dict[str, Tensor], Tensor]:
        """One episode of every task with latents `z`: (transitions, each `[tasks, horizon, ...]`,
        the episode's returns `[tasks]`). `eps` `[tasks, horizon, actions]` or None (mean actions)."""
        family, dtype = self.family, z.dtype
        state = family.initial_state(tasks)
        steps: dict[str, list[Tensor]] = {k: [] for k in FIELDS}
        for t in range(family.horizon):
            obs = family.observe(tasks, state).to(dtype)
            action = self.act(obs, z, None if eps is None else eps[:, t])
            state, reward = family.step(tasks, state, action, step_noise(noise, episode, t))
            next_obs = family.observe(tasks, state).to(dtype)
            for key, value in zip(FIELDS, (obs, action, reward.to(dtype), next_obs), strict=True):
                steps[key].append(value)
        data = {key: torch.stack(v, 1) for key, v in steps.items()}
        return data, data["reward"].sum(1)

    def _cast_tasks(self, tasks: Tasks) -> Tasks:
        dtype = self.policy.net[0].weight.dtype
        return {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device)) for k, v in tasks.items()}

    def _append(self, store: dict[int, dict[str, Tensor]], slots: list[int], data: dict[str, Tensor]) -> None:
        for i, slot in enumerate(slots):
            new = {k: v[i] for k, v in data.items()}  # [episodes * horizon, ...]
            old = store.get(slot)
            store[slot] = new if old is None else {k: torch.cat([old[k], new[k]])[-self.replay_capacity :] for k in new}

    @torch.no_grad()
    def collect(self, tasks: Tasks, slots: list[int], episodes: int, posterior: bool, to_context: bool) -> Tensor:
        """Roll out `episodes` exploration episodes of each task (stochastic actions) into its
        replay buffer (and its context buffer if `to_context`), with z resampled every episode
        from N(0, I) or from q(z | a context batch of the task's context buffer). Returns the
        mean episode return of each task."""
        generators = [self._task_generator(s) for s in slots]
        noise = self._family_noise(generators, episodes)
        eps = self._noise(generators, episodes, self.family.horizon, self.family.num_actions)
        z_eps = self._noise(generators, episodes, self.latent_dim)
        episodes_data, returns = [], []
        for e in range(episodes):
            if posterior:
                mean, var = self.posterior(self._sample_context(slots, generators))
                z = mean + var.sqrt() * z_eps[:, e]
            else:
                z = z_eps[:, e]
            data, ret = self.run_episode(tasks, z, noise, e, eps[:, e])
            episodes_data.append(data)
            returns.append(ret)
        stacked = {k: torch.cat([d[k] for d in episodes_data], 1) for k in FIELDS}
        self._append(self.replay, slots, stacked)
        if to_context:
            self._append(self.context, slots, stacked)
        self.collected_steps += episodes * self.family.horizon * len(slots)
        return torch.stack(returns, 1).mean(1)

    def _sample(
        self, store: dict[int, dict[str, Tensor]], slots: list[int], generators: list[torch.Generator], n: int
    ) -> dict[str, Tensor]:
        picked = []
        for slot, g in zip(slots, generators, strict=True):
            data = store[slot]
            idx = torch.randint(data["obs"].shape[0], (n,), generator=g).to(data["obs"].device)
            picked.append({k: v[idx] for k, v in data.items()})
        return {k: torch.stack([p[k] for p in picked]) for k in FIELDS}

    def _sample_context(self, slots: list[int], generators: list[torch.Generator]) -> Tensor:
        return self.context_vectors(self._sample(self.context, slots, generators, self.context_batch))

    # ---------------------------------------------------------------- losses

    def _q(self, net: nn.Module, obs: Tensor, action: Tensor, z: Tensor, detached: bool = False) -> Tensor:
        x = torch.cat([obs, action / self.policy.scale, z], -1)  # actions normalised to [-1, 1], as the actor's
        if detached:  # the actor's gradient reaches the action, not the critic's weights
            return functional_call(net, {k: v.detach() for k, v in net.named_parameters()}, (x,)).squeeze(-1)
        return net(x).squeeze(-1)

    def sac_losses(
        self, batch: dict[str, Tensor], context: Tensor, z_eps: Tensor, eps: Tensor, next_eps: Tensor
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The losses of one gradient step, by name (critic: through z into the encoder too; kl;
        actor; alpha if learned), and statistics. `batch` fields `[tasks, batch, ...]`, `context`
        `[tasks, context_batch, context_dim]`, `z_eps` `[tasks, latent]`, `eps`/`next_eps`
        `[tasks, batch, actions]` (the reparameterisation noise of the actor's samples)."""
        mean, var = self.posterior(context)
        z = mean + var.sqrt() * z_eps  # [tasks, latent]
        n = batch["obs"].shape[1]
        z_rep = z[:, None].expand(-1, n, -1)
        zd = z_rep.detach()
        alpha = self.log_alpha.exp().detach()
        obs, action, reward, next_obs = (batch[k] for k in FIELDS)
        with torch.no_grad():
            next_action, next_log_prob, _, _ = self.policy(torch.cat([next_obs, zd], -1), next_eps)
            next_q = torch.minimum(
                self._q(self.q1_target, next_obs, next_action, zd), self._q(self.q2_target, next_obs, next_action, zd)
            )
            target = self.reward_scale * reward + self.discount * (next_q - alpha * next_log_prob)
        q1, q2 = self._q(self.q1, obs, action, z_rep), self._q(self.q2, obs, action, z_rep)
        losses = {"critic": F.mse_loss(q1, target) + F.mse_loss(q2, target)}
        kl = kl_to_standard_normal(mean, var)
        world = self.trainer.world_size if self._trainer is not None else 1
        losses["kl"] = self.kl_weight * kl.sum() * world  # a sum over the global meta-batch (oyster); DDP averages
        new_action, log_prob, pre_mean, log_std = self.policy(torch.cat([obs, zd], -1), eps)
        q_new = torch.minimum(
            self._q(self.q1, obs, new_action, zd, detached=True), self._q(self.q2, obs, new_action, zd, detached=True)
        )
        losses["actor"] = (
            (alpha * log_prob - q_new).mean()
            + self.policy_mean_weight * (pre_mean**2).mean()
            + self.policy_std_weight * (log_std**2).mean()
        )
        if self.learn_alpha:
            losses["alpha"] = -(self.log_alpha * (log_prob.detach() + self.target_entropy)).mean()
        stats = {
            "critic_loss": losses["critic"].detach(),
            "actor_loss": losses["actor"].detach(),
            "kl": kl.mean().detach(),
            "alpha": alpha,
            "entropy": -log_prob.mean().detach(),
            "q": q1.mean().detach(),
            "z_var": var.mean().detach(),
        }
        return losses, stats

    def sac_loss(
        self, batch: dict[str, Tensor], context: Tensor, z_eps: Tensor, eps: Tensor, next_eps: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The sum of `sac_losses` (one backward trains every part) and the statistics."""
        losses, stats = self.sac_losses(batch, context, z_eps, eps, next_eps)
        return sum(losses.values()), stats

    def gradient_batch(self, slots: list[int]) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor, Tensor]:
        """Draw one gradient step's data for `slots` from their buffers and generators."""
        generators = [self._task_generator(s) for s in slots]
        batch = self._sample(self.replay, slots, generators, self.batch_size)
        context = self._sample_context(slots, generators)
        z_eps = self._noise(generators, self.latent_dim)
        actions = self.family.num_actions
        both = self._noise(generators, 2, self.batch_size, actions)
        return batch, context, z_eps, both[:, 0], both[:, 1]

    @torch.no_grad()
    def update_targets(self) -> None:
        for net, target in ((self.q1, self.q1_target), (self.q2, self.q2_target)):
            for p, tp in zip(net.parameters(), target.parameters(), strict=True):
                tp.lerp_(p, self.tau)

    # ---------------------------------------------------------------- Lightning

    def configure_optimizers(self):  # noqa: ANN201 - a list of optimizers
        groups = [self.encoder.parameters(), self.policy.parameters(), [*self.q1.parameters(), *self.q2.parameters()]]
        if self.learn_alpha:
            groups.append([self.log_alpha])
        return [self.optimizer(g) for g in groups]

    def on_fit_start(self) -> None:
        if getattr(self.trainer.datamodule, "train_pool", None) is None:
            rank_zero_warn(
                "PEARL without a task pool: every training task is new, so each replay buffer is filled once and "
                "never revisited, and buffers accumulate. Set data.init_args.train_pool (the paper: 100 tasks)."
            )
        if self.rank_generator is None:
            self.rank_generator = _generator(_seed(self.seed, 2, self.global_rank))

    def slots_of(self, batch: TaskSpecBatch) -> list[int]:
        """The pool index of each task of a training batch (its global index modulo the pool)."""
        pool = getattr(getattr(self.trainer, "datamodule", None), "train_pool", None) if self._trainer else None
        return [int(i) % pool if pool else int(i) for i in batch.index]

    def choose_meta_batch(self) -> list[int]:
        """Up to `meta_batch` of the tasks this rank holds data for (without replacement, sorted)."""
        held = sorted(self.replay)
        if len(held) <= self.meta_batch:
            return held
        if self.rank_generator is None:
            self.rank_generator = _generator(_seed(self.seed, 2, 0))
        pick = torch.randperm(len(held), generator=self.rank_generator)[: self.meta_batch]
        return sorted(held[i] for i in pick.tolist())

    def collect_step(self, tasks: Tasks, slots: list[int]) -> tuple[Tensor, Tensor | None]:
        """A training step's data collection for `slots` (see the module docstring): the mean
        episode return of each task with z from the prior, and from the posterior (or None)."""
        new = [i for i, s in enumerate(slots) if s not in self.replay]
        if new and self.initial_episodes > 0:
            sub = {k: v[new] for k, v in tasks.items()}
            self.collect(sub, [slots[i] for i in new], self.initial_episodes, posterior=False, to_context=False)
        for s in slots:
            self.context.pop(s, None)  # the context buffer holds this step's prior data only
        prior_return = self.collect(tasks, slots, self.prior_episodes, posterior=False, to_context=True)
        posterior_return = None
        if self.posterior_episodes > 0:
            posterior_return = self.collect(tasks, slots, self.posterior_episodes, posterior=True, to_context=False)
        return prior_return, posterior_return

    def training_step(self, batch: TaskSpecBatch, batch_idx: int) -> None:
        slots = self.slots_of(batch)
        prior_return, posterior_return = self.collect_step(self._cast_tasks(batch.tasks), slots)
        if posterior_return is not None:
            self.log("train/return_posterior", posterior_return.mean(), batch_size=len(slots))
        optimizers = self.optimizers()
        for _ in range(self.gradient_steps):
            loss, stats = self.sac_loss(*self.gradient_batch(self.choose_meta_batch()))
            for opt in optimizers:
                opt.zero_grad()
            self.manual_backward(loss)
            for opt in optimizers:
                opt.step()
            self.update_targets()
        n = len(slots)
        self.log("train/return", prior_return.mean(), prog_bar=True, batch_size=n)
        self.log("train/env_steps", float(self.collected_steps), batch_size=n)
        for key, value in stats.items():  # the last gradient step's
            self.log(f"train/{key}", value, batch_size=n)

    @torch.no_grad()
    def episode_returns(self, batch: TaskSpecBatch) -> Tensor:
        """Episode 0 with z ~ N(0, I) (before adaptation); episode e ≥ 1 with z ~ q(z | every
        transition of episodes 0..e-1). Mean actions, as oyster's evaluation; z noise from a
        generator of each task's global index, so the result does not depend on the rank layout."""
        family, tasks = self.family, self._cast_tasks(batch.tasks)
        generators = [_generator(_seed(self.seed, 3, int(i))) for i in batch.index]
        z_eps = self._noise(generators, family.episodes, self.latent_dim)
        noise = {k: v.to(self.device) for k, v in batch.noise.items()}
        seen: list[Tensor] = []
        returns = []
        for e in range(family.episodes):
            if seen:
                mean, var = self.posterior(torch.cat(seen, 1))
                z = mean + var.sqrt() * z_eps[:, e]
            else:
                z = z_eps[:, e]
            data, ret = self.run_episode(tasks, z, noise, e, None)
            seen.append(self.context_vectors(data))
            returns.append(ret)
        return torch.stack(returns, 1)

    # ---------------------------------------------------------------- checkpoint

    def _local_state(self) -> dict:
        def cpu(store: dict[int, dict[str, Tensor]]) -> dict[int, dict[str, Tensor]]:
            return {s: {k: v.cpu() for k, v in d.items()} for s, d in store.items()}

        return {
            "replay": cpu(self.replay),
            "context": cpu(self.context),
            "task_generators": {s: g.get_state() for s, g in self.task_generators.items()},
            "rank_generator": None if self.rank_generator is None else self.rank_generator.get_state(),
            "collected_steps": self.collected_steps,
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = self._local_state()
        if self._trainer is not None and self.trainer.world_size > 1:
            import torch.distributed as dist

            ranks: list = [None] * self.trainer.world_size
            dist.all_gather_object(ranks, state)
        else:
            ranks = [state]
        checkpoint["pearl_ranks"] = ranks

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        ranks = checkpoint.get("pearl_ranks")
        if ranks is None:
            return
        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.trainer.global_rank if self._trainer is not None else 0
        if self._trainer is not None and len(ranks) != world:
            raise ValueError(
                f"this PEARL checkpoint holds the replay buffers of {len(ranks)} processes but the run has "
                f"{world}: resume with trainer.devices × trainer.num_nodes = {len(ranks)}"
            )
        state = ranks[rank]
        device = self.device
        self.replay = {s: {k: v.to(device) for k, v in d.items()} for s, d in state["replay"].items()}
        self.context = {s: {k: v.to(device) for k, v in d.items()} for s, d in state["context"].items()}
        self.task_generators = {}
        for s, g_state in state["task_generators"].items():
            g = torch.Generator()
            g.set_state(g_state)
            self.task_generators[s] = g
        self.rank_generator = None
        if state["rank_generator"] is not None:
            self.rank_generator = torch.Generator()
            self.rank_generator.set_state(state["rank_generator"])
        self.collected_steps = state["collected_steps"]
