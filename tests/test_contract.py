"""A contract every exported algorithm keeps: finite loss, a gradient for every trainable
parameter, predictions that survive a checkpoint round-trip, and a short fit through the real CLI.

A new algorithm joins by adding one entry to SETUPS and one to CLI_CONFIGS: the first test
fails until it does.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

import lightning_meta.algorithms as algorithms
from lightning_meta.algorithms import (
    ANIL,
    CAVIA,
    MAML,
    MAMLPlusPlus,
    MatchingNetworks,
    MetaLearner,
    MetaSGD,
    ProtoNet,
    RelationNetworks,
    Reptile,
    Siamese,
)
from lightning_meta.cli import run_cli
from lightning_meta.data import SinusoidDataModule
from lightning_meta.losses import MeTALLoss
from lightning_meta.models import MLP, Conv4, ResNet12
from lightning_meta.update_rules import MetaLSTM
from tests.helpers import SyntheticClassesDataModule

REPO = Path(__file__).resolve().parents[1]

SETUPS = {
    "MAML": lambda: (
        MAML(Conv4(hidden_channels=8, out_features=3), inner_lr=0.4, inner_steps=2),
        SyntheticClassesDataModule(),
    ),
    "MAML-first-order": lambda: (
        MAML(Conv4(hidden_channels=8, out_features=3), inner_steps=2, first_order=True),
        SyntheticClassesDataModule(),
    ),
    "MAML-metal": lambda: (  # MeTAL's task-adaptive inner loss (issue 15): its networks are meta-trained
        MAML(
            Conv4(hidden_channels=8, out_features=3),
            inner_lr=0.4,
            inner_steps=2,
            inner_loss=MeTALLoss(ways=3, parameter_tensors=18, steps=2),
        ),
        SyntheticClassesDataModule(),
    ),
    "MAML-sinusoid": lambda: (MAML(MLP(), inner_lr=0.01), SinusoidDataModule(tasks_per_batch=4)),
    "ProtoNet": lambda: (ProtoNet(Conv4(hidden_channels=8)), SyntheticClassesDataModule()),
    "MetaSGD": lambda: (MetaSGD(Conv4(hidden_channels=8, out_features=3), inner_steps=2), SyntheticClassesDataModule()),
    "ANIL": lambda: (ANIL(Conv4(hidden_channels=8, out_features=3), inner_steps=2), SyntheticClassesDataModule()),
    "MAMLPlusPlus": lambda: (
        MAMLPlusPlus(  # first order, multi-step loss on (the default is second order)
            Conv4(hidden_channels=8, out_features=3), inner_steps=2, multi_step_loss_epochs=10, first_order_epochs=10
        ),
        SyntheticClassesDataModule(),
    ),
    "MAMLPlusPlus-second-order": lambda: (
        MAMLPlusPlus(
            Conv4(hidden_channels=8, out_features=3), inner_steps=2, multi_step_loss_epochs=0, first_order_epochs=0
        ),
        SyntheticClassesDataModule(),
    ),
    "Reptile": lambda: (Reptile(Conv4(hidden_channels=8, out_features=3), inner_steps=2), SyntheticClassesDataModule()),
    "Siamese": lambda: (Siamese(Conv4(hidden_channels=8)), SyntheticClassesDataModule()),
    "Siamese-koch": lambda: (Siamese(Conv4(hidden_channels=8), loss="koch"), SyntheticClassesDataModule()),
    "MatchingNetworks": lambda: (MatchingNetworks(Conv4(hidden_channels=8)), SyntheticClassesDataModule()),
    "MatchingNetworks-fce": lambda: (
        MatchingNetworks(Conv4(hidden_channels=8), fce=True, fce_steps=2),
        SyntheticClassesDataModule(),
    ),
    "RelationNetworks": lambda: (
        RelationNetworks(Conv4(hidden_channels=8, pooled_blocks=2, flatten=False), feature_channels=8),
        SyntheticClassesDataModule(),
    ),
    "Reptile-sinusoid": lambda: (
        Reptile(MLP(), inner_lr=0.02, inner_optimizer="sgd"),
        SinusoidDataModule(tasks_per_batch=4),
    ),
    "MetaLSTM-sinusoid": lambda: (  # MAML whose inner update is the Meta-Learner LSTM
        MAML(MLP(hidden_sizes=[16]), inner_steps=2, update_rule=MetaLSTM(hidden_size=4)),
        SinusoidDataModule(tasks_per_batch=4),
    ),
    "CAVIA-sinusoid": lambda: (
        CAVIA(MLP(in_features=6), context_size=5, inner_steps=2),
        SinusoidDataModule(tasks_per_batch=4),
    ),
    "CAVIA": lambda: (  # FiLM after the third block, as CAVIA's image network
        CAVIA(Conv4(hidden_channels=8, out_features=3), context_size=4, condition="film", inner_steps=2),
        SyntheticClassesDataModule(),
    ),
    # ResNet-12 (narrow) on the 28×28 synthetic images: maps of 1×1 after four pools.
    "MAML-resnet12": lambda: (
        MAML(ResNet12(in_channels=1, channels=(4, 6, 8, 8), out_features=3, image_size=28), inner_steps=2),
        SyntheticClassesDataModule(),
    ),
    "ProtoNet-resnet12": lambda: (
        ProtoNet(ResNet12(in_channels=1, channels=(4, 6, 8, 8), image_size=28)),
        SyntheticClassesDataModule(),
    ),
}

# Setups whose update rule with weights of its own is built by the caller and passed in.
CALLER_BUILT_UPDATE_RULES = {"MetaLSTM-sinusoid"}

CLI_CONFIGS = {
    "MAML": ["--config", "configs/sinusoid/maml.yaml", "--data.tasks_per_batch=4"],
    "ProtoNet": [
        "--config",
        "configs/omniglot_5w1s/protonet.yaml",
        "--data.train_ways=5",
        "--data.query_shots=2",
        "--data.eval_query_shots=2",
        "--model.backbone.init_args.hidden_channels=8",
    ],
    "MetaSGD": ["--config", "configs/sinusoid/metasgd.yaml", "--data.tasks_per_batch=4"],
    "Siamese": [
        "--config",
        "configs/omniglot_5w1s/siamese.yaml",
        "--data.query_shots=2",
        "--data.eval_query_shots=2",
        "--model.backbone.init_args.hidden_channels=8",
    ],
    "MatchingNetworks": [
        "--config",
        "configs/omniglot_5w1s/matching.yaml",
        "--data.query_shots=2",
        "--data.eval_query_shots=2",
        "--model.backbone.init_args.hidden_channels=8",
    ],
    "RelationNetworks": [
        "--config",
        "configs/omniglot_5w1s/relation.yaml",
        "--data.query_shots=2",
        "--data.eval_query_shots=2",
        "--model.backbone.init_args.hidden_channels=8",
        "--model.init_args.feature_channels=8",
    ],
    "ANIL": ["--config", "configs/sinusoid/anil.yaml", "--data.tasks_per_batch=4"],
    "CAVIA": ["--config", "configs/sinusoid/cavia.yaml", "--data.tasks_per_batch=4"],
    "Reptile": ["--config", "configs/sinusoid/reptile.yaml", "--data.tasks_per_batch=4"],
    "MAMLPlusPlus": [  # Omniglot: per-step BatchNorm weights and the ways linked to the head
        "--config",
        "configs/omniglot_5w1s/mamlpp.yaml",
        "--data.query_shots=2",
        "--data.tasks_per_batch=2",
        "--model.backbone.init_args.hidden_channels=8",
        "--model.init_args.inner_steps=2",
        "--model.init_args.eval_inner_steps=2",
    ],
}


def exported_algorithms() -> list[type]:
    return [
        obj
        for name in algorithms.__all__
        if inspect.isclass(obj := getattr(algorithms, name)) and issubclass(obj, MetaLearner) and obj is not MetaLearner
    ]


def test_every_exported_algorithm_is_covered():
    names = {cls.__name__ for cls in exported_algorithms()}
    assert names, "no algorithms exported"
    assert names <= set(SETUPS), f"add {names - set(SETUPS)} to SETUPS"
    assert names <= set(CLI_CONFIGS), f"add {names - set(CLI_CONFIGS)} to CLI_CONFIGS"


@pytest.mark.parametrize("name", sorted(SETUPS))
def test_finite_loss_and_a_gradient_for_every_trainable_parameter(name):
    torch.manual_seed(0)
    model, dm = SETUPS[name]()
    batch = next(iter(dm.train_dataloader()))
    loss, stats = model.meta_loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert stats["loss"].shape == (len(batch),)
    loss.backward()
    for param_name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, f"{name}: {param_name} got no gradient"
            assert torch.isfinite(param.grad).all(), f"{name}: {param_name} has a non-finite gradient"
    assert sum(p.grad.abs().sum() for p in model.parameters() if p.grad is not None) > 0


def eval_predictions(model: MetaLearner, batch) -> list[torch.Tensor]:
    model.eval()
    return list(model(batch).predictions.detach())


@pytest.mark.parametrize("name", sorted(SETUPS))
def test_checkpoint_round_trip_gives_the_same_predictions(name, tmp_path):
    pl.seed_everything(0)
    model, dm = SETUPS[name]()
    trainer = pl.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        inference_mode=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    assert "train/loss" in trainer.progress_bar_metrics  # the running meta-loss is on the bar
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    batch = next(iter(dm.val_dataloader()))
    expected = eval_predictions(model, batch)
    fresh = SETUPS[name]()[0]  # fresh weights, overwritten by the checkpoint
    # Modules the caller builds (the CLI: from the config) are passed again, as the backbone is: an
    # update rule with weights of its own, a learned inner loss (MeTAL's networks).
    injected = {"update_rule": fresh.update_rule} if name in CALLER_BUILT_UPDATE_RULES else {}
    if getattr(fresh, "inner_loss", None) is not None:
        injected["inner_loss"] = fresh.inner_loss
    restored = type(model).load_from_checkpoint(path, backbone=fresh.backbone, **injected)
    assert restored.hparams == model.hparams
    for got, want in zip(eval_predictions(restored, batch), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_evaluation_refuses_inference_mode_with_a_clear_message():
    model, dm = SETUPS["MAML"]()
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, inference_mode=True, limit_val_batches=1)
    with pytest.raises(RuntimeError, match=r"inference_mode=False"):
        trainer.validate(model, datamodule=dm)


def test_a_non_finite_meta_loss_stops_training_naming_the_step_and_the_cause():
    model = MAML(MLP(), inner_lr=1e30)
    trainer = pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(FloatingPointError, match=r"MAML: meta-loss is (nan|inf) at global step 0.*inner_lr"):
        trainer.fit(model, datamodule=SinusoidDataModule(tasks_per_batch=2))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CLI_CONFIGS))
def test_short_fit_through_the_real_cli(name, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cli = run_cli(
        [
            "fit",
            *CLI_CONFIGS[name],
            "--trainer.max_steps=3",
            "--trainer.val_check_interval=3",
            "--data.val_tasks=4",
            "--data.test_tasks=4",
            "--data.eval_tasks_per_batch=2",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert cli.trainer.global_step == 3
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert metrics["test/tasks"] == 4 and torch.isfinite(torch.tensor(metrics["test/loss"]))
    print(json.dumps(metrics))
