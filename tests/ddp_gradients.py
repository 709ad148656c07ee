"""Run one meta-training step per case and save its (DDP-averaged) gradient and a validation.

`tests/conftest.py` launches this twice per pytest session (one process, then 2 gloo processes),
each launch running every case the session's tests ask for, one after the other: a launch costs
seconds of imports and process-group set-up, a case a fraction of one. It is a subprocess since
Lightning's `ddp` re-executes `sys.argv` (a pytest session must never be re-executed;
shared/STACK.md). Later Trainers of a launch reuse its processes and process group (the launcher
sets `LOCAL_RANK`, so it starts no new processes)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl
import torch

from lightning_meta.algorithms import (
    CAVIA,
    MAML,
    MAMLRL,
    PEARL,
    RL2,
    MAMLPlusPlus,
    MatchingNetworks,
    MetaSGD,
    ProtoNet,
    RelationNetworks,
    Reptile,
    Siamese,
)
from lightning_meta.data import RLTaskDataModule
from lightning_meta.envs import Navigation2D, TabularMDP
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


Case = tuple[pl.LightningModule, pl.LightningDataModule, dict[str, Callable]]


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


def params(model: pl.LightningModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def rl2_case(tasks_per_batch: int) -> Case:
    family = TabularMDP(states=4, actions=3, horizon=3, episodes=2)
    # One PPO epoch of one minibatch: the step's gradient is the mean over all ranks' trials.
    model = RL2(family, hidden_size=8, ppo_epochs=1, minibatches=1)
    data = RLTaskDataModule(family, tasks_per_batch=tasks_per_batch, val_tasks=5, eval_tasks_per_batch=5)
    return model, data, {"value_stats": lambda m: m.value_stats()}


def maml_rl_case(tasks_per_batch: int) -> Case:
    # The TRPO step is saved as the gradient SGD applies, and the parameters after it.
    family = Navigation2D(horizon=4)
    model = MAMLRL(family, hidden_sizes=(8,), trajectories=3)
    data = RLTaskDataModule(family, tasks_per_batch=tasks_per_batch, val_tasks=5, eval_tasks_per_batch=5)
    return model, data, {"params": params}


def pearl_case(tasks_per_batch: int) -> Case:
    family = Navigation2D(horizon=5, episodes=2)
    # One gradient step on a meta-batch of every task this rank holds (all of this step's): each
    # task's data, z samples and replay indices come from its own generator, so the union of the
    # ranks' batches is exactly the single process's batch.
    model = PEARL(
        family,
        hidden_size=8,
        layers=2,
        encoder_hidden_size=8,
        encoder_layers=1,
        gradient_steps=1,
        meta_batch=8,
        batch_size=6,
        context_batch=4,
    )
    # A pool of 8 tasks, so 2 ranks × 4 hold disjoint tasks. (max_steps=1 is the encoder's
    # optimizer step: every gradient exists by then, from one backward.)
    data = RLTaskDataModule(family, tasks_per_batch=tasks_per_batch, val_tasks=5, eval_tasks_per_batch=5, train_pool=8)
    return model, data, {"held": lambda m: sorted(m.replay)}


def supervised_case(name: str) -> Callable[[int], Case]:
    def build(tasks_per_batch: int) -> Case:
        return ALGORITHMS[name](), SyntheticClassesDataModule(tasks_per_batch=tasks_per_batch, val_tasks=5), {}

    return build


# name: (the single process's tasks per step, which two ranks split in halves; the builder of the
# model, the DataModule on `tasks_per_batch` tasks per rank with 5 validation tasks (3 + 2 over two
# ranks, so the uneven gather is exercised too), and what else to save: name -> f(trained model)).
CASES: dict[str, tuple[int, Callable[[int], Case]]] = {
    **{name: (4, supervised_case(name)) for name in ALGORITHMS},
    "rl2": (8, rl2_case),
    "maml-rl": (4, maml_rl_case),
    "pearl": (8, pearl_case),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", required=True, help=f"comma-separated, of: {', '.join(CASES)}")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--out-dir", required=True, help="<case>.pt (and <case>.half.pt) are written here")
    parser.add_argument(
        "--half",
        action="store_true",
        help="one process only: also fit each case on half its tasks (<case>.half.pt): a different gradient",
    )
    args = parser.parse_args()
    cases = args.cases.split(",")
    if unknown := [c for c in cases if c not in CASES]:
        parser.error(f"unknown cases {unknown}: choose from {list(CASES)}")
    if args.half and args.devices != 1:
        parser.error("--half runs in the single process only")
    torch.set_num_threads(1)
    out_dir = Path(args.out_dir)
    # Test hook for the relaunch in `tests.helpers.launch_ddp_cases`: "<case>:<marker file>" aborts
    # the process at that case once (the marker records that it did).
    abort_case, _, marker = os.environ.get("DDP_GRADIENTS_ABORT_ONCE", "").partition(":")
    for case in cases:
        tasks, build = CASES[case]
        if case == abort_case and not Path(marker).exists():
            print(f"case {case}: aborting once (DDP_GRADIENTS_ABORT_ONCE)", flush=True)
            Path(marker).touch()
            os.abort()
        runs = [(tasks // args.devices, out_dir / f"{case}.pt")]
        runs += [(tasks // 2, out_dir / f"{case}.half.pt")] if args.half else []
        for tasks_per_batch, out in runs:
            print(f"case {case}: {tasks_per_batch} tasks per process -> {out}", flush=True)
            pl.seed_everything(0)
            model, data, extra = build(tasks_per_batch)
            fit_validate_and_save(one_step_trainer(args.devices, str(out)), model, data, str(out), **extra)


if __name__ == "__main__":
    main()
