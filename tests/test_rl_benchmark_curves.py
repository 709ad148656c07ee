"""The validation curves of benchmarks/nav2d_pearl.py and nav2d_maml_rl.py record each validation's
own metrics at its own step (Lightning runs callbacks' `on_validation_epoch_end` before the
module's, which is where the metrics are logged: a callback there reads the previous validation)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


class LogsItsStep(pl.LightningModule):
    """Validation logs the global step it ran at under the names both curves read."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        for opt in self.optimizers():  # two, as PEARL's several: global_step counts both
            opt.zero_grad()
            self.manual_backward((self.weight - batch.mean()).pow(2).sum())
            opt.step()

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_epoch_end(self) -> None:
        step = float(self.global_step)
        for name in ("return", "return_before", "return_first", "return_last"):
            self.log(f"val/{name}", step)

    def configure_optimizers(self):
        return [torch.optim.SGD(self.parameters(), lr=0.1), torch.optim.SGD(self.parameters(), lr=0.1)]

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(64, 1), batch_size=1)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(2, 1), batch_size=1)


# PEARL's curve counts gradient steps (global_step over its optimizers), MAML-RL's the global step.
@pytest.mark.parametrize(
    ("script", "callback", "step_key", "value_key", "steps"),
    [
        ("nav2d_pearl", "CPUBudget", "gradient_steps", "return_first", [3, 6, 9]),
        ("nav2d_maml_rl", "Curve", "step", "return", [6, 12, 18]),
    ],
)
def test_each_validation_is_recorded_with_its_own_metrics(
    monkeypatch, tmp_path, script, callback, step_key, value_key, steps
):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    curve = getattr(importlib.import_module(script), callback)(cpu_seconds=3600)
    trainer = pl.Trainer(
        max_steps=18,  # 9 batches of 2 optimizer steps
        val_check_interval=3,
        num_sanity_val_steps=1,
        callbacks=[curve],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(LogsItsStep())
    assert [v[step_key] for v in curve.val] == steps  # every validation, none from the sanity check
    assert [v[value_key] for v in curve.val] == [6.0, 12.0, 18.0]  # ... each with the metrics it logged
