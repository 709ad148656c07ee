"""MeTAL's task-adaptive inner loss (issue 15, point 3): its modulation starts as the identity and
the loss as plain MAML's, its networks are meta-trained through MAML's inner loop, it never sees
a query label, and the task-parallel (vmapped) path equals the loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_meta.algorithms import MAML
from lightning_meta.losses import MeTALLoss
from lightning_meta.models import MLP, Conv4
from lightning_meta.task import Task, TaskBatch

TOL = {"rtol": 1e-12, "atol": 1e-12}
WAYS = 3


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def conv_batch(tasks: int = 2, shots: int = 2) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(WAYS).repeat_interleave(shots).repeat(tasks, 1)
    x = torch.randn(tasks, WAYS * shots, 1, 16, 16, generator=g)
    return TaskBatch(x, labels, torch.randn(tasks, WAYS * shots, 1, 16, 16, generator=g), labels)


def vector_batch(tasks: int = 4, shots: int = 2) -> TaskBatch:
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(WAYS).repeat_interleave(shots).repeat(tasks, 1)
    x = torch.randn(tasks, WAYS * shots, 4, generator=g)
    return TaskBatch(x, labels, torch.randn(tasks, WAYS * shots, 4, generator=g), labels)


def conv_maml(inner_loss=None) -> MAML:
    torch.manual_seed(0)
    backbone = Conv4(hidden_channels=4, out_features=WAYS, image_size=16)
    return MAML(backbone, inner_lr=0.1, inner_steps=2, inner_loss=inner_loss)


def perturb(metal: MeTALLoss) -> None:
    """Move every MeTAL parameter off its initialisation (non-zero scales and output weights)."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in metal.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def test_the_modulation_is_the_identity_at_initialisation_whatever_the_generators_output():
    for start_as_task_loss in (True, False):
        metal = MeTALLoss(ways=WAYS, parameter_tensors=18, steps=2, start_as_task_loss=start_as_task_loss)
        for network in [*metal.support, *metal.query]:
            assert torch.count_nonzero(network.multiplier_scale) == 0
            assert torch.count_nonzero(network.offset_scale) == 0
            embedding = 5 * torch.randn(network.generator[0].in_features)
            assert network.generator(embedding).abs().sum() > 0  # the generators do output something
            base = [network.hidden.weight, network.hidden.bias, network.output.weight]
            for got, want in zip(network.modulated_weights(embedding), base, strict=True):
                assert torch.equal(got, want)
        assert all(float(n.output.weight.detach().abs().sum()) == 0 for n in metal.support) == start_as_task_loss


def test_at_initialisation_maml_with_metal_is_plain_maml_bit_for_bit():
    plain, metal = conv_maml(), conv_maml(MeTALLoss(ways=WAYS, parameter_tensors=18, steps=2))
    metal.load_state_dict(plain.state_dict(), strict=False)
    batch = conv_batch()
    for model in (plain, metal):
        model.train()
    trajectories = [m.adapt(batch[0], 2) for m in (plain, metal)]
    for a, b in zip(*trajectories, strict=True):
        for n in a:
            assert torch.equal(a[n], b[n]), n
    losses = [m(batch).loss.mean() for m in (plain, metal)]
    assert torch.equal(losses[0], losses[1])
    grads = [
        torch.autograd.grad(loss, list(m.backbone.parameters())) for loss, m in zip(losses, (plain, metal), strict=True)
    ]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_metals_networks_receive_meta_gradients_through_mamls_inner_loop():
    metal = MeTALLoss(ways=WAYS, parameter_tensors=18, steps=2)
    model = conv_maml(metal)
    model.train()
    names = [n for n, _ in metal.named_parameters()]
    assert all(
        f"inner_loss.{n}" in dict(model.named_parameters()) for n in names
    )  # meta-trained by the outer optimizer
    # At initialisation (output weights zero) the output weights and their offset scales move first.
    grads = dict(
        zip(names, torch.autograd.grad(model(conv_batch()).loss.mean(), list(metal.parameters())), strict=True)
    )
    assert all(torch.isfinite(g).all() for g in grads.values())
    for k in range(2):
        for part in ("support", "query"):
            assert grads[f"{part}.{k}.output.weight"].abs().sum() > 0
            assert grads[f"{part}.{k}.offset_scale"][2].abs() > 0
    # Off the initialisation, every parameter of every step's networks and generators gets one.
    perturb(metal)
    grads = dict(
        zip(names, torch.autograd.grad(model(conv_batch()).loss.mean(), list(metal.parameters())), strict=True)
    )
    for n, g in grads.items():
        assert torch.isfinite(g).all() and g.abs().sum() > 0, n
    # And MeTAL changes the adaptation: the trajectory leaves plain MAML's.
    plain = conv_maml()
    plain.load_state_dict(model.state_dict(), strict=False)
    task = conv_batch()[0]
    assert not torch.allclose(model.adapt(task, 2)[-1]["head.weight"], plain.adapt(task, 2)[-1]["head.weight"])


