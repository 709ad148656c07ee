"""MAML-RL: the VPG inner step by hand, the second-order meta-gradient and the Hessian-vector
products through the inner step against finite differences (float64), conjugate gradient, the
TRPO step on a problem with a known answer, the linear feature baseline, the contract (finite
loss, every parameter reached, checkpoint round trip, a short fit through the real CLI), the
evaluation report, and DDP parity (2 gloo ranks × 2 tasks = 1 rank × 4 tasks)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from lightning_meta.algorithms import MAMLRL, RL2
from lightning_meta.algorithms.maml_rl import task_seeds
from lightning_meta.algorithms.policy_gradient import (
    baseline_features,
    conjugate_gradient,
    discounted_returns,
    gaussian_kl,
    gaussian_log_prob,
    linear_baseline,
    trpo_step,
)
from lightning_meta.data import RLTaskDataModule, TaskSpecStream
from lightning_meta.data.sampler import TRAIN
from lightning_meta.envs import BernoulliBandit, Navigation2D
from lightning_meta.inner_loop import named_params
from tests.helpers import assert_same_state, cli_fit_with_checkpoints

FAMILY = Navigation2D(horizon=6)
REPO = Path(__file__).resolve().parents[1]


def specs(n: int, seed: int = 0, family=FAMILY):
    return TaskSpecStream(family, seed, TRAIN)[tuple(range(n))]


def small(hidden=(8,), **kwargs) -> MAMLRL:
    torch.manual_seed(0)
    model = MAMLRL(FAMILY, hidden_sizes=hidden, trajectories=4, **kwargs).double()
    # Every episode starts at the origin, where zero-initialised biases put each hidden unit on
    # its ReLU kink: finite differences across a kink do not measure the gradient.
    for layer in model.policy.mean:
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.normal_(layer.bias, std=0.3)
    return model


def fixed_data(model: MAMLRL, tasks: int = 3):
    """Pre- and post-update trajectories and the old post-update policy, as a training step has them."""
    _, pre, post, adapted = model.meta_batch(specs(tasks))
    old = tuple(t.detach() for t in model.distribution({k: v.detach() for k, v in adapted.items()}, post.obs))
    return pre, post, old


def shifted(params, direction, eps):
    return {n: (p.detach() + eps * direction[n]).requires_grad_() for n, p in params.items()}


# ---- policy-gradient pieces --------------------------------------------------------------------


def test_gaussian_log_prob_and_kl_match_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m0, m1, a = (torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(3))
    s0, s1 = (0.3 * torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(2))
    n0, n1 = torch.distributions.Normal(m0, s0.exp()), torch.distributions.Normal(m1, s1.exp())
    torch.testing.assert_close(gaussian_log_prob(m0, s0, a), n0.log_prob(a).sum(-1))
    torch.testing.assert_close(gaussian_kl(m0, s0, m1, s1), torch.distributions.kl_divergence(n0, n1).sum(-1))


def test_discounted_returns_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 2.0]], dtype=torch.float64)
    expected = torch.tensor([[1 + 0.81 * 2, 0.9 * 2, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(discounted_returns(rewards, 0.9), expected)


def test_linear_baseline_features_and_exact_fit():
    g = torch.Generator().manual_seed(0)
    obs = torch.randn(2, 3, 7, 2, generator=g, dtype=torch.float64)
    obs[0, 0, 0, 0] = 20.0  # clipped to 10
    features = baseline_features(obs)
    t = torch.arange(7, dtype=torch.float64) / 100
    torch.testing.assert_close(
        features[1, 2, 4],
        torch.cat([obs[1, 2, 4], obs[1, 2, 4] ** 2, t[4] ** torch.arange(1.0, 4), torch.ones(1)]).double(),
    )
    assert features[0, 0, 0, 0] == 10.0 and features.shape == (2, 3, 7, 8)
    # Returns that are a linear function of the features are fitted exactly, per task.
    weights = torch.randn(2, 8, generator=g, dtype=torch.float64)
    returns = torch.einsum("tnhd,td->tnh", features, weights)
    torch.testing.assert_close(linear_baseline(obs, returns, reg=1e-12), returns, atol=1e-7, rtol=1e-7)
    # A task's fit does not see the other task's returns.
    other = returns.clone()
    other[1] += torch.randn(3, 7, generator=g, dtype=torch.float64)
    torch.testing.assert_close(linear_baseline(obs, other, reg=1e-12)[0], returns[0], atol=1e-7, rtol=1e-7)


def test_conjugate_gradient_solves_an_spd_system():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=g, dtype=torch.float64)
    a = m @ m.T + 0.5 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(conjugate_gradient(lambda v: a @ v, b, iters=6), torch.linalg.solve(a, b))
    assert (a @ conjugate_gradient(lambda v: a @ v, b, iters=2) - b).norm() > 1e-6  # fewer iterations: approximate


def test_trpo_step_on_a_quadratic_reaches_the_trust_region_boundary_and_backtracks_when_needed():
    g = torch.Generator().manual_seed(1)
    m = torch.randn(4, 4, generator=g, dtype=torch.float64)
    fisher = m @ m.T + torch.eye(4, dtype=torch.float64)
    grad = torch.randn(4, generator=g, dtype=torch.float64)
    max_kl = 0.01

    def evaluate(step, kl_scale=1.0):
        return float(grad @ step), float(kl_scale * 0.5 * step @ fisher @ step)

    step, stats = trpo_step(grad, lambda v: fisher @ v, evaluate, 0.0, max_kl, cg_iters=4, cg_damping=0.0)
    natural = torch.linalg.solve(fisher, grad)
    torch.testing.assert_close(step, -math.sqrt(2 * max_kl / float(grad @ natural)) * natural)
    assert stats["kl"] == pytest.approx(max_kl) and stats["step_fraction"] == 1.0 and stats["improvement"] > 0
    # The exact KL is 3x the quadratic model's: the line search shrinks until it fits.
    step, stats = trpo_step(
        grad, lambda v: fisher @ v, lambda s: evaluate(s, 3.0), 0.0, max_kl, cg_iters=4, cg_damping=0.0
    )
    assert stats["step_fraction"] == pytest.approx(0.8**3) and stats["kl"] <= max_kl  # 3 · 0.8^(2k) ≤ 1 from k = 3
    assert stats["loss"] < 0.0
    # No improving step within the tries: no step at all.
    step, stats = trpo_step(grad, lambda v: fisher @ v, lambda s: (1.0, 0.0), 0.0, max_kl)
    assert stats["step_fraction"] == 0.0 and step.abs().max() == 0


# ---- the inner step and the meta-gradient --------------------------------------------------------


def test_inner_step_equals_a_hand_computed_vpg_step():
    """Linear-Gaussian policy: ∇_μ log π = (a − μ)/σ², ∇_{log σ} log π = z² − 1, so the VPG step
    on −mean(log π · A) is closed form."""
    model = small(hidden=(), inner_lr=0.3)
    pre, _, _ = fixed_data(model)
    theta = named_params(model.policy)
    adapted = model.adapt_all(theta, pre, first_order=False)
    w, b, c = theta["mean.0.weight"], theta["mean.0.bias"], theta["log_std"]
    for i in range(3):
        s, a, adv = pre.obs[i], pre.actions[i], pre.advantages[i][..., None]
        mu = s @ w.T + b
        score_mu = (a - mu) / torch.exp(2 * c)
        z2 = ((a - mu) / c.exp()) ** 2
        count = adv.shape[0] * adv.shape[1]
        grad_w = -(adv * score_mu).flatten(0, 1).T @ s.flatten(0, 1) / count
        grad_b = -(adv * score_mu).mean((0, 1))
        grad_c = -(adv * (z2 - 1)).mean((0, 1))
        torch.testing.assert_close(adapted["mean.0.weight"][i], w - 0.3 * grad_w)
        torch.testing.assert_close(adapted["mean.0.bias"][i], b - 0.3 * grad_b)
        torch.testing.assert_close(adapted["log_std"][i], c - 0.3 * grad_c)


def _directional(f, params, direction, eps=1e-6):
    return (f(shifted(params, direction, eps)) - f(shifted(params, direction, -eps))) / (2 * eps)


def test_second_order_meta_gradient_equals_finite_differences():
    model = small()
    pre, post, old = fixed_data(model)
    theta = named_params(model.policy)

    def outer_loss(params, first_order=False):
        return model.surrogate(model.adapt_all(params, pre, first_order), post, old)[0]

    grads = dict(zip(theta, torch.autograd.grad(outer_loss(theta), list(theta.values())), strict=True))
    first = dict(zip(theta, torch.autograd.grad(outer_loss(theta, True), list(theta.values())), strict=True))
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        direction = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in theta.items()}
        with torch.no_grad():
            numeric = _directional(lambda p: outer_loss(p, True), theta, direction)  # values need no graph
        analytic = sum((grads[n] * direction[n]).sum() for n in theta)
        approx = sum((first[n] * direction[n]).sum() for n in theta)
        assert analytic.item() == pytest.approx(numeric.item(), rel=1e-5, abs=1e-8)
        assert abs(approx.item() - numeric.item()) > 1e-4 * abs(numeric.item())  # first order is not it


def test_kl_hessian_vector_product_through_the_inner_step_equals_finite_differences():
    model = small()
    pre, post, old = fixed_data(model)
    theta = named_params(model.policy)
    names, params = list(theta), list(theta.values())

    def kl_grad(p, create_graph=False):
        kl = model.surrogate(model.adapt_all(p, pre, False), post, old)[1]
        return torch.cat([x.reshape(-1) for x in torch.autograd.grad(kl, list(p.values()), create_graph=create_graph)])

    g = torch.Generator().manual_seed(4)
    v = torch.randn(sum(p.numel() for p in params), generator=g, dtype=torch.float64)
    hv = torch.cat([x.reshape(-1) for x in torch.autograd.grad(kl_grad(theta, True) @ v, params)])
    pieces = dict(zip(names, v.split([p.numel() for p in params]), strict=True))
    direction = {n: pieces[n].view_as(theta[n]) for n in names}
    eps = 1e-5
    numeric = (kl_grad(shifted(theta, direction, eps)) - kl_grad(shifted(theta, direction, -eps))) / (2 * eps)
    torch.testing.assert_close(hv, numeric, rtol=1e-4, atol=1e-7)
    assert hv.norm() > 1e-3


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
def test_kl_hvp_as_j_f_j_equals_the_hessian_vector_product_through_the_inner_step(first_order):
    """`MAMLRL.kl_hvp` (Σ J F J v) against differentiating the KL's gradient through the inner
    step (third order), in float64: equal, because ∂KL/∂θ' vanishes where new = old."""
    model = small(first_order=first_order)
    pre, post, old = fixed_data(model)
    theta = named_params(model.policy)
    params = list(theta.values())
    kl = model.surrogate(model.adapt_all(theta, pre, first_order), post, old)[1]
    kl_grad = torch.cat([x.reshape(-1) for x in torch.autograd.grad(kl, params, create_graph=True)])
    hvp = model.kl_hvp(theta, model.adapt_tasks(theta, pre, first_order), post, old)
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        v = torch.randn(kl_grad.numel(), generator=g, dtype=torch.float64)
        reference = torch.cat([x.reshape(-1) for x in torch.autograd.grad(kl_grad @ v, params, retain_graph=True)])
        torch.testing.assert_close(hvp(v), reference, rtol=1e-9, atol=1e-12)
        assert reference.norm() > 1e-3
    if not first_order:  # the inner step's curvature is in it: the Fisher at θ' alone differs
        leaf = {n: t.detach().requires_grad_() for n, t in model.adapt_all(theta, pre, False).items()}
        kl_at = model.surrogate(leaf, post, old)[1]
        fisher_grad = torch.autograd.grad(kl_at, list(leaf.values()), create_graph=True)
        v = torch.randn(kl_grad.numel(), generator=g, dtype=torch.float64)
        # F v summed over tasks (each task's block of the stacked θ' gets the same v).
        fv = torch.autograd.grad(
            fisher_grad,
            list(leaf.values()),
            grad_outputs=[
                x.view(1, *p.shape).expand_as(leaf[n])
                for n, p, x in zip(theta, params, split_like(v, params), strict=True)
            ],
        )
        fv = torch.cat([x.sum(0).reshape(-1) for x in fv])
        assert (hvp(v) - fv).norm() > 1e-3 * fv.norm()


