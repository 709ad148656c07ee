"""The pluggable update rule keeps MAML's, Meta-SGD's and MAML++'s numbers (issue 14, point 1).

The references below are the inner loop as it was before update rules: a hand-written loop of
θ ← θ − α ⊙ ∇L_support(θ) with `torch.autograd.grad` (graph kept unless first order). Every
learner's trajectory and meta-gradient must match them to 1e-12 in float64, on the loop path
and (where the learner supports it) under vmap.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from lightning_meta.algorithms import ANIL, MAML, MAMLPlusPlus, MetaSGD, supervised_loss
from lightning_meta.algorithms.mamlpp import multi_step_loss_weights
from lightning_meta.algorithms.metasgd import rate_key
from lightning_meta.data import SinusoidDataModule
from lightning_meta.models import MLP, Conv4
from lightning_meta.task import Task, TaskBatch

TOL = {"rtol": 1e-12, "atol": 1e-12}


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def sine_batch(tasks: int = 3) -> TaskBatch:
    batch = next(iter(SinusoidDataModule(shots=5, query_shots=5, tasks_per_batch=tasks).train_dataloader()))
    return TaskBatch(**{k: v.to(torch.float64) for k, v in vars(batch).items()})


def conv_batch(tasks: int = 3, ways: int = 3, shots: int = 2) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1)
    return TaskBatch(
        torch.randn(tasks, ways * shots, 1, 16, 16, generator=g),
        labels,
        torch.randn(tasks, ways * shots, 1, 16, 16, generator=g),
        labels,
    )


def reference_trajectory(model, task: Task, steps: int, rate, first_order: bool, bn=None) -> list[dict]:
    """The pre-update-rule inner loop: `rate(name, step)` is α for that tensor and step; `bn(step)`
    gives the BatchNorm weights step `step` runs with (MAML++), else none."""
    theta = {n: p for n, p in model.backbone.named_parameters() if bn is None or n not in model.bn_names}
    trajectory = [theta]
    for step in range(steps):
        extra = bn(step) if bn is not None else {}
        inputs = {n: p if p.requires_grad else p.detach().requires_grad_() for n, p in trajectory[-1].items()}
        loss = supervised_loss(functional_call(model.backbone, {**inputs, **extra}, (task.support_x,)), task.support_y)
        grads = torch.autograd.grad(loss, list(inputs.values()), create_graph=not first_order)
        trajectory.append({n: p - rate(n, step) * g for (n, p), g in zip(inputs.items(), grads, strict=True)})
    return trajectory


def meta_grads(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True, materialize_grads=True)
    return dict(zip(params, grads, strict=True))


def assert_same(actual: dict, expected: dict, what: str) -> None:
    assert set(actual) == set(expected), what
    for n in expected:
        torch.testing.assert_close(actual[n], expected[n], **TOL, msg=f"{what} {n}")


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_maml_keeps_its_trajectory_and_meta_gradient(first_order):
    torch.manual_seed(0)
    model = MAML(MLP(hidden_sizes=[8, 8]), inner_lr=0.05, inner_steps=3, first_order=first_order)
    task = sine_batch()[0]
    trajectory = model.adapt(task, 3)
    expected = reference_trajectory(model, task, 3, lambda n, k: 0.05, first_order)
    for k, (theta, reference) in enumerate(zip(trajectory, expected, strict=True)):
        assert_same(theta, reference, f"step {k}")
    loss = supervised_loss(functional_call(model.backbone, trajectory[-1], (task.query_x,)), task.query_y)
    reference_loss = supervised_loss(functional_call(model.backbone, expected[-1], (task.query_x,)), task.query_y)
    assert_same(meta_grads(model, loss), meta_grads(model, reference_loss), "meta-gradient")
    torch.testing.assert_close(model.task_loss(task).loss, reference_loss, **TOL)


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_meta_sgd_keeps_its_trajectory_and_meta_gradient(first_order):
    torch.manual_seed(0)
    model = MetaSGD(MLP(hidden_sizes=[8, 8]), inner_steps=2, first_order=first_order)
    task = sine_batch()[0]
    trajectory = model.adapt(task, 2)
    expected = reference_trajectory(model, task, 2, lambda n, k: model.inner_lrs[rate_key(n)], first_order)
    for k, (theta, reference) in enumerate(zip(trajectory, expected, strict=True)):
        assert_same(theta, reference, f"step {k}")
    reference_loss = supervised_loss(functional_call(model.backbone, expected[-1], (task.query_x,)), task.query_y)
    loss = model.task_loss(task).loss
    torch.testing.assert_close(loss, reference_loss, **TOL)
    grads, reference = meta_grads(model, loss), meta_grads(model, reference_loss)
    assert_same(grads, reference, "meta-gradient")
    assert all(reference[n].abs().max() > 0 for n in reference if "inner_lrs" in n or "rates" in n)


@pytest.mark.parametrize("per_step_bn", [True, False], ids=["per-step-bn", "no-bn"])
@pytest.mark.parametrize("first_order_epochs", [0, 1], ids=["second-order", "first-order"])
def test_mamlpp_keeps_its_trajectory_and_meta_gradient(per_step_bn, first_order_epochs):
    torch.manual_seed(0)
    if per_step_bn:
        backbone, task = Conv4(hidden_channels=4, out_features=3, norm="plain_batch"), conv_batch()[0]
    else:
        backbone, task = MLP(hidden_sizes=[8, 8]), sine_batch()[0]
    steps = 3
    model = MAMLPlusPlus(
        backbone,
        inner_lr=0.05,
        inner_steps=steps,
        multi_step_loss_epochs=2,
        first_order_epochs=first_order_epochs,
        per_step_bn=per_step_bn,
    )
    with torch.no_grad():  # distinct rates per step, so a step using another's rate is visible
        for rates in model.inner_lrs.values():
            rates.mul_(torch.tensor([1.0, 0.7, 1.3]))
    model.train()
    first_order = model.first_order_now()  # epoch 0
    assert first_order == (first_order_epochs > 0)
    eval_steps = steps + 1  # past K, step K's rates and BatchNorm weights are reused

    def rate(n, k):
        return model.inner_lrs[rate_key(n)][min(k, steps - 1)]

    bn = model.bn_params if per_step_bn else None
    expected = reference_trajectory(model, task, eval_steps, rate, first_order, bn)
    expected = [{**theta, **(model.bn_params(max(k - 1, 0)) if bn else {})} for k, theta in enumerate(expected)]
    trajectory = model.adapt(task, eval_steps)
    for k, (theta, reference) in enumerate(zip(trajectory, expected, strict=True)):
        assert_same(theta, reference, f"step {k}")
    # The multi-step loss at epoch 0 (uniform weights) over K steps.
    weights = multi_step_loss_weights(steps, 0, 2).tolist()
    reference_loss = sum(
        w * supervised_loss(functional_call(model.backbone, expected[k + 1], (task.query_x,)), task.query_y)
        for k, w in enumerate(weights)
    )
    loss = model.task_loss(task).loss
    torch.testing.assert_close(loss, reference_loss, **TOL)
    assert_same(meta_grads(model, loss), meta_grads(model, reference_loss), "meta-gradient")


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_anil_keeps_its_head_trajectory(first_order):
    torch.manual_seed(0)
    model = ANIL(MLP(hidden_sizes=[8, 8]), inner_lr=0.05, inner_steps=2, first_order=first_order)
    task = sine_batch()[0]
    trajectory = model.adapt(task, 2)
    features = model.features(task.support_x)[0]
    head = {n: p for n, p in model.head_module.named_parameters()}
    expected = [head]
    for _ in range(2):
        loss = supervised_loss(functional_call(model.head_module, expected[-1], (features,)), task.support_y)
        grads = torch.autograd.grad(loss, list(expected[-1].values()), create_graph=not first_order)
        expected.append({n: p - 0.05 * g for (n, p), g in zip(expected[-1].items(), grads, strict=True)})
    for k, reference in enumerate(expected):
        assert_same(
            {n.removeprefix(f"{model.head}."): p for n, p in trajectory[k].items() if n.startswith(model.head + ".")},
            reference,
            f"step {k}",
        )


def loop_and_vmap(model, batch: TaskBatch) -> None:
    """The meta-gradient of the learner's own training step, loop against vmap."""
    results = {}
    for batching in ("loop", "vmap"):
        model.zero_grad()
        model.task_batching, model.task_chunk_size = batching, None
        model.training_step(batch, 0).backward()
        results[batching] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert_same(results["vmap"], results["loop"], "vmap against loop")


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
@pytest.mark.parametrize("name", ["MAML", "MetaSGD", "MAMLPlusPlus", "ANIL"])
def test_loop_and_vmap_parity_still_holds(name):
    torch.manual_seed(0)
    backbone = Conv4(hidden_channels=4, out_features=3, norm="plain_batch")
    model = {
        "MAML": lambda: MAML(backbone, inner_lr=0.1, inner_steps=2),
        "MetaSGD": lambda: MetaSGD(backbone, inner_steps=2),
        "MAMLPlusPlus": lambda: MAMLPlusPlus(backbone, inner_steps=2, multi_step_loss_epochs=0),
        "ANIL": lambda: ANIL(backbone, inner_steps=2),
    }[name]()
    model.train()
    loop_and_vmap(model, conv_batch())
