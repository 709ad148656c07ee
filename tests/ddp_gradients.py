"""Run one meta-training step and save the (DDP-averaged) meta-gradient: `tests/test_ddp.py`
launches this as a subprocess, since Lightning's `ddp` re-executes `sys.argv` (a pytest
session must never be re-executed; shared/STACK.md)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl
import torch

from lightning_meta.algorithms import (
    CAVIA,
    MAML,
    MAMLPlusPlus,
    MatchingNetworks,
    MetaSGD,
    ProtoNet,
    RelationNetworks,
    Reptile,
    Siamese,
)
from lightning_meta.losses import MeTALLoss
from lightning_meta.models import Conv4
from lightning_meta.update_rules import LearnedOptimizer, MetaLSTM
from tests.helpers import SyntheticClassesDataModule


def vmapped_maml() -> MAML:
    # The task-parallel path: tasks under torch.func.vmap, which needs a norm layer proven equal
    # to the loop under it (nn.BatchNorm2d is not).
    model = MAML(Conv4(hidden_channels=8, out_features=3, norm="plain_batch"), inner_lr=0.4, inner_steps=2)
    model.task_batching = "vmap"
    return model


ALGORITHMS = {
    "maml": lambda: MAML(Conv4(hidden_channels=8, out_features=3), inner_lr=0.4, inner_steps=2),
    "maml-vmap": vmapped_maml,
    "protonet": lambda: ProtoNet(Conv4(hidden_channels=8)),
    "metasgd": lambda: MetaSGD(Conv4(hidden_channels=8, out_features=3), inner_steps=2),
    # First order with the multi-step loss: every per-step BatchNorm copy must take part.
    "mamlpp": lambda: MAMLPlusPlus(
        Conv4(hidden_channels=8, out_features=3), inner_steps=2, multi_step_loss_epochs=10, first_order_epochs=10
    ),
    "reptile": lambda: Reptile(Conv4(hidden_channels=8, out_features=3), inner_steps=2),
    "siamese": lambda: Siamese(Conv4(hidden_channels=8), loss="koch"),
    "siamese-contrastive": lambda: Siamese(Conv4(hidden_channels=8), loss="contrastive"),
    "matching": lambda: MatchingNetworks(Conv4(hidden_channels=8), fce=True, fce_steps=2),
    "maml-learned-opt": lambda: MAML(
        Conv4(hidden_channels=8, out_features=3), inner_steps=2, update_rule=LearnedOptimizer(hidden_size=4)
    ),
    "maml-metalstm": lambda: MAML(
        Conv4(hidden_channels=8, out_features=3), inner_steps=2, update_rule=MetaLSTM(hidden_size=4)
    ),
    "maml-metal": lambda: MAML(
        Conv4(hidden_channels=8, out_features=3),
        inner_lr=0.4,
        inner_steps=2,
        inner_loss=MeTALLoss(ways=3, parameter_tensors=18, steps=2),
    ),
    "cavia": lambda: CAVIA(Conv4(hidden_channels=8, out_features=3), context_size=4, condition="film", inner_steps=2),
    "relation": lambda: RelationNetworks(
        Conv4(hidden_channels=8, pooled_blocks=2, flatten=False), feature_channels=8, feature_size=7
    ),
}


class SaveGradients(pl.Callback):
    """After backward (so after DDP's all-reduce), before the optimizer step: save every gradient."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_rank == 0:
            grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
            torch.save({"grads": grads, "world_size": trainer.world_size}, self.path)


def one_step_trainer(devices: int, out: str) -> pl.Trainer:
    """One training step in float64, on `devices` gloo processes, its gradient saved to `out`.

    `inference_mode=False`: gradient-based learners adapt inside validation (the others validate
    under `no_grad` then, with the same numbers)."""
    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        precision="64-true",
        max_steps=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
        callbacks=[SaveGradients(out)],
    )


def fit_validate_and_save(
    trainer: pl.Trainer, model: pl.LightningModule, data: pl.LightningDataModule, out: str, **extra: Callable
) -> None:
    """Fit (the one step), validate, and add the validation metrics and `extra` (name: a function
    of the trained model) to the saved gradient on rank 0."""
    trainer.fit(model, datamodule=data)
    (metrics,) = trainer.validate(model, datamodule=data, verbose=False)
    if trainer.global_rank == 0:
        saved = torch.load(out)
        torch.save({**saved, "val": metrics, **{k: f(model) for k, f in extra.items()}}, out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--algorithm", choices=list(ALGORITHMS), required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--tasks-per-batch", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--half-out",
        help="one process only: then also fit on half the tasks, saved here (one launch instead of two)",
    )
    args = parser.parse_args()
    if args.half_out and args.devices != 1:
        parser.error("--half-out runs in the single process only")
    torch.set_num_threads(1)
    runs = [(args.tasks_per_batch, args.out)] + ([(args.tasks_per_batch // 2, args.half_out)] if args.half_out else [])
    for tasks_per_batch, out in runs:
        pl.seed_everything(0)
        model = ALGORITHMS[args.algorithm]()
        # 5 validation tasks: 3 + 2 over two ranks, so the uneven gather is exercised too.
        data = SyntheticClassesDataModule(tasks_per_batch=tasks_per_batch, val_tasks=5)
        fit_validate_and_save(one_step_trainer(args.devices, out), model, data, out)


if __name__ == "__main__":
    main()
