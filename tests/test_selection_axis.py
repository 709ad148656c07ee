"""Issue 15's second candidate axis and per-task-type logs: the selectors choose among inner step
sizes (and loss × step size) by the same mechanism as among losses; AutoLoss's `mse_l1`
candidate; task families tag each task's type and validation logs `val/choice/<type>/<candidate>`.

Float64 throughout where trajectories are compared."""

from __future__ import annotations

import csv

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from lightning_meta.algorithms import MAML
from lightning_meta.data import CorruptedSinusoidTasks, LinearRegressionTasks, SinusoidTasks, TaskStream
from lightning_meta.data.sampler import TRAIN, VAL, task_rng
from lightning_meta.inner_loop import adapt, forward, named_params
from lightning_meta.losses import CANDIDATES, BanditLoss, CandidateLoss, MixtureLoss, PolicyLoss
from lightning_meta.losses.candidates import mse_l1
from lightning_meta.losses.selection import _Selector
from lightning_meta.models import MLP
from lightning_meta.task import Task, TaskBatch

ALPHA = 0.01
SCALES = [0.1, 1.0, 3.0]


def sine_task(index: int = 0, corrupt: float = 1.0) -> Task:
    task = CorruptedSinusoidTasks(10, 10, corrupt_fraction=corrupt).sample(task_rng(0, TRAIN, index))
    return Task(*(t.double() for t in (task.support_x, task.support_y, task.query_x, task.query_y)))


def maml(inner_loss=None, inner_lr: float = ALPHA, steps: int = 3, seed: int = 0) -> MAML:
    torch.manual_seed(seed)
    model = MAML(MLP(hidden_sizes=[8, 8]), inner_lr=inner_lr, inner_steps=steps, inner_loss=inner_loss).double()
    model.train()
    return model


def trajectory_and_meta_gradient(model: MAML, task: Task) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """θK of `model` on `task` and the meta-gradient of the query MSE w.r.t. θ0 (second order)."""
    theta_k = model.adapt(task, model.inner_steps)[-1]
    loss = ((forward(model.backbone, theta_k, task.query_x) - task.query_y) ** 2).mean()
    grads = torch.autograd.grad(loss, list(model.backbone.parameters()))
    return [t.detach() for t in theta_k.values()], list(grads)


def force(selector, index: int) -> None:
    """Make a feature selector's output put all its weight on candidate `index` (softmax exactly one-hot in float64)."""
    with torch.no_grad():
        selector.selector[-1].bias.zero_()
        selector.selector[-1].bias[index] = 1000.0


def close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        # α·(s·g) against (s·α)·g: equal up to float64 rounding, no more.
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("index", range(len(SCALES)))
def test_a_one_hot_mixture_over_step_sizes_is_maml_at_that_inner_lr(index):
    task = sine_task()
    selector = MixtureLoss(["mse"], lr_scales=SCALES).double()
    force(selector, index)
    want = trajectory_and_meta_gradient(maml(inner_lr=ALPHA * SCALES[index]), task)
    got = trajectory_and_meta_gradient(maml(selector), task)
    close(got[0], want[0])
    close(got[1], want[1])
    # At test the argmax alone: the same inner lr, with weights that carry no graph.
    model = maml(selector)
    model.eval()
    close([t.detach() for t in model.adapt(task, 3)[-1].values()], want[0])
    assert selector.candidates == ["mse@0.1", "mse@1", "mse@3"]


def test_the_mixture_step_is_the_softmax_weighted_combination_of_the_candidate_steps():
    """One inner step on (loss × step size) candidates: θ1 = Σ_c w_c (θ0 − α s_c ∇L_c)."""
    task = sine_task()
    selector = MixtureLoss(["mse", "l1"], lr_scales=[0.5, 2.0]).double()
    with torch.no_grad():
        selector.selector[-1].bias.copy_(torch.tensor([0.3, -0.1, 0.7, 0.0], dtype=torch.float64))
    model = maml(selector, steps=1)
    theta0 = named_params(model.backbone)
    weights = selector.weights(theta0, task, model.backbone).detach()
    assert selector.candidates == ["mse@0.5", "mse@2", "l1@0.5", "l1@2"]
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    got = model.adapt(task, 1)[-1]
    want = {n: torch.zeros_like(p) for n, p in theta0.items()}
    for w, (loss, scale) in zip(weights, selector.pairs, strict=True):

        def support(params, loss=loss):
            return CANDIDATES["regression"][loss](forward(model.backbone, params, task.support_x), task.support_y)

        step = adapt(support, theta0, 1, ALPHA * scale)[-1]
        for n in want:
            want[n] = want[n] + w * step[n]
    close([t.detach() for t in got.values()], [t.detach() for t in want.values()])


