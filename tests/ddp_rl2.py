"""Run one RL² PPO step and save the (DDP-averaged) gradient and a validation: `tests/test_rl2.py`
launches this as a subprocess, since Lightning's `ddp` re-executes `sys.argv` (a pytest session
must never be re-executed; shared/STACK.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl
import torch

from lightning_meta.algorithms import RL2
from lightning_meta.data import RLTaskDataModule
from lightning_meta.envs import TabularMDP
from tests.ddp_gradients import fit_validate_and_save, one_step_trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--tasks-per-batch", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0)
    family = TabularMDP(states=4, actions=3, horizon=3, episodes=2)
    # One PPO epoch of one minibatch: the step's gradient is the mean over all ranks' trials.
    model = RL2(family, hidden_size=8, ppo_epochs=1, minibatches=1)
    # 5 validation tasks: 3 + 2 over two ranks, so the uneven gather is exercised too.
    data = RLTaskDataModule(family, tasks_per_batch=args.tasks_per_batch, val_tasks=5, eval_tasks_per_batch=5)
    trainer = one_step_trainer(args.devices, args.out)
    fit_validate_and_save(trainer, model, data, args.out, value_stats=lambda m: m.value_stats())


if __name__ == "__main__":
    main()