def split_like(flat, like):
    return [piece.view_as(p) for piece, p in zip(flat.split([p.numel() for p in like]), like, strict=True)]


# ---- rollouts, noise, contract ----------------------------------------------------------------


def test_action_noise_depends_only_on_the_task_spec():
    model = small()
    all4, last2 = specs(4), TaskSpecStream(FAMILY, 0, TRAIN)[(2, 3)]
    torch.testing.assert_close(model.action_noise(all4)[2:], model.action_noise(last2), rtol=0, atol=0)
    assert task_seeds(all4.action_noise.double()) == task_seeds(all4.action_noise)
    assert len(set(task_seeds(all4.action_noise))) == 4


def test_rollout_follows_the_family_dynamics():
    model = small()
    batch = specs(2)
    noise = model.action_noise(batch)[:, 0]
    shared = {n: p.detach().expand(2, *p.shape) for n, p in named_params(model.policy).items()}
    data = model.rollout(shared, batch, noise)
    moves = (model.action_scale * data.actions).clamp(-0.1, 0.1)
    positions = moves.cumsum(2)
    torch.testing.assert_close(data.obs[:, :, 1:], positions[:, :, :-1].to(data.obs.dtype))
    goal = batch.tasks["goal"].double()[:, None, None]
    torch.testing.assert_close(data.rewards, -(positions - goal).norm(dim=-1))


