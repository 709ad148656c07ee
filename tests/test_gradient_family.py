"""Meta-SGD, ANIL, MAML++ and Reptile: each one's defining property, checked against hand
computation or a reference built from the shared inner loop, in float64 where it is math."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_meta.algorithms import ANIL, MAML, MAMLPlusPlus, MetaSGD, Reptile, supervised_loss
from lightning_meta.algorithms.mamlpp import multi_step_loss_weights
from lightning_meta.algorithms.metasgd import rate_key
from lightning_meta.data import SinusoidDataModule
from lightning_meta.inner_loop import adapt, forward, named_params
from lightning_meta.models import MLP, Conv4
from lightning_meta.task import TaskBatch
from tests.helpers import SyntheticClassesDataModule


def sine_batch(tasks: int = 3, shots: int = 5, data: SinusoidDataModule | None = None) -> TaskBatch:
    """The first training batch of `data` (default: a small sinusoid DataModule), in the default dtype."""
    data = data or SinusoidDataModule(shots=shots, query_shots=shots, tasks_per_batch=tasks)
    batch = next(iter(data.train_dataloader()))
    return TaskBatch(**{k: v.to(torch.get_default_dtype()) for k, v in vars(batch).items()})


def conv_batch(tasks: int = 2) -> TaskBatch:
    return next(iter(SyntheticClassesDataModule(tasks_per_batch=tasks, image_size=16).train_dataloader()))


def at_epoch(model: pl.LightningModule, epoch: int) -> pl.LightningModule:
    """Attach `model` to an idle Trainer that says it is at `epoch` (as `fit` would)."""
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit_loop.epoch_progress.current.completed = epoch
    model.trainer = trainer
    assert model.current_epoch == epoch
    return model


def gradients(model: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# Meta-SGD


def test_meta_sgd_rate_gradient_is_minus_support_gradient_times_query_gradient(float64):
    torch.manual_seed(0)
    model = MetaSGD(MLP(hidden_sizes=[8, 8]), inner_lr_init=(0.005, 0.1))
    task = sine_batch(tasks=1)[0]
    loss = model.task_loss(task).loss
    grads = gradients(model, loss)
    # θ1 = θ0 − α ⊙ g0, with g0 independent of α, so ∂L_query(θ1)/∂α = −g0 ⊙ ∇L_query(θ1).
    theta0 = {n: p.detach().requires_grad_() for n, p in named_params(model.backbone).items()}
    names = list(theta0)
    support = supervised_loss(forward(model.backbone, theta0, task.support_x), task.support_y)
    g0 = dict(zip(names, torch.autograd.grad(support, list(theta0.values())), strict=True))
    theta1 = {n: (theta0[n] - model.inner_lrs[rate_key(n)].detach() * g0[n]).detach().requires_grad_() for n in names}
    query = supervised_loss(forward(model.backbone, theta1, task.query_x), task.query_y)
    g1 = dict(zip(names, torch.autograd.grad(query, list(theta1.values())), strict=True))
    for n in names:
        torch.testing.assert_close(grads[f"update_rule.rates.{rate_key(n)}"], -g0[n] * g1[n], rtol=1e-10, atol=1e-12)


def test_meta_sgd_rates_are_per_entry_and_change_after_an_optimizer_step():
    torch.manual_seed(0)
    # No BatchNorm: a conv bias before it has a zero gradient, so its rates would never move.
    model = MetaSGD(Conv4(hidden_channels=4, out_features=3, norm="none"), inner_steps=2)
    for name, param in named_params(model.backbone).items():
        rate = model.inner_lrs[rate_key(name)]
        assert rate.shape == param.shape and rate.min() >= 0.005 and rate.max() <= 0.1
    before = {n: p.detach().clone() for n, p in model.inner_lrs.items()}
    optimizer = model.configure_optimizers()
    assert any(p is model.inner_lrs["head-weight"] for g in optimizer.param_groups for p in g["params"])
    loss, _ = model.meta_loss(conv_batch())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.inner_lrs.values())
    optimizer.step()
    for name, rate in model.inner_lrs.items():
        assert not torch.equal(rate.detach(), before[name]), name


# ANIL


def test_anil_default_head_is_the_last_linear_layer():
    assert ANIL(Conv4(hidden_channels=4, out_features=3)).head == "head"
    assert ANIL(MLP(hidden_sizes=[8, 8])).head == "net.4"
    with pytest.raises(AttributeError, match="nope"):
        ANIL(MLP(), head="nope")


def test_anil_inner_loop_changes_head_parameters_only_and_body_gets_meta_gradients():
    torch.manual_seed(0)
    model = ANIL(Conv4(hidden_channels=4, out_features=3), inner_lr=0.4, inner_steps=2)
    task = conv_batch()[0]
    theta0 = named_params(model.backbone)
    trajectory = model.adapt(task, 3)
    assert len(trajectory) == 4
    for params in trajectory[1:]:
        assert params.keys() == theta0.keys()
        for name, value in params.items():
            if name.startswith("head."):
                assert not torch.equal(value, theta0[name]), name
            else:
                assert value is theta0[name], name
    grads = gradients(model, model.task_loss(task).loss)
    body = [n for n in grads if not n.startswith("backbone.head.")]
    assert len(body) == len(theta0) - 2 and all(grads[n].abs().sum() > 0 for n in body)


def test_anil_computes_body_features_once_per_set_and_equals_head_only_maml(float64):
    torch.manual_seed(0)
    model = ANIL(MLP(hidden_sizes=[8, 8]), inner_lr=0.1, inner_steps=3)
    task = sine_batch(tasks=1)[0]
    calls = []
    hook = model.backbone.net[0].register_forward_hook(lambda *_: calls.append(1))
    loss = model.task_loss(task).loss
    hook.remove()
    assert len(calls) == 2  # support and query once each, not once per inner step
    got = gradients(model, loss)
    # Reference: the shared inner loop over the head entries, the body run at every step.
    theta0 = named_params(model.backbone)
    head = {n: p for n, p in theta0.items() if n.startswith("net.4.")}

    def support_loss(params):
        return supervised_loss(forward(model.backbone, {**theta0, **params}, task.support_x), task.support_y)

    adapted = adapt(support_loss, head, 3, 0.1)[-1]
    expected_loss = supervised_loss(forward(model.backbone, {**theta0, **adapted}, task.query_x), task.query_y)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=1e-12)
    expected = gradients(model, expected_loss)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-12, msg=name)


# MAML++


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_mamlpp_multi_step_loss_weights_sum_to_one_and_anneal_to_the_last_step(steps):
    anneal = 10
    history = [multi_step_loss_weights(steps, epoch, anneal) for epoch in range(15)]
    for weights in history:
        assert weights.shape == (steps,) and (weights >= 0).all()
        assert weights.sum().item() == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(history[0], torch.full((steps,), 1.0 / steps, dtype=torch.float64))
    lasts = [w[-1].item() for w in history]
    assert lasts == sorted(lasts) and lasts[-1] == 1.0
    if steps > 1:
        assert lasts[1] > lasts[0] and lasts[anneal - 1] < 1.0
        assert all(w[:-1].max() >= 0.03 / steps - 1e-15 for w in history[:anneal])  # the floor
        assert all(w[:-1].max() == 0 for w in history[anneal:])


def test_mamlpp_order_switches_at_the_configured_epoch(float64):
    torch.manual_seed(0)
    batch = sine_batch()
    # One inner step, no BatchNorm: MAML++ is MAML with a learned (here initial) rate, so its
    # backbone gradient is FOMAML's before `first_order_epochs` and MAML's from then on.
    model = MAMLPlusPlus(
        MLP(hidden_sizes=[8, 8]), inner_lr=0.05, inner_steps=1, first_order_epochs=2, per_step_bn=False
    )
    references = {}
    for first_order in (True, False):
        reference = MAML(MLP(hidden_sizes=[8, 8]), inner_lr=0.05, first_order=first_order)
        reference.backbone.load_state_dict(model.backbone.state_dict())
        references[first_order] = gradients(reference, reference.meta_loss(batch)[0])
    for epoch, first_order in [(0, True), (1, True), (2, False), (5, False)]:
        at_epoch(model, epoch)
        assert model.first_order_now() is first_order
        grads = gradients(model, model.meta_loss(batch)[0])
        for name, expected in references[first_order].items():
            torch.testing.assert_close(grads[name], expected, rtol=1e-10, atol=1e-12, msg=f"epoch {epoch} {name}")
    assert max((references[True][n] - references[False][n]).abs().max() for n in references[True]) > 1e-6
    model.eval()
    assert model.first_order_now()  # evaluation never needs the second-order graph


def test_mamlpp_learns_per_step_rates_and_per_step_batchnorm_weights():
    torch.manual_seed(0)
    model = MAMLPlusPlus(Conv4(hidden_channels=4, out_features=3), inner_steps=3, multi_step_loss_epochs=0)
    bn = [n for n, m in model.backbone.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert model.bn_names == [f"{m}.{p}" for m in bn for p in ("weight", "bias")]
    assert set(model.inner_lrs) == {rate_key(n) for n in named_params(model.backbone) if n not in model.bn_names}
    assert all(rates.shape == (3,) for rates in model.inner_lrs.values())
    assert all(copies.shape == (2, 4) for copies in model.bn_per_step.values())
    # Distinct copies, so swapping them in is visible: the trajectory carries step k's weights.
    with torch.no_grad():
        for i, copies in enumerate(model.bn_per_step.values()):
            copies.add_(torch.arange(1, 3).unsqueeze(1) * (i + 1))
    task = conv_batch()[0]
    trajectory = model.adapt(task, 5)
    name = model.bn_names[0]
    own, copies = named_params(model.backbone)[name], model.bn_per_step[rate_key(name)]
    for k, expected in enumerate([own, own, copies[0], copies[1], copies[1], copies[1]]):
        torch.testing.assert_close(trajectory[k][name], expected, msg=f"step {k}")


# Valid schedules (first order never outlasts the multi-step loss) and the epochs that sample
# each of their phases: (multi_step_loss_epochs, first_order_epochs, epoch, phase).
MAMLPP_PHASES = [
    (2, 2, 0, "multi-step loss, first order"),
    (2, 2, 2, "last step only, second order"),
    (2, 1, 1, "multi-step loss, second order"),
    (2, 0, 0, "multi-step loss, second order from the start"),
    (0, 0, 0, "last step only, second order throughout"),
]


@pytest.mark.parametrize(("msl_epochs", "first_order_epochs", "epoch", "phase"), MAMLPP_PHASES, ids=lambda v: str(v))
def test_mamlpp_every_per_step_batchnorm_weight_gets_a_gradient_in_every_phase(
    msl_epochs, first_order_epochs, epoch, phase
):
    torch.manual_seed(0)
    model = MAMLPlusPlus(
        Conv4(hidden_channels=4, out_features=3),
        inner_steps=3,
        multi_step_loss_epochs=msl_epochs,
        first_order_epochs=first_order_epochs,
    )
    at_epoch(model, epoch)
    assert model.first_order_now() == phase.endswith("first order")
    weights = multi_step_loss_weights(3, epoch, msl_epochs)
    assert (weights[:-1] > 0).all() == phase.startswith("multi-step"), weights
    grads = gradients(model, model.meta_loss(conv_batch())[0])
    assert set(grads) == {n for n, p in model.named_parameters() if p.requires_grad}
    for n in model.bn_names:  # step 0: the backbone's own weights; steps 1, 2: the copies
        assert grads[f"backbone.{n}"].abs().min() > 0, f"{phase}: step 0 {n}"
        for step, copy in enumerate(grads[f"bn_per_step.{rate_key(n)}"], start=1):
            assert copy.abs().min() > 0, f"{phase}: step {step} {n}"
    for n, g in grads.items():
        if n.startswith("update_rule.rates."):
            assert g.abs().min() > 0, f"{phase}: {n}"


@pytest.mark.parametrize("per_step_bn", [True, False])
def test_mamlpp_refuses_first_order_beyond_the_multi_step_loss_with_per_step_batchnorm(per_step_bn):
    # The old Omniglot configs' schedule: the loss scores the last step alone from epoch 10,
    # first order until epoch 50, so steps 0-3's BatchNorm weights got zero gradient for 40 epochs.
    def build():
        return MAMLPlusPlus(
            Conv4(hidden_channels=4, out_features=5),
            inner_steps=5,
            multi_step_loss_epochs=10,
            first_order_epochs=50,
            per_step_bn=per_step_bn,
        )

    if not per_step_bn:  # every BatchNorm weight is adapted, so reaches the last step: allowed
        build()
        return
    with pytest.raises(ValueError) as refused:
        build()
    message = str(refused.value)
    for key in ("model.init_args.first_order_epochs=50", "model.init_args.multi_step_loss_epochs=10"):
        assert key in message
    assert "per_step_bn" in message and "steps 0..3" in message and "at most 10" in message
    # The boundary is allowed: first order ends when the multi-step loss does.
    MAMLPlusPlus(Conv4(hidden_channels=4, out_features=5), inner_steps=5, first_order_epochs=10)


def test_mamlpp_skipping_zero_weight_query_losses_keeps_the_meta_gradient(float64):
    # From `multi_step_loss_epochs` on only the last step's query loss has weight: the ones of
    # weight 0 are not computed. The meta-gradient must be the one of the full weighted sum.
    torch.manual_seed(0)
    model = MAMLPlusPlus(Conv4(hidden_channels=4, out_features=3), inner_steps=3, multi_step_loss_epochs=2)
    batch = TaskBatch(**{k: v.double() if v.is_floating_point() else v for k, v in vars(conv_batch()).items()})
    for epoch in (1, 2):  # multi-step (every weight > 0), then last step only
        at_epoch(model, epoch)
        weights = multi_step_loss_weights(3, epoch, 2)
        got = gradients(model, model.meta_loss(batch)[0])
        reference = 0.0
        for task in batch:
            trajectory = model.adapt(task, 3)
            reference = reference + sum(
                w * supervised_loss(forward(model.backbone, trajectory[k + 1], task.query_x), task.query_y)
                for k, w in enumerate(weights.tolist())
            )
        expected = gradients(model, reference / len(batch))
        assert set(got) == set(expected)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-13, msg=f"epoch {epoch} {name}")


def test_mamlpp_refuses_per_step_batchnorm_without_batchnorm():
    with pytest.raises(ValueError, match="per_step_bn=True but MLP has no BatchNorm"):
        MAMLPlusPlus(MLP())


# Reptile


def linear_sgd_steps(w, b, x, y, steps, lr):
    """k full-batch SGD steps on mean squared error for y ≈ x wᵀ + b, by hand."""
    for _ in range(steps):
        residual = x @ w.T + b - y
        scale = 2.0 / residual.numel()
        w, b = w - lr * scale * residual.T @ x, b - lr * scale * residual.sum(0)
    return w, b


def test_reptile_outer_step_is_the_hand_computed_interpolation(float64):
    torch.manual_seed(0)
    epsilon, inner_lr, steps = 0.7, 0.05, 3
    model = Reptile(
        nn.Linear(1, 1),
        inner_lr=inner_lr,
        inner_steps=steps,
        inner_optimizer="sgd",
        optimizer=lambda params: torch.optim.SGD(params, lr=epsilon),
    )
    data = SinusoidDataModule(shots=4, query_shots=6, tasks_per_batch=3)
    batch = sine_batch(data=data)  # the batch the Trainer's one step will see
    w, b = model.backbone.weight.detach().clone(), model.backbone.bias.detach().clone()
    adapted, query_losses = [], []
    for task in batch:
        x, y = torch.cat([task.support_x, task.query_x]), torch.cat([task.support_y, task.query_y])
        w_task, b_task = linear_sgd_steps(w, b, x, y, steps, inner_lr)
        adapted.append((w_task, b_task))
        query_losses.append(((task.query_x @ w_task.T + b_task - task.query_y) ** 2).mean())
    mean_w = torch.stack([a[0] for a in adapted]).mean(0)
    mean_b = torch.stack([a[1] for a in adapted]).mean(0)
    # The logged meta-loss is the query loss after adaptation; its gradient is θ − mean θ̃.
    loss, _ = model.meta_loss(batch)
    torch.testing.assert_close(loss, torch.stack(query_losses).mean(), rtol=1e-12, atol=1e-12)
    trainer = pl.Trainer(
        max_steps=1,
        precision="64-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        inference_mode=False,
    )
    trainer.fit(model, datamodule=data)
    torch.testing.assert_close(model.backbone.weight.detach(), w + epsilon * (mean_w - w), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.backbone.bias.detach(), b + epsilon * (mean_b - b), rtol=1e-12, atol=1e-12)
    assert (mean_w - w).abs().max() > 1e-3  # the step is not vacuous


def test_reptile_inner_adam_has_no_momentum_and_evaluation_adapts_on_the_support_set_only(float64):
    torch.manual_seed(0)
    model = Reptile(nn.Linear(1, 1), inner_lr=0.1, inner_steps=2, eval_inner_steps=3, inner_optimizer="adam")
    task = sine_batch(tasks=1)[0]
    model.eval()
    trajectory = model.adapt(task, 3)
    w, b = model.backbone.weight.detach().clone(), model.backbone.bias.detach().clone()
    v_w, v_b, beta2, eps = torch.zeros_like(w), torch.zeros_like(b), 0.999, 1e-8
    for t in range(1, 4):
        residual = task.support_x @ w.T + b - task.support_y
        g_w, g_b = 2.0 / residual.numel() * residual.T @ task.support_x, 2.0 / residual.numel() * residual.sum(0)
        v_w, v_b = beta2 * v_w + (1 - beta2) * g_w**2, beta2 * v_b + (1 - beta2) * g_b**2
        correction = 1 - beta2**t
        w = w - 0.1 * g_w / ((v_w / correction).sqrt() + eps)
        b = b - 0.1 * g_b / ((v_b / correction).sqrt() + eps)
        torch.testing.assert_close(trajectory[t]["weight"], w, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(trajectory[t]["bias"], b, rtol=1e-12, atol=1e-12)
    out = model.task_loss(task)
    expected = supervised_loss(forward(model.backbone, trajectory[-1], task.query_x), task.query_y)
    torch.testing.assert_close(out.loss, expected)
    assert out.loss_before is not None and out.loss < out.loss_before
    # And the module's own parameters are untouched by adaptation.
    torch.testing.assert_close(model.backbone.weight.detach(), trajectory[0]["weight"], rtol=0, atol=0)


def test_reptile_keeps_no_graph_through_the_inner_loop():
    model = Reptile(MLP(hidden_sizes=[8, 8]), inner_steps=3)
    task = sine_batch(tasks=1)[0]
    assert all(p.grad_fn is None and not p.requires_grad for p in model.adapt(task, 2)[-1].values())
    assert model.task_loss(task).loss.grad_fn is not None  # the surrogate's, to θ only


# The task-parallel (vmapped) path


def family_meta_gradient(model, batch: TaskBatch, batching: str, chunk: int | None):
    model.zero_grad()
    model.task_batching, model.task_chunk_size = batching, chunk
    objective = model.training_step(batch, 0)
    objective.backward()
    return objective.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


VMAP_SETUPS = {
    "MetaSGD-mlp": lambda: (MetaSGD(MLP(hidden_sizes=[8, 8]), inner_steps=2), sine_batch(tasks=4)),
    "MetaSGD-plain-batchnorm": lambda: (MetaSGD(Conv4(hidden_channels=4, out_features=3, norm="plain_batch")), None),
    "ANIL-mlp": lambda: (ANIL(MLP(hidden_sizes=[8, 8]), inner_lr=0.1, inner_steps=2), sine_batch(tasks=4)),
    "ANIL-plain-batchnorm": lambda: (ANIL(Conv4(hidden_channels=4, out_features=3, norm="plain_batch")), None),
    "MAMLPlusPlus-mlp-first-order": lambda: (
        MAMLPlusPlus(MLP(hidden_sizes=[8, 8]), inner_lr=0.05, inner_steps=3, first_order_epochs=10, per_step_bn=False),
        sine_batch(tasks=4),
    ),
    "MAMLPlusPlus-plain-batchnorm-second-order": lambda: (
        MAMLPlusPlus(
            Conv4(hidden_channels=4, out_features=3, norm="plain_batch"),
            inner_lr=0.4,
            inner_steps=2,
            first_order_epochs=0,
        ),
        None,
    ),
}


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
@pytest.mark.parametrize("name", sorted(VMAP_SETUPS))
def test_vmapped_tasks_give_the_loop_meta_gradient(name, float64):
    from lightning_meta.algorithms import task_parallel

    # No exemption patched in: the blocker itself must accept the learned-rate ParameterDicts.
    torch.manual_seed(0)
    model, batch = VMAP_SETUPS[name]()
    if batch is None:
        batch = TaskBatch(**{k: v.double() if v.is_floating_point() else v for k, v in vars(conv_batch(4)).items()})
    assert model.supports_vmap and task_parallel.vmap_blocker(model) is None
    reference_loss, reference = family_meta_gradient(model, batch, "loop", len(batch))
    for batching, chunk in [("vmap", len(batch)), ("vmap", 3)]:
        loss, grads = family_meta_gradient(model, batch, batching, chunk)
        torch.testing.assert_close(loss, reference_loss, rtol=1e-12, atol=1e-12)
        for param_name in reference:
            torch.testing.assert_close(
                grads[param_name], reference[param_name], rtol=1e-9, atol=1e-11, msg=f"{batching}/{chunk} {param_name}"
            )
    assert any(g.abs().max() > 1e-3 for g in reference.values())
