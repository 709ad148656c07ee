"""`CPUTimeBudget`: training stops once the process has used its CPU-time budget (the
benchmarks' budget on a shared machine), and not before."""

from __future__ import annotations

import pytest

from lightning_meta.algorithms import MAML
from lightning_meta.callbacks import CPUTimeBudget
from lightning_meta.data import SinusoidDataModule
from lightning_meta.models import MLP
from tests.helpers import quiet_trainer


@pytest.mark.parametrize(("budget", "steps"), [(0.0, 1), (3600.0, 3)])
def test_training_stops_once_the_cpu_budget_is_spent(tmp_path, budget, steps):
    callback = CPUTimeBudget(budget)
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0, callbacks=[callback], default_root_dir=tmp_path)
    trainer.fit(MAML(MLP(hidden_sizes=[8]), inner_steps=1), datamodule=SinusoidDataModule(tasks_per_batch=2))
    assert trainer.global_step == steps
    assert callback.cpu_used() > 0 and callback.wall_used() > 0


def test_a_negative_budget_is_refused():
    with pytest.raises(ValueError, match="cpu_seconds=-1"):
        CPUTimeBudget(-1)