def test_action_clip_clips_what_the_environment_gets_not_the_log_probability():
    family = Navigation2D(horizon=6, max_move=10.0)  # the family's own clip far outside the actions
    torch.manual_seed(0)
    model = MAMLRL(family, hidden_sizes=(8,), trajectories=4, action_scale=1.0, action_clip=0.05).double()
    batch = specs(2, family=family)
    shared = {n: p.detach().expand(2, *p.shape) for n, p in named_params(model.policy).items()}
    data = model.rollout(shared, batch, model.action_noise(batch)[:, 0])
    assert data.actions.abs().max() > 0.5  # std 1: the sampled actions are kept unclipped
    positions = data.actions.clamp(-0.05, 0.05).cumsum(2)
    torch.testing.assert_close(data.obs[:, :, 1:], positions[:, :, :-1].to(data.obs.dtype))
    with pytest.raises(ValueError, match="action_clip"):
        MAMLRL(FAMILY, action_clip=0.0)


def test_the_loss_is_finite_and_reaches_every_parameter():
    model = small()
    theta, _, post, adapted = model.meta_batch(specs(3))
    old = tuple(t.detach() for t in model.distribution({k: v.detach() for k, v in adapted.items()}, post.obs))
    loss, kl = model.surrogate(adapted, post, old)
    assert torch.isfinite(loss) and kl.item() == pytest.approx(0.0, abs=1e-12)
    for name, grad in zip(theta, torch.autograd.grad(loss, list(theta.values())), strict=True):
        assert grad.abs().sum() > 0, name


