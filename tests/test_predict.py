"""Prediction on a support set of one's own (`MetaLearner.adapt_to`, `predict_step`): the predictor
gives the evaluation path's outputs on the same task, for every algorithm of the contract test,
under both evaluation protocols (float64)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from lightning_meta.algorithms import MAML, MetaLearner, ProtoNet
from lightning_meta.models import Conv4
from lightning_meta.task import TaskBatch
from tests.helpers import SyntheticClassesDataModule, quiet_trainer
from tests.test_contract import SETUPS


def float64_batch(batch: TaskBatch) -> TaskBatch:
    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.double() if torch.is_floating_point(t) else t

    return TaskBatch(cast(batch.support_x), cast(batch.support_y), cast(batch.query_x), cast(batch.query_y))


def trained_a_little(name: str) -> tuple[MetaLearner, TaskBatch]:
    """The setup's learner after one meta-step (so learned rates and weights are not at their
    initial values), in float64, and a validation batch."""
    torch.manual_seed(0)
    model, dm = SETUPS[name]()
    model.double()
    loss, _ = model.meta_loss(float64_batch(next(iter(dm.train_dataloader()))))
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 1e-2 * p.grad
    return model, float64_batch(next(iter(dm.val_dataloader())))


@pytest.mark.parametrize("protocol", ["transductive", "per_example"])
@pytest.mark.parametrize("name", sorted(SETUPS))
def test_the_predictor_gives_the_evaluation_outputs(name, protocol):
    model, batch = trained_a_little(name)
    model.eval_protocol = protocol
    model.eval()
    expected = model(batch).predictions.detach()
    model.train()  # adapt_to evaluates whatever the mode, and restores it
    for i, task in enumerate(batch):
        predictor = model.adapt_to(task.support_x, task.support_y)
        got = predictor(task.query_x)
        torch.testing.assert_close(got, expected[i], rtol=1e-9, atol=1e-10, msg=f"{name}, task {i}")
        assert model.training
        if task.is_classification:
            probs = predictor.probabilities(task.query_x)
            torch.testing.assert_close(probs.sum(-1), torch.ones(len(probs), dtype=probs.dtype))
            assert (probs.argmax(-1) == got.argmax(-1)).all()


def test_per_example_predictions_do_not_depend_on_the_other_queries():
    model, batch = trained_a_little("ProtoNet")
    model.eval_protocol = "per_example"
    task = batch[0]
    predictor = model.adapt_to(task.support_x, task.support_y)
    alone = torch.cat([predictor(task.query_x[i : i + 1]) for i in range(len(task.query_x))])
    torch.testing.assert_close(alone, predictor(task.query_x), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(
    "make", [lambda: MAML(Conv4(hidden_channels=8, out_features=3)), lambda: ProtoNet(Conv4(hidden_channels=8))]
)
def test_predict_step_through_a_trainer_gives_the_evaluation_predictions(make):
    torch.manual_seed(0)
    model, dm = make(), SyntheticClassesDataModule()
    batch = next(iter(dm.val_dataloader()))
    model.eval()
    expected = model(batch).predictions.detach()
    predicted = quiet_trainer(inference_mode=False).predict(model, DataLoader([batch], batch_size=None))
    torch.testing.assert_close(predicted[0], expected, rtol=1e-5, atol=1e-6)


def test_predict_refuses_inference_mode_for_gradient_adaptation():
    model, dm = MAML(Conv4(hidden_channels=8, out_features=3)), SyntheticClassesDataModule()
    loader = DataLoader([next(iter(dm.val_dataloader()))], batch_size=None)
    with pytest.raises(RuntimeError, match=r"inference_mode=False"):
        pl.Trainer(logger=False, enable_progress_bar=False, inference_mode=True).predict(model, loader)


def test_bad_support_sets_are_refused_with_the_fix():
    model = ProtoNet(Conv4(hidden_channels=8))
    x = torch.randn(4, 1, 28, 28)
    with pytest.raises(ValueError, match=r"classes \[1\] have no support example"):
        model.adapt_to(x, torch.tensor([0, 0, 2, 2]))
    with pytest.raises(ValueError, match=r"one label per support example"):
        model.adapt_to(x, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match=r"integer class labels"):
        model.adapt_to(x, torch.randn(4))
    maml = MAML(Conv4(hidden_channels=8, out_features=3))
    with pytest.raises(ValueError, match=r"predicts 3 classes but the support set has 2"):
        maml.adapt_to(x, torch.tensor([0, 1, 0, 1]))(x)
