"""The pluggable inner loss (issue 15, point 1): the default keeps every learner's numbers, a fixed
candidate and ML3's learned loss are what the inner loop descends, ML3's φ is meta-trained, and no
inner loss ever sees the query labels."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from lightning_meta.algorithms import ANIL, CAVIA, MAML, MAMLPlusPlus, MetaSGD
from lightning_meta.data import SinusoidDataModule, SinusoidTasks
from lightning_meta.inner_loop import adapt, forward
from lightning_meta.losses import CandidateLoss, InnerLoss, ML3Loss, TaskLoss
from lightning_meta.losses.candidates import huber
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


def conv_batch(tasks: int = 2, ways: int = 3, shots: int = 2) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1)
    x = torch.randn(tasks, ways * shots, 1, 16, 16, generator=g)
    return TaskBatch(x, labels, torch.randn(tasks, ways * shots, 1, 16, 16, generator=g), labels)


def conv(ways: int = 3) -> Conv4:
    return Conv4(hidden_channels=4, out_features=ways, image_size=16)


LEARNERS = {
    "MAML": (lambda **kw: MAML(MLP(hidden_sizes=[8, 8]), inner_lr=0.05, inner_steps=2, **kw), sine_batch),
    "MetaSGD": (lambda **kw: MetaSGD(MLP(hidden_sizes=[8, 8]), inner_steps=2, **kw), sine_batch),
    "ANIL": (lambda **kw: ANIL(conv(), inner_lr=0.1, inner_steps=2, **kw), conv_batch),
    "MAMLPlusPlus": (lambda **kw: MAMLPlusPlus(conv(), inner_lr=0.1, inner_steps=2, **kw), conv_batch),
    "CAVIA": (
        lambda **kw: CAVIA(MLP(in_features=6, hidden_sizes=[8, 8]), context_size=5, inner_steps=2, **kw),
        sine_batch,
    ),
}


def meta_loss_and_grads(model, batch: TaskBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = model(batch).loss.mean()
    params = {n: p for n, p in model.named_parameters() if not n.startswith("inner_loss.")}
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True, materialize_grads=True)
    return loss, dict(zip(params, grads, strict=True))


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_the_task_loss_as_a_component_keeps_every_learners_numbers(name):
    build, batch_fn = LEARNERS[name]
    torch.manual_seed(0)
    default = build()
    explicit = build(inner_loss=TaskLoss())
    explicit.load_state_dict(default.state_dict())
    batch = batch_fn()
    for model in (default, explicit):
        model.train()
    want_loss, want = meta_loss_and_grads(default, batch)
    got_loss, got = meta_loss_and_grads(explicit, batch)
    torch.testing.assert_close(got_loss, want_loss, **TOL)
    assert want.keys() == got.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], **TOL, msg=n)


def test_a_candidate_loss_is_what_the_inner_loop_descends():
    torch.manual_seed(0)
    model = MAML(MLP(hidden_sizes=[8, 8]), inner_lr=0.05, inner_steps=2, inner_loss=CandidateLoss("huber"))
    task = sine_batch()[0]
    trajectory = model.adapt(task, 2)
    # By hand: two SGD steps on the Huber loss.
    theta = dict(model.backbone.named_parameters())
    for _ in range(2):
        loss = huber(functional_call(model.backbone, theta, (task.support_x,)), task.support_y)
        grads = torch.autograd.grad(loss, list(theta.values()), create_graph=True)
        theta = {n: p - 0.05 * g for (n, p), g in zip(theta.items(), grads, strict=True)}
    for n in theta:
        torch.testing.assert_close(trajectory[-1][n], theta[n], **TOL)
    mse_model = copy.deepcopy(model)
    mse_model.inner_loss = None
    assert not torch.allclose(mse_model.adapt(task, 2)[-1]["net.0.weight"], theta["net.0.weight"])


def test_candidate_loss_refuses_an_unknown_name_and_the_wrong_task_kind():
    with pytest.raises(ValueError, match=r"name='hubber' is not a candidate loss; choose one of \["):
        CandidateLoss("hubber")
    model = MAML(MLP(hidden_sizes=[8]), inner_loss=CandidateLoss("focal"))
    with pytest.raises(ValueError, match="'focal' is a classification loss but these tasks are regression"):
        model.adapt(sine_batch()[0], 1)


class Recording(InnerLoss):
    """The task loss, recording the step and whether query labels were visible."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[int] = []
        self.query_labels: list[int] = []

    def forward(self, params, task, predict, step):
        self.steps.append(step)
        self.query_labels.append(task.query_y.numel())
        predictions = predict(task.support_x)
        if torch.is_floating_point(task.support_y):
            return F.mse_loss(predictions, task.support_y)
        return F.cross_entropy(predictions, task.support_y)


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_the_inner_loss_sees_each_step_and_never_the_query_labels(name):
    build, batch_fn = LEARNERS[name]
    recorder = Recording()
    model = build(inner_loss=recorder)
    model.train()
    model.task_loss(batch_fn()[0])
    assert recorder.steps == [0, 1]
    assert recorder.query_labels == [0, 0]