@pytest.mark.parametrize("cls", [PolicyLoss, BanditLoss])
def test_policy_and_bandit_step_at_the_chosen_inner_lr(cls):
    task = sine_task()
    selector = cls(["mse", "l1"], lr_scales=SCALES).double()
    model = maml(selector)
    got = model.adapt(task, 3)[-1]
    chosen = selector.pop_choices().tolist()
    assert len(chosen) == 1
    loss, scale = selector.pairs[chosen[0]]
    reference = maml(CandidateLoss(loss), inner_lr=ALPHA * scale)
    want = reference.adapt(task, 3)[-1]
    close([t.detach() for t in got.values()], [t.detach() for t in want.values()])
    # The bandit tries the candidates in order: the second task takes the second candidate.
    if cls is BanditLoss:
        selector.after_task(torch.tensor(1.0), training=True)
        model.adapt(task, 1)
        assert selector.pop_choices().tolist() == [1]


def test_without_lr_scales_the_selectors_are_exactly_their_chosen_losses():
    """The loss-only selectors are unchanged: bitwise the trajectory of the old formulas."""
    task = sine_task()
    names = ["mse", "l1", "cauchy"]
    # Mixture: Σ_c w_c L_c, each weight times its loss, summed in candidate order (the old combine).
    selector = MixtureLoss(names).double()
    with torch.no_grad():
        selector.selector[-1].bias.copy_(torch.tensor([0.2, -0.4, 0.1], dtype=torch.float64))
    model = maml(selector)
    theta0 = named_params(model.backbone)
    weights = selector.weights(theta0, task, model.backbone)

    def old_mixture(params):
        predictions = forward(model.backbone, params, task.support_x)
        total = weights[0] * CANDIDATES["regression"][names[0]](predictions, task.support_y)
        for w, n in zip(weights[1:], names[1:], strict=True):
            total = total + w * CANDIDATES["regression"][n](predictions, task.support_y)
        return total

    want = adapt(old_mixture, theta0, 3, ALPHA)[-1]
    got = model.adapt(task, 3)[-1]
    assert all(torch.equal(got[n], want[n]) for n in want)
    # Policy and bandit: the chosen candidate's own loss, unscaled.
    for cls in (PolicyLoss, BanditLoss):
        selector = cls(names).double()
        model = maml(selector)
        got = model.adapt(task, 3)[-1]
        chosen = names[selector.pop_choices().item()]
        want = maml(CandidateLoss(chosen)).adapt(task, 3)[-1]
        assert all(torch.equal(got[n], want[n]) for n in want), cls.__name__


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"candidates": ["mse"], "lr_scales": [1.0]}, "at least two lr_scales"),
        ({"candidates": ["mse"], "lr_scales": [0.0, 1.0]}, "distinct positive multipliers"),
        ({"candidates": ["mse"], "lr_scales": [1.0, 1.0]}, "distinct positive multipliers"),
        ({"candidates": ["mse", "mse"]}, "distinct regression losses"),
        ({"candidates": ["mse", "mse_l2"]}, r"\['mse_l2'\] are not"),
    ],
)
def test_bad_step_size_candidates_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MixtureLoss(**kwargs)


def test_mse_l1_is_mse_plus_a_fifth_of_the_weights_l1_norm_and_is_no_default_candidate():
    torch.manual_seed(0)
    model = MLP(in_features=16, hidden_sizes=[], out_features=1).double()
    task = LinearRegressionTasks(dim=16, shots=200).sample(task_rng(0, TRAIN, 0))
    x, y = task.support_x.double(), task.support_y.double()
    params = dict(model.named_parameters())
    predictions = model(x)
    want = ((predictions - y) ** 2).mean() + 0.2 * model.net[0].weight.abs().sum()  # the bias is not penalised
    torch.testing.assert_close(mse_l1(predictions, y, params), want)
    loss = CandidateLoss("mse_l1")
    torch.testing.assert_close(loss(params, Task(x, y, x, y), model, 0), want)
    assert "mse_l1" not in MixtureLoss().candidates  # the default set is unchanged
    selector = MixtureLoss(["mse", "mse_l1"]).double()
    learner = maml(selector)
    learner.backbone = model
    theta = learner.adapt(Task(x, y, x, y), 2)[-1]
    assert all(torch.isfinite(t).all() for t in theta.values())


def test_typed_families_tag_each_batch_with_its_tasks_types_and_plain_ones_do_not():
    family = CorruptedSinusoidTasks(5, 5, corrupt_fraction=0.5)
    stream = TaskStream(family, seed=3, stream=VAL)
    batch = stream[tuple(range(12))]
    flags = [family.sample_with_type(task_rng(3, VAL, i))[1] for i in range(12)]
    assert batch.task_type.tolist() == [int(f) for f in flags] and 0 < sum(flags) < 12
    assert batch.type_names == ("clean", "corrupted")
    # The tasks are those of the untyped draw.
    assert torch.equal(batch.support_y[5], family.sample(task_rng(3, VAL, 5)).support_y)
    assert batch.slice(4, 8).task_type.tolist() == batch.task_type[4:8].tolist()
    assert batch.to("cpu").type_names == batch.type_names
    assert TaskStream(SinusoidTasks(5, 5), seed=3, stream=VAL)[(0, 1)].task_type is None