def test_metal_never_needs_the_query_labels_but_uses_the_query_inputs():
    metal = MeTALLoss(ways=WAYS, parameter_tensors=6)
    perturb(metal)
    backbone = MLP(in_features=4, hidden_sizes=[8, 8], out_features=WAYS)
    params = dict(backbone.named_parameters())
    task = vector_batch()[0]
    unlabelled = Task(task.support_x, task.support_y, task.query_x, task.query_y[:0])
    assert unlabelled.query_y.numel() == 0
    loss = metal(params, unlabelled, backbone, 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    moved = Task(task.support_x, task.support_y, task.query_x + 1.0, task.query_y[:0])
    assert not torch.allclose(metal(params, moved, backbone, 0), loss)  # the unlabelled query term
    # Through MAML, the task it is handed carries no query labels.
    seen: list[int] = []

    class Watching(MeTALLoss):
        def forward(self, params, task, predict, step):
            seen.append(task.query_y.numel())
            return super().forward(params, task, predict, step)

    model = MAML(backbone, inner_lr=0.1, inner_steps=2, inner_loss=Watching(ways=WAYS, parameter_tensors=6))
    model.train()
    model.task_loss(task)
    assert seen == [0, 0]


def test_the_value_is_cross_entropy_plus_the_two_terms_and_later_steps_reuse_the_last_networks():
    metal = MeTALLoss(ways=WAYS, parameter_tensors=6, steps=2, start_as_task_loss=False)
    backbone = MLP(in_features=4, hidden_sizes=[8, 8], out_features=WAYS)
    params = dict(backbone.named_parameters())
    task = vector_batch()[0]
    task = Task(task.support_x, task.support_y, task.query_x, task.query_y[:0])
    # By hand, step 1 (standardise the states; the identity modulation at initialisation).
    s, q = backbone(task.support_x), backbone(task.query_x)
    ce = F.cross_entropy(s, task.support_y)
    means = torch.stack([p.mean() for p in params.values()])
    state = torch.cat([ce.reshape(1), means])
    u = torch.cat([state.expand(len(s), -1), s, F.one_hot(task.support_y, WAYS).to(s.dtype)], -1)
    u = (u - u.mean()) / (u.std() + 1e-12)
    log_p = F.log_softmax(q, -1)
    v = torch.cat([means.expand(len(q), -1), q, (log_p.exp() * log_p).sum(-1, keepdim=True)], -1)
    v = (v - v.mean()) / (v.std() + 1e-12)
    net_s, net_q = metal.support[1], metal.query[1]
    want = ce + net_s.output(F.relu(net_s.hidden(u))).mean() + net_q.output(F.relu(net_q.hidden(v))).mean()
    torch.testing.assert_close(metal(params, task, backbone, 1), want, **TOL)
    torch.testing.assert_close(metal(params, task, backbone, 4), want, **TOL)
    assert not torch.allclose(metal(params, task, backbone, 0), want)


def test_metal_refuses_a_wrong_tensor_count_ways_or_regression_naming_the_fix():
    backbone = MLP(in_features=4, hidden_sizes=[8], out_features=WAYS)
    params = dict(backbone.named_parameters())
    task = vector_batch()[0]
    with pytest.raises(ValueError, match="set its `parameter_tensors` to 4"):
        MeTALLoss(ways=WAYS, parameter_tensors=6)(params, task, backbone, 0)
    with pytest.raises(ValueError, match="set its `ways` to 3"):
        MeTALLoss(ways=5, parameter_tensors=4)(params, task, backbone, 0)
    regression = Task(task.support_x, task.support_y.to(torch.float64), task.query_x, task.query_y[:0])
    with pytest.raises(ValueError, match="classification loss"):
        MeTALLoss(ways=WAYS, parameter_tensors=4)(params, regression, backbone, 0)


def test_maml_with_metal_gives_the_same_meta_gradient_looped_and_vmapped():
    torch.manual_seed(0)
    metal = MeTALLoss(ways=WAYS, parameter_tensors=6, steps=2)
    perturb(metal)
    model = MAML(
        MLP(in_features=4, hidden_sizes=[8, 8], out_features=WAYS), inner_lr=0.1, inner_steps=2, inner_loss=metal
    )
    model.train()
    assert model._check_vmap() is None
    batch = vector_batch()
    results = {}
    for mode in ("loop", "vmap"):
        loss = model(batch, batching=mode).loss.mean()
        results[mode] = (loss, torch.autograd.grad(loss, list(model.parameters())))
    torch.testing.assert_close(results["vmap"][0], results["loop"][0], **TOL)
    for (n, _), a, b in zip(model.named_parameters(), results["vmap"][1], results["loop"][1], strict=True):
        torch.testing.assert_close(a, b, **TOL, msg=n)
        assert b.abs().sum() > 0, n


def test_the_predictor_is_metal_without_its_unlabelled_term():
    metal = MeTALLoss(ways=WAYS, parameter_tensors=18, steps=2)
    model = conv_maml(metal)
    perturb(metal)
    batch = conv_batch()
    model.eval()
    task = batch[0]
    with_query_term = model(batch).predictions.detach()[0]
    predicted = model.adapt_to(task.support_x, task.support_y)(task.query_x)
    assert torch.isfinite(predicted).all()
    assert not torch.allclose(predicted, with_query_term)  # evaluation uses the query inputs, adapt_to has none
    with torch.no_grad():  # switch the query term off: evaluation and the predictor then agree
        for network in metal.query:
            network.output.weight.zero_()
            network.offset_scale.zero_()
    without_query_term = model(batch).predictions.detach()[0]
    predicted = model.adapt_to(task.support_x, task.support_y)(task.query_x)
    torch.testing.assert_close(predicted, without_query_term, rtol=1e-9, atol=1e-10)