def test_bad_arguments_are_refused_naming_the_fix():
    with pytest.raises(ValueError, match="discrete actions"):
        MAMLRL(BernoulliBandit(3, 4))
    with pytest.raises(ValueError, match="episodes=1"):
        MAMLRL(Navigation2D(horizon=5, episodes=2))
    with pytest.raises(ValueError, match="outer='optimizer'"):
        MAMLRL(FAMILY, lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, 1))
    with pytest.raises(ValueError, match="choose 'trpo'"):
        MAMLRL(FAMILY, outer="sgd")
    model = small()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode=False"):
        model.validation_step(specs(2), 0)


def test_evaluation_reports_the_post_update_episode_as_return_and_rl2_the_trial():
    batch = specs(3)
    model = small().eval()
    model.validation_step(batch, 0)  # adapts by a gradient step with autograd on
    stats = model._eval_outputs.pop()
    episodes = model.episode_returns(batch)
    torch.testing.assert_close(stats["return_before"], episodes[:, 0].float())
    torch.testing.assert_close(stats["return"], episodes[:, 1].float())
    assert set(stats) >= {"baseline/stand_still", "baseline/oracle"}
    assert not model.policy.log_std.requires_grad or model.policy.log_std.grad is None  # evaluation wrote no grads
    bandit = BernoulliBandit(3, 5)
    rl2 = RL2(bandit, hidden_size=8)
    rl2.validation_step(specs(4, family=bandit), 0)
    rl2_stats = rl2._eval_outputs.pop()
    assert not torch.equal(rl2_stats["return"], rl2_stats["return_before"])  # the trial, not one pull
    torch.testing.assert_close(rl2_stats["return_before"], rl2_stats["return_first"])