def test_ml3s_loss_network_gets_meta_gradients_and_its_output_is_the_inner_loss():
    torch.manual_seed(0)
    ml3 = ML3Loss(outputs=1)
    model = MAML(MLP(hidden_sizes=[8, 8]), inner_lr=0.05, inner_steps=2, inner_loss=ml3)
    model.train()
    assert any(n.startswith("inner_loss.network.") for n, _ in model.named_parameters())
    loss = model(sine_batch()).loss.mean()
    grads = torch.autograd.grad(loss, list(ml3.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    # Its value: the mean over the support set of the MLP on (prediction, target), non-negative.
    task = sine_batch()[0]
    predictions = model.backbone(task.support_x)
    by_hand = ml3.network(torch.cat([predictions, task.support_y], dim=-1)).mean()
    got = ml3(dict(model.backbone.named_parameters()), task, model.backbone, 0)
    torch.testing.assert_close(got, by_hand, **TOL)
    assert float(got.detach()) >= 0
    with pytest.raises(ValueError, match="set its `outputs` to 3"):
        ml3(dict(conv().named_parameters()), conv_batch()[0], conv(), 0)


def test_maml_with_ml3_gives_the_same_meta_gradient_looped_and_vmapped():
    torch.manual_seed(0)
    model = MAML(MLP(hidden_sizes=[8, 8]), inner_lr=0.05, inner_steps=2, inner_loss=ML3Loss(outputs=1))
    model.train()
    assert model._check_vmap() is None
    batch = sine_batch(4)
    results = {}
    for mode in ("loop", "vmap"):
        loss = model(batch, batching=mode).loss.mean()
        grads = torch.autograd.grad(loss, list(model.parameters()))
        results[mode] = (loss, grads)
    torch.testing.assert_close(results["vmap"][0], results["loop"][0], **TOL)
    for a, b in zip(results["vmap"][1], results["loop"][1], strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_an_inner_loss_that_says_it_cannot_be_vmapped_keeps_the_learner_on_the_loop():
    class Blocked(TaskLoss):
        vmap_blocker = "not proven"

    model = MAML(MLP(hidden_sizes=[8]), inner_loss=Blocked())
    assert model._check_vmap() == "inner_loss: not proven"


def test_ml3s_network_is_the_reference_one_bias_free_so_positively_homogeneous():
    # The reference's ML3_SineRegressionLoss has no biases; then the value under the softplus
    # scales with (ŷ, y): h(c·z) = c·h(z) for c > 0, which is what lets a loss learned on A = 1
    # extrapolate to the benchmark's larger amplitudes. With biases it does not.
    torch.manual_seed(0)
    z = torch.randn(64, 2)

    def under_softplus(loss: ML3Loss, inputs: torch.Tensor) -> torch.Tensor:
        return loss.network[:-1](inputs)

    reference = ML3Loss(outputs=1)
    assert not any("bias" in n for n, _ in reference.named_parameters())
    torch.testing.assert_close(under_softplus(reference, 3.0 * z), 3.0 * under_softplus(reference, z))
    biased = ML3Loss(outputs=1, bias=True)
    with torch.no_grad():
        for p in biased.parameters():
            if p.dim() == 1:
                p.fill_(0.1)
    assert sum("bias" in n for n, _ in biased.named_parameters()) == 3
    assert not torch.allclose(under_softplus(biased, 3.0 * z), 3.0 * under_softplus(biased, z))


def test_ml3_meta_trained_on_one_sine_trains_new_regressors_on_other_sines_faster_than_mse():
    # The reference's sine protocol in miniature (benchmarks/ml3_sine.py): φ learned through one
    # SGD step (lr 1e-3) from a fresh regressor each meta-step on one sine (A = 1); then a new
    # regressor on a sine it never saw (A = 4, wider x range) ends lower after 100 SGD steps at
    # the same rate with the learned loss than with MSE (about 4.7 against 7.8). The untrained
    # loss does not (its gradients are ~50x smaller than MSE's), so this fails if φ is not learned.
    rng = np.random.default_rng(0)
    train_task = SinusoidTasks(100, 100, (1.0, 1.0), (np.pi, np.pi), (-2.0, 2.0)).sample(rng)
    test_task = SinusoidTasks(100, 100, (4.0, 4.0), (0.5, 0.5), (-5.0, 5.0)).sample(rng)
    train_task, test_task = (Task(**{k: v.double() for k, v in vars(t).items()}) for t in (train_task, test_task))

    def regressor() -> MLP:
        model = MLP(hidden_sizes=[20, 20])
        for layer in model.net:
            if isinstance(layer, torch.nn.Linear):
                torch.nn.init.xavier_uniform_(layer.weight)
                torch.nn.init.zeros_(layer.bias)
        return model

    def fit(loss_fn, steps: int = 100) -> float:
        torch.manual_seed(1)
        model = regressor()
        params = dict(model.named_parameters())
        final = adapt(lambda p: loss_fn(p, model), params, steps, 1e-3, first_order=True)[-1]
        with torch.no_grad():
            return float(F.mse_loss(forward(model, final, test_task.support_x), test_task.support_y))

    torch.manual_seed(0)
    ml3 = ML3Loss(outputs=1)
    optimizer = torch.optim.Adam(ml3.parameters(), lr=1e-3)

    def learned(p, model, task=test_task):
        return ml3(p, task, lambda x: forward(model, p, x), 0)

    def mse(p, model):
        return F.mse_loss(forward(model, p, test_task.support_x), test_task.support_y)

    untrained = fit(learned)
    for _ in range(500):
        model = regressor()
        params = dict(model.named_parameters())
        step = adapt(lambda p, m=model: learned(p, m, train_task), params, 1, 1e-3)[-1]
        optimizer.zero_grad()
        F.mse_loss(forward(model, step, train_task.support_x), train_task.support_y).backward()
        optimizer.step()
    baseline, trained = fit(mse), fit(learned)
    assert untrained > baseline > trained, (untrained, baseline, trained)
