"""Run one PEARL training step (collection + one gradient step) and save the (DDP-averaged)
gradient and a validation: `tests/test_pearl.py` launches this as a subprocess, since Lightning's
`ddp` re-executes `sys.argv` (a pytest session must never be re-executed; shared/STACK.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl
import torch

from lightning_meta.algorithms import PEARL
from lightning_meta.data import RLTaskDataModule
from lightning_meta.envs import Navigation2D
from tests.ddp_gradients import fit_validate_and_save, one_step_trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--tasks-per-batch", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0)
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
    # A pool of 8 tasks, so 2 ranks × 4 hold disjoint tasks; 5 validation tasks: 3 + 2 over two ranks.
    data = RLTaskDataModule(
        family, tasks_per_batch=args.tasks_per_batch, val_tasks=5, eval_tasks_per_batch=5, train_pool=8
    )
    # max_steps=1 is the encoder's optimizer step: every gradient exists by then (one backward).
    trainer = one_step_trainer(args.devices, args.out)
    fit_validate_and_save(trainer, model, data, args.out, held=lambda m: sorted(m.replay))


if __name__ == "__main__":
    main()
