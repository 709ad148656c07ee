"""Policy-gradient pieces of MAML-RL, in pure torch: Gaussian policy math, discounted returns,
the linear feature baseline, conjugate gradient and the TRPO step with its line search.

Kept apart from the LightningModule (`maml_rl.py`) so that each piece is tested alone on a
problem whose answer is known (tests/test_maml_rl.py), and so that nothing here knows about
ranks: the TRPO step takes the gradient, the Hessian-vector product and the line-search
evaluation as already averaged over whatever processes the caller runs.

- Linear feature baseline: rllab's `LinearFeatureBaseline` (Duan et al. 2016, "Benchmarking Deep
  RL"), which MAML's code uses: per task, ridge least squares of the discounted returns on the
  features (obs, obs², t, t², t³, 1), t = step / 100, observations clipped to ±10.
- TRPO (Schulman et al. 2015): the natural-gradient direction by conjugate gradient on
  Hessian-vector products of the mean KL, scaled so that the quadratic model of the KL equals
  `max_kl`, then a backtracking line search that accepts the first fraction of the step that
  lowers the surrogate loss and keeps the exact KL within `max_kl` (rllab's
  `ConjugateGradientOptimizer` settings: damping 1e-5, backtrack ratio 0.8, 15 tries).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

LOG_2PI = math.log(2 * math.pi)


def gaussian_log_prob(mean: Tensor, log_std: Tensor, actions: Tensor) -> Tensor:
    """log N(actions; mean, diag(exp(log_std))²), summed over the last (action) dimension."""
    z = (actions - mean) * torch.exp(-log_std)
    return (-0.5 * z**2 - log_std - 0.5 * LOG_2PI).sum(-1)


def gaussian_kl(mean0: Tensor, log_std0: Tensor, mean1: Tensor, log_std1: Tensor) -> Tensor:
    """KL(N0 ‖ N1) of diagonal Gaussians, summed over the last dimension."""
    var0, var1 = torch.exp(2 * log_std0), torch.exp(2 * log_std1)
    return (log_std1 - log_std0 + (var0 + (mean0 - mean1) ** 2) / (2 * var1) - 0.5).sum(-1)


def discounted_returns(rewards: Tensor, gamma: float) -> Tensor:
    """Σ_{t' ≥ t} γ^{t'-t} r_{t'} along the last (time) dimension."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in reversed(range(rewards.shape[-1])):
        running = rewards[..., t] + gamma * running
        returns[..., t] = running
    return returns


def baseline_features(obs: Tensor) -> Tensor:
    """rllab's linear-baseline features of trajectories `[..., H, obs_dim]`: `[..., H, 2·obs_dim + 4]`."""
    o = obs.clamp(-10, 10)
    t = torch.arange(obs.shape[-2], dtype=obs.dtype, device=obs.device) / 100.0
    t = t[:, None].expand(*obs.shape[:-1], 1)
    return torch.cat([o, o**2, t, t**2, t**3, torch.ones_like(t)], -1)


def linear_baseline(obs: Tensor, returns: Tensor, reg: float = 1e-5) -> Tensor:
    """Fit the linear feature baseline per task and return its values at the same steps.

    Args:
        obs: observations `[tasks, trajectories, H, obs_dim]`.
        returns: discounted returns `[tasks, trajectories, H]` (the regression targets).
        reg: ridge coefficient; multiplied by 10 (up to 5 times) while the system is singular or
            the solution is not finite, as rllab does.

    Returns:
        The fitted values `[tasks, trajectories, H]`, without a graph to anything.
    """
    obs, returns = obs.detach(), returns.detach()
    features = baseline_features(obs).flatten(1, 2)  # [tasks, samples, d]
    targets = returns.flatten(1, 2)[..., None]
    coeffs = _ridge(features, targets, reg)
    if coeffs is None and features.dtype != torch.float64:
        # A singular float32 system (observation entries that are constant or duplicated, e.g.
        # Meta-World's zero padding and its previous frame at a reset: next to Gram entries of
        # ~1e7, float32 loses the ridge term), solved again in float64 as rllab (numpy) did.
        coeffs = _ridge(features.double(), targets.double(), reg)
        coeffs = None if coeffs is None else coeffs.to(features.dtype)
    if coeffs is None:
        raise RuntimeError("the linear feature baseline's system stayed singular with the ridge term raised to 1e4·reg")
    return (features @ coeffs).squeeze(-1).view_as(returns)


def _ridge(features: Tensor, targets: Tensor, reg: float) -> Tensor | None:
    """Ridge coefficients per task, the ridge term ×10 (up to 5 times) while the system is singular
    or the solution not finite (rllab); None if it never solved."""
    gram = features.transpose(1, 2) @ features
    rhs = features.transpose(1, 2) @ targets
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    for _ in range(5):
        coeffs, info = torch.linalg.solve_ex(gram + reg * eye, rhs)
        if (info == 0).all() and torch.isfinite(coeffs).all():
            return coeffs
        reg *= 10
    return None


def conjugate_gradient(matvec: Callable[[Tensor], Tensor], b: Tensor, iters: int = 10, tol: float = 1e-10) -> Tensor:
    """Approximately solve A x = b for a symmetric positive definite A given as `matvec`."""
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rr = r @ r
    for _ in range(iters):
        if rr < tol:
            break
        ap = matvec(p)
        alpha = rr / (p @ ap)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def trpo_step(
    grad: Tensor,
    hvp: Callable[[Tensor], Tensor],
    evaluate: Callable[[Tensor], tuple[float, float]],
    old_loss: float,
    max_kl: float,
    cg_iters: int = 10,
    cg_damping: float = 1e-5,
    backtrack_ratio: float = 0.8,
    max_backtracks: int = 15,
) -> tuple[Tensor, dict[str, float]]:
    """One TRPO step on flat parameters.

    Args:
        grad: ∇ of the surrogate loss (to minimise) at the current parameters, flat.
        hvp: v ↦ H v, H the Hessian of the mean KL(old ‖ new) at the current parameters.
        evaluate: step ↦ (surrogate loss, mean KL) at the current parameters + step.
        old_loss: the surrogate loss at the current parameters.
        max_kl: the trust region δ.
        cg_iters: conjugate-gradient iterations.
        cg_damping: λ added to H (H + λI) for conjugate gradient's stability.
        backtrack_ratio: the line search's shrink factor per try.
        max_backtracks: tries before giving up (the step is then zero).

    Returns:
        The accepted step (zeros if no try was accepted) and statistics: `kl` and `loss` at the
        accepted step, `step_fraction` (0 if rejected), `improvement` (old − new loss).
    """

    def damped(v: Tensor) -> Tensor:
        return hvp(v) + cg_damping * v

    direction = conjugate_gradient(damped, -grad, cg_iters)
    shs = 0.5 * (direction @ damped(direction))
    if not torch.isfinite(shs) or shs <= 0:
        return torch.zeros_like(grad), {"kl": 0.0, "loss": old_loss, "step_fraction": 0.0, "improvement": 0.0}
    full_step = direction * torch.sqrt(max_kl / shs)  # ½ sᵀ H s = max_kl
    fraction = 1.0
    for _ in range(max_backtracks):
        step = fraction * full_step
        loss, kl = evaluate(step)
        if loss < old_loss and kl <= max_kl:
            return step, {"kl": kl, "loss": loss, "step_fraction": fraction, "improvement": old_loss - loss}
        fraction *= backtrack_ratio
    return torch.zeros_like(grad), {"kl": 0.0, "loss": old_loss, "step_fraction": 0.0, "improvement": 0.0}
