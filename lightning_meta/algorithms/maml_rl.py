"""MAML for reinforcement learning (Finn, Abbeel & Levine, ICML 2017, §5.3).

A Gaussian MLP policy is meta-trained so that one vanilla policy-gradient (VPG) step on 20
trajectories of a new task makes it good at that task. Per training step and task of this rank:
roll out `trajectories` episodes with θ, fit the linear feature baseline, take one VPG step through
the shared functional inner loop (`inner_loop.adapt`, second order unless `first_order`) to θ'_i,
roll out `trajectories` more episodes with θ'_i, and score θ'_i on them with the importance-
weighted surrogate. The outer step is TRPO as in the paper (max KL 0.01, conjugate gradient with
Hessian-vector products of the KL *through the inner step*, computed as Σ Jᵀ F J by `kl_hvp`,
backtracking line search that re-adapts from each candidate θ on the same pre-update
trajectories), or a step of an ordinary optimizer on the same surrogate (`outer="optimizer"`,
Adam by default): cheaper, not the paper's.

DDP: each rank adapts its own tasks; the outer gradient, every Hessian-vector product and the
line search's losses and KLs are averaged over ranks (`torch.distributed.all_reduce`), so every
rank takes the same step and 2 ranks × k tasks step exactly as 1 rank × 2k tasks. Lightning's
manual optimization applies the step (TRPO: as the gradient of plain SGD at lr 1), so
`trainer.max_steps` counts meta-iterations and checkpoints hold the usual state.

Action noise: the Gaussian noise of each task's trajectories is drawn from a generator seeded by
a hash of the task spec's own action noise (itself drawn from the task's global index), so a task
rolls out the same trajectories on any rank layout and after a resume.

Evaluation adapts by a gradient step, so it needs `Trainer(inference_mode=False)` (the CLI's
default); `episode_returns` gives [pre-update, post-update] mean episode return per task, and
`{stage}/return` is the post-update one (`MetaRLLearner.reports_last_episode`).

Differences from the paper's code (rllab, `maml_examples/maml_trpo_point.py`): the policy's
actions are scaled by `action_scale` (default: the family's `max_move`) before the environment
clips them, as rllab's `normalize` wrapper maps [-1, 1] onto the action box; episodes do not end
early at the goal (the family's choice; rllab's point env stops within 0.01). `action_clip`
clips the scaled action the environment receives, as `normalize` also did (the MuJoCo families
charge their control cost on the action as given, so unclipped Gaussian exploration pays for
noise beyond the box); the log-probabilities stay those of the sampled, unclipped action.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.func import functional_call

from lightning_meta.algorithms.policy_gradient import (
    discounted_returns,
    gaussian_kl,
    gaussian_log_prob,
    linear_baseline,
    trpo_step,
)
from lightning_meta.algorithms.rl_base import MetaRLLearner
from lightning_meta.envs.families import TaskFamily, TaskSpecBatch, step_noise
from lightning_meta.inner_loop import adapt, named_params
from lightning_meta.task import Params


class GaussianMLPPolicy(nn.Module):
    """A diagonal Gaussian policy: an MLP (ReLU) for the mean, a learned state-independent log-std.

    Args:
        obs_dim: observation size.
        action_dim: action size.
        hidden_sizes: hidden layer widths (the paper: 100, 100).
        init_std: the initial standard deviation (rllab's default 1).
    """

    def __init__(
        self, obs_dim: int, action_dim: int, hidden_sizes: tuple[int, ...] = (100, 100), init_std: float = 1.0
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        size = obs_dim
        for width in hidden_sizes:
            layers += [nn.Linear(size, width), nn.ReLU()]
            size = width
        layers.append(nn.Linear(size, action_dim))
        self.mean = nn.Sequential(*layers)
        for layer in self.mean:
            if isinstance(layer, nn.Linear):  # rllab's (and pytorch-maml-rl's) initialisation
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
        self.log_std = nn.Parameter(torch.full((action_dim,), math.log(init_std)))

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-std of the action distribution, both `[..., action_dim]`."""
        mean = self.mean(obs)
        return mean, self.log_std.expand_as(mean)


@dataclass
class Trajectories:
    """`trajectories` episodes per task: `obs`, `actions` `[tasks, N, H, dim]`, `rewards` `[tasks, N, H]`;
    `advantages` `[tasks, N, H]` once computed."""

    obs: Tensor
    actions: Tensor
    rewards: Tensor
    advantages: Tensor | None = None


def average_over_ranks(value: Tensor) -> Tensor:
    """The mean of `value` over the processes of the default group (itself outside DDP)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        return value / dist.get_world_size()
    return value


def task_seeds(action_noise: Tensor) -> list[int]:
    """One 63-bit seed per task from the bytes of its spec's action noise (a pure function of the
    task's stream, seed and global index; float32 so that a float64 run hashes the same bits)."""
    rows = action_noise.detach().float().cpu().flatten(1).numpy()
    return [int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little") >> 1 for row in rows]


class MAMLRL(MetaRLLearner):
    """MAML-RL with a VPG inner step and a TRPO (or plain optimizer) outer step; see the module docstring.

    Args:
        family: a continuous-action task family with one episode per trial (e.g. `Navigation2D`),
            the same as the DataModule's.
        hidden_sizes: the policy MLP's hidden widths (the paper: 100, 100, ReLU).
        init_std: the policy's initial standard deviation (in units of `action_scale`).
        action_scale: the environment receives `action_scale ×` the policy's action (None: the
            family's `max_move` if it has one, else 1).
        action_clip: the environment receives the scaled action clipped to ±this (None: unclipped;
            rllab's `normalize`, as in the paper's locomotion runs: 1 on HalfCheetah's [-1, 1] box).
        trajectories: episodes per task for the inner step, and again after it (the paper: 20).
        inner_lr: the VPG step size α (the paper: 0.1).
        first_order: drop the second-order terms of the inner step (as MAML's `first_order`).
        gamma: discount of the returns the baseline fits and the advantages use.
        normalize_advantages: standardise each task's advantages (rllab's `center_adv`).
        outer: "trpo" (the paper) or "optimizer": a step of `optimizer` on the surrogate.
        max_kl: TRPO's trust region δ (the paper: 0.01).
        cg_iters: conjugate-gradient iterations.
        cg_damping: damping added to the KL Hessian.
        backtrack_ratio: line-search shrink factor.
        max_backtracks: line-search tries.
        optimizer: the outer optimizer when `outer="optimizer"` (default Adam, lr 1e-3); TRPO
            applies its own step (by SGD at lr 1, so Lightning counts and checkpoints it).
        lr_scheduler: optional schedule of `optimizer` (`outer="optimizer"` only).
    """

    adapts_with_gradients = True
    reports_last_episode = True

    def __init__(
        self,
        family: TaskFamily,
        hidden_sizes: tuple[int, ...] = (100, 100),
        init_std: float = 1.0,
        action_scale: float | None = None,
        action_clip: float | None = None,
        trajectories: int = 20,
        inner_lr: float = 0.1,
        first_order: bool = False,
        gamma: float = 0.99,
        normalize_advantages: bool = True,
        outer: Literal["trpo", "optimizer"] = "trpo",
        max_kl: float = 0.01,
        cg_iters: int = 10,
        cg_damping: float = 1e-5,
        backtrack_ratio: float = 0.8,
        max_backtracks: int = 15,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        if family.discrete:
            raise ValueError(f"MAMLRL's policy is Gaussian: {family!r} has discrete actions; use a continuous family")
        if family.episodes != 1:
            raise ValueError(f"MAMLRL rolls out independent episodes: give the family episodes=1 (got {family!r})")
        if outer not in ("trpo", "optimizer"):
            raise ValueError(f"outer={outer!r}: choose 'trpo' (the paper) or 'optimizer'")
        if outer == "trpo" and lr_scheduler is not None:
            raise ValueError(
                "lr_scheduler schedules the outer optimizer, which TRPO does not use: remove it or set "
                "outer='optimizer'"
            )
        if action_clip is not None and action_clip <= 0:
            raise ValueError(f"action_clip={action_clip} must be positive (or None: no clipping)")
        if trajectories < 2 or inner_lr < 0 or max_kl <= 0:
            raise ValueError(
                f"need trajectories >= 2 (got {trajectories}), inner_lr >= 0 (got {inner_lr}) and max_kl > 0 "
                f"(got {max_kl})"
            )
        super().__init__(family, optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.automatic_optimization = False
        self.policy = GaussianMLPPolicy(family.obs_dim, family.num_actions, tuple(hidden_sizes), init_std)
        self.action_scale = float(getattr(family, "max_move", 1.0) if action_scale is None else action_scale)
        self.action_clip = action_clip
        self.trajectories, self.inner_lr, self.first_order = trajectories, inner_lr, first_order
        self.gamma, self.normalize_advantages, self.outer = gamma, normalize_advantages, outer
        self.max_kl, self.cg_iters, self.cg_damping = max_kl, cg_iters, cg_damping
        self.backtrack_ratio, self.max_backtracks = backtrack_ratio, max_backtracks

    # ---- rollouts ---------------------------------------------------------------------------

    def distribution(self, params: Params, obs: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-std under per-task parameters (`[tasks, ...]` each) of `obs` `[tasks, ...]`."""
        return torch.func.vmap(lambda p, o: functional_call(self.policy, p, (o,)))(params, obs)

    def action_noise(self, batch: TaskSpecBatch) -> Tensor:
        """Standard normals `[tasks, 2 (pre, post), N, H, action_dim]`, seeded per task."""
        shape = (2, self.trajectories, self.family.horizon, self.family.num_actions)
        like = {"dtype": self.policy.log_std.dtype}
        noise = [
            torch.randn(shape, generator=torch.Generator().manual_seed(seed), **like)
            for seed in task_seeds(batch.action_noise)
        ]
        return torch.stack(noise).to(self.device)

    @torch.no_grad()
    def rollout(self, params: Params, batch: TaskSpecBatch, noise: Tensor) -> Trajectories:
        """`trajectories` episodes of every task under its parameters (`[tasks, ...]`), noise `[tasks, N, H, A]`."""
        family, n, k = self.family, len(batch), self.trajectories
        tasks = {key: value.repeat_interleave(k, 0) for key, value in batch.tasks.items()}
        env_noise = {key: value.repeat_interleave(k, 0) for key, value in batch.noise.items()}
        state = family.initial_state(tasks)
        observations, actions, rewards = [], [], []
        for t in range(family.horizon):
            obs = family.observe(tasks, state).to(noise.dtype)
            mean, log_std = self.distribution(params, obs.view(n, k, -1))
            action = mean + log_std.exp() * noise[:, :, t]
            env_action = self.action_scale * action.flatten(0, 1)
            if self.action_clip is not None:
                env_action = env_action.clamp(-self.action_clip, self.action_clip)
            state, reward = family.step(tasks, state, env_action, step_noise(env_noise, 0, t))
            observations.append(obs.view(n, k, -1))
            actions.append(action)
            rewards.append(reward.to(noise.dtype).view(n, k))
        return Trajectories(torch.stack(observations, 2), torch.stack(actions, 2), torch.stack(rewards, 2))

    def with_advantages(self, data: Trajectories) -> Trajectories:
        """Discounted returns minus the per-task linear baseline, standardised per task if asked."""
        returns = discounted_returns(data.rewards, self.gamma)
        advantages = returns - linear_baseline(data.obs, returns)
        if self.normalize_advantages:
            flat = advantages.flatten(1)
            advantages = (advantages - flat.mean(1)[:, None, None]) / (flat.std(1)[:, None, None] + 1e-8)
        data.advantages = advantages
        return data

    # ---- losses -----------------------------------------------------------------------------

    def inner_loss(self, params: Params, data: Trajectories, i: int) -> Tensor:
        """Task `i`'s VPG loss −mean(log π(a|s) · A) under one task's `params`."""
        mean, log_std = functional_call(self.policy, params, (data.obs[i],))
        return -(gaussian_log_prob(mean, log_std, data.actions[i]) * data.advantages[i]).mean()

    def adapt_task(self, params: Params, pre: Trajectories, i: int, first_order: bool) -> Params:
        """Task `i`'s one VPG step from `params` on its pre-update trajectories: θ'_i."""
        return adapt(lambda p: self.inner_loss(p, pre, i), params, 1, self.inner_lr, first_order)[-1]

    def adapt_tasks(self, params: Params, pre: Trajectories, first_order: bool) -> list[Params]:
        """One VPG step per task from `params` on its pre-update trajectories: θ'_i for each task."""
        return [self.adapt_task(params, pre, i, first_order) for i in range(pre.obs.shape[0])]

    def adapt_all(self, params: Params, pre: Trajectories, first_order: bool) -> Params:
        """One VPG step per task from `params` on its pre-update trajectories: stacked θ'_i `[tasks, ...]`."""
        return stack_tasks(self.adapt_tasks(params, pre, first_order))

    def surrogate(self, adapted: Params, post: Trajectories, old: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """This rank's mean over tasks of the importance-weighted surrogate loss and of KL(old ‖ adapted)."""
        mean, log_std = self.distribution(adapted, post.obs)
        log_ratio = gaussian_log_prob(mean, log_std, post.actions) - gaussian_log_prob(*old, post.actions)
        loss = -(log_ratio.exp() * post.advantages).mean()
        kl = gaussian_kl(*old, mean, log_std).mean()
        return loss, kl

    def meta_batch(self, batch: TaskSpecBatch) -> tuple[Params, Trajectories, Trajectories, Params]:
        """Roll out, adapt (graph kept unless first order), roll out again: (θ, pre, post, θ' stacked)."""
        theta, pre, post, per_task = self.meta_batch_tasks(batch)
        return theta, pre, post, stack_tasks(per_task)

    def meta_batch_tasks(self, batch: TaskSpecBatch) -> tuple[Params, Trajectories, Trajectories, list[Params]]:
        """`meta_batch` with θ'_i kept per task (each its own graph to θ: what `kl_hvp` needs)."""
        noise = self.action_noise(batch)
        theta = named_params(self.policy)
        n = len(batch)
        shared = {name: p.detach().expand(n, *p.shape) for name, p in theta.items()}
        pre = self.with_advantages(self.rollout(shared, batch, noise[:, 0]))
        per_task = self.adapt_tasks(theta, pre, self.first_order or not self.training)
        detached = {k: v.detach() for k, v in stack_tasks(per_task).items()}
        post = self.with_advantages(self.rollout(detached, batch, noise[:, 1]))
        return theta, pre, post, per_task

    def kl_hvp(
        self, theta: Params, per_task: list[Params], post: Trajectories, old: tuple[Tensor, Tensor]
    ) -> Callable[[Tensor], Tensor]:
        """v ↦ H v, H the Hessian at θ of the mean KL(old ‖ π_θ'(θ)) over this rank's tasks (then
        averaged over ranks): TRPO's metric, taken through the inner step, computed as Σ Jᵀ F J.

        With θ'_i = θ − α∇L_i(θ), ∇²_θ KL = Σ_i J_iᵀ F_i J_i + Σ_i Σ_k (∂KL/∂θ'_ik) ∇²_θ θ'_ik, where
        J_i = ∂θ'_i/∂θ = I − α∇²L_i(θ) (symmetric) and F_i is the KL's Hessian in θ'_i. At θ the
        new policy is the old one, so ∂KL/∂θ' = 0 there and the second sum vanishes: H v =
        Σ_i J_i F_i J_i v exactly. Per product: a backward pass per task through its inner step's
        (second-order) graph for J_i v, a Fisher-vector product on the post-update data, and one
        backward through all tasks' inner steps for J_i(F_i J_i v); differentiating the KL's gradient
        through the inner step instead needs third-order derivatives of the inner loss
        (benchmarks/maml_rl_hvp_cost.py measures both; tests/test_maml_rl.py checks them equal)."""
        params, names = list(theta.values()), list(theta)
        stacked = stack_tasks(per_task)
        leaf = {name: value.detach().requires_grad_() for name, value in stacked.items()}
        mean, log_std = self.distribution(leaf, post.obs)
        kl = gaussian_kl(*old, mean, log_std).mean()
        kl_grad = torch.autograd.grad(kl, list(leaf.values()), create_graph=True)

        def hvp(v: Tensor) -> Tensor:
            pieces = split(v, params)
            jv = [
                torch.autograd.grad([a[name] for name in names], params, grad_outputs=pieces, retain_graph=True)
                for a in per_task
            ]
            u = [torch.stack([j[k] for j in jv]) for k in range(len(names))]
            fu = torch.autograd.grad(kl_grad, list(leaf.values()), grad_outputs=u, retain_graph=True)
            hv = torch.autograd.grad([stacked[name] for name in names], params, grad_outputs=fu, retain_graph=True)
            return average_over_ranks(torch.cat([h.reshape(-1) for h in hv]))

        return hvp

    def episode_returns(self, batch: TaskSpecBatch) -> Tensor:
        """Mean episode return per task before and after one inner step, `[tasks, 2]`."""
        with torch.enable_grad():
            _, pre, post, _ = self.meta_batch(batch)
        return torch.stack([pre.rewards.sum(-1).mean(1), post.rewards.sum(-1).mean(1)], 1)

    # ---- the outer step ---------------------------------------------------------------------

    def training_step(self, batch: TaskSpecBatch, batch_idx: int) -> None:
        optimizer = self.optimizers()
        theta, pre, post, per_task = self.meta_batch_tasks(batch)
        adapted = stack_tasks(per_task)
        old = tuple(t.detach() for t in self.distribution({k: v.detach() for k, v in adapted.items()}, post.obs))
        loss, _ = self.surrogate(adapted, post, old)
        params = list(theta.values())
        grads = torch.autograd.grad(loss, params, retain_graph=self.outer == "trpo")
        grad = average_over_ranks(torch.cat([g.reshape(-1) for g in grads]))
        stats: dict[str, float] = {}
        if self.outer == "trpo":
            hvp = self.kl_hvp(theta, per_task, post, old)

            def evaluate(step: Tensor) -> tuple[float, float]:
                moved = zip(theta.items(), split(step, params), strict=True)
                candidate = {n: p.detach() + s for (n, p), s in moved}
                with torch.no_grad():
                    new_loss, new_kl = self.surrogate(self.adapt_all(candidate, pre, first_order=True), post, old)
                return average_over_ranks(new_loss).item(), average_over_ranks(new_kl).item()

            old_loss = average_over_ranks(loss.detach()).item()
            step, stats = trpo_step(
                grad,
                hvp,
                evaluate,
                old_loss,
                self.max_kl,
                self.cg_iters,
                self.cg_damping,
                self.backtrack_ratio,
                self.max_backtracks,
            )
            update = -step  # SGD at lr 1 adds the step
        else:
            update = grad
        optimizer.zero_grad()
        for p, u in zip(params, split(update, params), strict=True):
            p.grad = u.view_as(p).clone()
        optimizer.step()
        if self.outer == "optimizer" and (scheduler := self.lr_schedulers()) is not None:
            scheduler.step()
        n = len(batch)
        self.log("train/return_before", pre.rewards.sum(-1).mean(), batch_size=n, sync_dist=True)
        self.log("train/return", post.rewards.sum(-1).mean(), prog_bar=True, batch_size=n, sync_dist=True)
        self.log("train/surrogate", loss.detach(), batch_size=n)
        self.log("train/std", self.policy.log_std.detach().exp().mean(), batch_size=n)
        for key, value in stats.items():
            self.log(f"train/trpo_{key}", float(value), batch_size=n)

    def configure_optimizers(self):  # noqa: ANN201 - Lightning's union of return types
        if self.outer == "trpo":
            return torch.optim.SGD(self.parameters(), lr=1.0)
        return super().configure_optimizers()


def stack_tasks(per_task: list[Params]) -> Params:
    """Per-task parameters stacked by name: `[tasks, ...]` each."""
    return {name: torch.stack([p[name] for p in per_task]) for name in per_task[0]}


def split(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    """`flat` cut into pieces shaped like `like`."""
    return [piece.view_as(p) for piece, p in zip(flat.split([p.numel() for p in like]), like, strict=True)]