def test_one_trpo_iteration_keeps_the_kl_bound_and_improves_the_surrogate(tmp_path):
    family = Navigation2D(horizon=6)
    pl.seed_everything(0)
    model = MAMLRL(family, hidden_sizes=(16,), trajectories=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = RLTaskDataModule(family, tasks_per_batch=4, val_tasks=4, test_tasks=4)
    trainer = pl.Trainer(
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, data)
    metrics = trainer.callback_metrics
    assert 0 < metrics["train/trpo_kl"] <= model.max_kl and metrics["train/trpo_improvement"] > 0
    assert model.global_step == 1
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def _cli_fit(tmp_path: Path, max_steps: int, *extra: str):
    return cli_fit_with_checkpoints(
        "nav2d/maml_rl.yaml",
        tmp_path,
        max_steps,
        2,
        "--trainer.val_check_interval=2",
        "--model.init_args.hidden_sizes=[16]",
        "--model.init_args.trajectories=3",
        "--model.init_args.family.init_args.horizon=5",
        "--data.init_args.family.init_args.horizon=5",
        "--data.init_args.tasks_per_batch=3",
        "--data.init_args.val_tasks=3",
        "--data.init_args.batches_per_epoch=4",
        *extra,
    )


@pytest.mark.filterwarnings("ignore:Using ModelCheckpoint with manual optimization")
@pytest.mark.parametrize("outer", ["trpo", "optimizer"])
def test_a_short_fit_through_the_cli_and_a_checkpoint_round_trip(tmp_path, outer):
    cli = _cli_fit(tmp_path, 2, f"--model.init_args.outer={outer}")
    model = cli.model
    assert model.global_step == 2 and model.outer == outer
    metrics = cli.trainer.callback_metrics
    for key in ("val/return", "val/return_before", "val/baseline/oracle", "train/return"):
        assert torch.isfinite(metrics[key]), key
    loaded = MAMLRL.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert loaded.family == Navigation2D(horizon=5) and loaded.outer == outer and loaded.trajectories == 3
    assert_same_state(model, loaded)


# ---- DDP -------------------------------------------------------------------------------------------


@pytest.mark.distributed
@pytest.mark.parametrize("ddp_case", ["maml-rl"])
def test_ddp_trpo_step_equals_one_process_on_the_union_of_tasks(ddp_case, ddp_run):
    """2 gloo processes × 2 tasks: the outer gradient, every Hessian-vector product of conjugate
    gradient and the line search are averaged over ranks, so the TRPO step (float64) is one
    process's on the 4 tasks. (CG amplifies the last bits of the two summation orders: 1e-8.)"""
    single, half, ddp = ddp_run
    assert single["grads"].keys() == ddp["grads"].keys() and single["grads"]
    for name, step in single["grads"].items():
        assert step.dtype == torch.float64
        torch.testing.assert_close(ddp["grads"][name], step, rtol=1e-7, atol=1e-9, msg=name)
        torch.testing.assert_close(ddp["params"][name], single["params"][name], rtol=1e-7, atol=1e-9, msg=name)
    assert max((half["grads"][n] - g).abs().max() for n, g in single["grads"].items()) > 1e-4  # not vacuous
    for key in ("val/return", "val/return_before", "val/return_ci95", "val/baseline/oracle"):
        assert abs(ddp["val"][key] - single["val"][key]) < 1e-5, key
    assert ddp["val"]["val/tasks"] == single["val"]["val/tasks"] == 5
