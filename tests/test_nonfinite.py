"""A non-finite meta-loss stops training naming the step, the algorithm and the rate to lower,
keeping the last good checkpoint; or, with `NonFinite(action="skip")`, the step is dropped
(weights and optimizer state untouched), counted and logged, and training goes on."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_meta.algorithms import MAML, ProtoNet
from lightning_meta.callbacks import NonFinite
from lightning_meta.data import SinusoidDataModule
from lightning_meta.models import MLP, Conv4
from tests.helpers import SyntheticClassesDataModule


class PoisonAt(pl.Callback):
    """Make the meta-loss NaN at the given global steps (a NaN in every support input)."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.weights[trainer.global_step] = {k: v.clone() for k, v in pl_module.state_dict().items()}
        if trainer.global_step in self.steps:
            batch.support_x.fill_(float("nan"))


def trainer(tmp_path, *callbacks: pl.Callback, max_steps: int = 6) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps,
        logger=pl.loggers.CSVLogger(tmp_path, flush_logs_every_n_steps=1),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True), *callbacks],
    )


def test_a_nan_meta_loss_stops_with_step_algorithm_and_key_and_keeps_the_last_good_checkpoint(tmp_path):
    model = MAML(MLP(hidden_sizes=[8]), inner_lr=0.01)
    run = trainer(tmp_path, PoisonAt({3}))
    with pytest.raises(
        FloatingPointError, match=r"MAML: meta-loss is nan at global step 3.*model\.init_args\.inner_lr"
    ):
        run.fit(model, datamodule=SinusoidDataModule(tasks_per_batch=2, val_tasks=2))
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    restored = MAML.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", backbone=MLP(hidden_sizes=[8]))
    assert all(torch.isfinite(p).all() for p in restored.parameters())
    # The failing step changed nothing: the module still holds the checkpoint's weights.
    for name, value in model.state_dict().items():
        assert torch.equal(value, last["state_dict"][name]), name
    assert (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().count("\n") >= 3


@pytest.mark.parametrize("algorithm", ["maml", "protonet"])
def test_skip_drops_the_step_counts_and_logs_it_and_training_goes_on(tmp_path, algorithm):
    if algorithm == "maml":
        model, data = MAML(MLP(hidden_sizes=[8]), inner_lr=0.01), SinusoidDataModule(tasks_per_batch=2, val_tasks=2)
    else:
        model, data = ProtoNet(Conv4(hidden_channels=4)), SyntheticClassesDataModule()
    poison = PoisonAt({2, 3})
    run = trainer(tmp_path, poison, NonFinite("skip"))
    with pytest.warns(UserWarning, match=r"meta-loss is nan at global step 2: skipped this optimizer step \(1 skipped"):
        run.fit(model, datamodule=data)
    assert run.global_step == 6 and model.skipped_steps == 2
    before, after = poison.weights[2], poison.weights[4]
    assert all(torch.equal(before[k], after[k]) for k in before)  # steps 2 and 3 changed nothing
    assert not all(torch.equal(poison.weights[4][k], poison.weights[5][k]) for k in before)  # step 4 did
    assert all(torch.isfinite(p).all() for p in model.parameters())
    optimizer = run.optimizers[0]
    assert {int(s["step"]) for s in optimizer.state.values()} == {4}  # Adam counted 4 real steps, not 6
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["lightning_meta"]["skipped_steps"] == 2
    log = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "train/skipped_steps" in log.splitlines()[0]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("action", ["skip", "raise"])
def test_under_ddp_a_nan_on_one_rank_makes_every_rank_skip_or_stop_together(tmp_path, action):
    from tests.test_resume import SINUSOID_MAML, fit

    result = fit(
        tmp_path,
        SINUSOID_MAML,
        "--trainer.callbacks+=tests.fault_callbacks.NanOnRank",
        "--trainer.callbacks.step=4",
        "--trainer.callbacks.rank=1",
        "--trainer.callbacks+=lightning_meta.callbacks.NonFinite",
        f"--trainer.callbacks.action={action}",
        devices=2,
    )  # a rank deciding alone would leave the other waiting in the gradient all-reduce: a timeout
    if action == "raise":
        assert result.returncode != 0
        assert "MAML: meta-gradient is not finite" in result.stderr or "MAML: meta-loss is nan" in result.stderr
        assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    else:
        assert result.returncode == 0, result.stderr[-3000:]
        last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
        assert last["global_step"] == 12 and last["lightning_meta"]["skipped_steps"] == 1
        assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