class _ByOutlier(_Selector):
    """Chooses `l1` for a task whose support targets reach 50, else `mse` (test stub)."""

    def __init__(self) -> None:
        super().__init__(["mse", "l1"], "regression")

    def forward(self, params, task, predict, step):
        if step == 0:
            self._choices.append(int(task.support_y.abs().max() > 50))
        return self.candidate_loss(self._choices[-1], params, task, predict)


def typed_batch(n: int, corrupted: list[int]) -> TaskBatch:
    tasks = []
    for i in range(n):
        task = sine_task(i, corrupt=0.0)
        if i in corrupted:
            task.support_y[0] += 100.0
        tasks.append(Task(*(t.float() for t in (task.support_x, task.support_y, task.query_x, task.query_y))))
    kinds = torch.tensor([int(i in corrupted) for i in range(n)])
    return TaskBatch.stack(tasks).with_types(kinds, ("clean", "corrupted"))


def validate(batches: list[TaskBatch], tmp_path) -> dict[str, float]:
    torch.manual_seed(0)
    model = MAML(MLP(hidden_sizes=[8]), inner_lr=0.01, inner_steps=1, inner_loss=_ByOutlier())
    logger = pl.loggers.CSVLogger(tmp_path, name="run")
    trainer = pl.Trainer(
        logger=logger, enable_progress_bar=False, enable_model_summary=False, inference_mode=False, accelerator="cpu"
    )
    loader = DataLoader(batches, batch_size=None, collate_fn=lambda b: b)
    trainer.validate(model, dataloaders=loader, verbose=False)
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return {k: float(v) for row in rows for k, v in row.items() if v not in ("", None)}


def test_validation_logs_each_task_types_choices_to_csv(tmp_path):
    # 3 of 8 tasks corrupted (in two batches: the types must follow their tasks across batches).
    corrupted = [1, 4, 6]
    full = typed_batch(8, corrupted)
    logged = validate([full.slice(0, 5), full.slice(5, 8)], tmp_path / "right")
    assert logged["val/choice/corrupted/l1"] == 1.0 and logged["val/choice/corrupted/mse"] == 0.0
    assert logged["val/choice/clean/mse"] == 1.0 and logged["val/choice/clean/l1"] == 0.0
    assert logged["val/tasks/corrupted"] == 3.0 and logged["val/tasks/clean"] == 5.0
    assert logged["val/choice/l1"] == pytest.approx(3 / 8)  # the shares over all tasks, as before
    # Types mixed up (the same tasks, the labels of two swapped): the per-type histograms show it.
    swapped = full.with_types(torch.tensor([int(i in [0, 4, 6]) for i in range(8)]), full.type_names)
    logged = validate([swapped], tmp_path / "swapped")
    assert logged["val/choice/corrupted/l1"] == pytest.approx(2 / 3)
    assert logged["val/choice/clean/mse"] == pytest.approx(4 / 5)


def test_linear_regression_sparse_tasks_are_seeded_typed_and_fraction_zero_keeps_the_stream():
    import numpy as np

    mixed = LinearRegressionTasks(dim=16, shots=20, query_shots=5, sparse_fraction=0.5, sparse_active=2)
    kinds = []
    for i in range(40):
        task, sparse = mixed.sample_with_type(task_rng(0, TRAIN, i))
        _, w = mixed.sample_with_weights(task_rng(0, TRAIN, i))
        assert int((w != 0).sum()) == (2 if sparse else 16)
        kinds.append(sparse)
    assert 10 < sum(kinds) < 30
    assert mixed.task_types == ("dense", "sparse")
    assert TaskStream(mixed, seed=0, stream=VAL)[(0, 1, 2)].task_type is not None
    # At 0 no type is drawn: the draw of before (w's support, w, x, noise from the task's generator).
    plain = LinearRegressionTasks(dim=16, shots=20, query_shots=5, active=4)
    rng = task_rng(0, TRAIN, 7)
    w = np.zeros(16)
    keep = rng.choice(16, size=4, replace=False)
    w[keep] = rng.standard_normal(4)
    x = rng.standard_normal((25, 16))
    y = x @ w + np.sqrt(2.0) * rng.standard_normal(25)
    task, flag = plain.sample_with_type(task_rng(0, TRAIN, 7))
    assert not flag
    assert plain.task_types is None and TaskStream(plain, seed=0, stream=VAL)[(0, 1)].task_type is None
    assert torch.equal(task.query_y, torch.from_numpy(y).float().unsqueeze(-1)[20:])
    with pytest.raises(ValueError, match="sparse_fraction=2"):
        LinearRegressionTasks(sparse_fraction=2)
