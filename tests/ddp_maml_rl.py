"""Run one MAML-RL TRPO step and save its step (as the gradient SGD applies) and a validation:
`tests/test_maml_rl.py` launches this as a subprocess, since Lightning's `ddp` re-executes
`sys.argv` (a pytest session must never be re-executed; shared/STACK.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl
import torch

from lightning_meta.algorithms import MAMLRL
from lightning_meta.data import RLTaskDataModule
from lightning_meta.envs import Navigation2D
from tests.ddp_gradients import fit_validate_and_save, one_step_trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--tasks-per-batch", type=int, required=True)
    parser.add_argument("--outer", choices=("trpo", "optimizer"), default="trpo")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0)
    family = Navigation2D(horizon=4)
    model = MAMLRL(family, hidden_sizes=(8,), trajectories=3, outer=args.outer)
    # 5 validation tasks: 3 + 2 over two ranks, so the uneven gather is exercised too.
    data = RLTaskDataModule(family, tasks_per_batch=args.tasks_per_batch, val_tasks=5, eval_tasks_per_batch=5)
    params = lambda m: {n: p.detach().clone() for n, p in m.named_parameters()}  # noqa: E731
    fit_validate_and_save(one_step_trainer(args.devices, args.out), model, data, args.out, params=params)


if __name__ == "__main__":
    main()
