"""Exact resume: a run SIGKILLed mid-epoch and resumed from its last checkpoint ends with the
same weights (bitwise, CPU) and logs the same metrics at every step as a run never stopped."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import clean_env

MAX_STEPS, EVERY, KILL_AT = 12, 3, 8
"""12 steps over epochs of 5; checkpoints every 3 steps; killed as the 9th step starts, so
the last checkpoint is step 6 (mid-epoch 2) and steps 7-8 are lost and redone."""

SINUSOID_MAML = [
    "--model=lightning_meta.algorithms.MAML",
    "--model.init_args.inner_lr=0.01",
    "--model.init_args.inner_steps=2",
    "--model.init_args.backbone=lightning_meta.models.MLP",
    "--model.init_args.backbone.init_args.hidden_sizes=[16,16]",
    "--data=lightning_meta.data.SinusoidDataModule",
    "--data.init_args.tasks_per_batch=4",
    "--data.init_args.val_tasks=4",
    "--data.init_args.eval_tasks_per_batch=4",
]
SYNTHETIC_PROTONET = [
    "--model=lightning_meta.algorithms.ProtoNet",
    "--model.init_args.backbone=lightning_meta.models.Conv4",
    "--model.init_args.backbone.init_args.hidden_channels=4",
    "--data=tests.helpers.SyntheticClassesDataModule",
    "--data.init_args.tasks_per_batch=2",
    "--data.init_args.val_tasks=4",
]
# Augmented training tasks: the augmentation is drawn from each task's generator, so it resumes too.
AUGMENTED_PROTONET = [
    *SYNTHETIC_PROTONET,
    "--data.init_args.augment=lightning_meta.data.Augmentation",
    "--data.init_args.augment.init_args.rotation=15",
    "--data.init_args.augment.init_args.shift=0.1",
    "--data.init_args.augment.init_args.flip=0.5",
]
SETUPS = {"maml": SINUSOID_MAML, "protonet": SYNTHETIC_PROTONET, "protonet_augmented": AUGMENTED_PROTONET}


def fit(root: Path, setup: list[str], *extra: str, devices: int = 1) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "lightning_meta",
        "fit",
        "--seed_everything=0",
        *setup,
        "--data.init_args.batches_per_epoch=5",
        f"--trainer.max_steps={MAX_STEPS}",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.num_sanity_val_steps=0",
        f"--trainer.devices={devices}",
        "--trainer.accelerator=cpu",
        f"--trainer.strategy={'ddp' if devices > 1 else 'auto'}",
        # Every step's metrics reach the file before the kill could lose them.
        "--trainer.logger=pytorch_lightning.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={root}",
        "--trainer.logger.init_args.flush_logs_every_n_steps=1",
        f"--checkpoint.dirpath={root / 'checkpoints'}",
        f"--checkpoint.every_n_train_steps={EVERY}",
        "--checkpoint.save_top_k=-1",
        "--trainer.callbacks+=lightning_meta.callbacks.TaskBatching",
        "--trainer.callbacks.mode=loop",
        *extra,
    ]
    return subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=240, cwd=root)


def metrics(root: Path, version: int) -> dict[tuple[str, int], float]:
    """{(metric, step): value} of one CSVLogger version."""
    rows = list(csv.DictReader((root / "lightning_logs" / f"version_{version}" / "metrics.csv").open()))
    return {(k, int(r["step"])): float(v) for r in rows for k, v in r.items() if v and k not in ("step", "epoch")}


def final_weights(root: Path) -> dict[str, torch.Tensor]:
    return torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


def check_resume(tmp_path: Path, setup: list[str], devices: int = 1) -> None:
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    straight.mkdir(), broken.mkdir()
    done = fit(straight, setup, devices=devices)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = fit(
        broken,
        setup,
        "--trainer.callbacks+=tests.fault_callbacks.SigkillAt",
        f"--trainer.callbacks.step={KILL_AT}",
        devices=devices,
    )
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-3000:])
    last = torch.load(broken / "checkpoints" / "last.ckpt", weights_only=False)
    resumed_from = last["global_step"]
    assert resumed_from == KILL_AT // EVERY * EVERY == 6
    before = metrics(broken, 0)
    assert max(step for _, step in before) >= KILL_AT - 1  # the lost steps were logged, then lost

    resumed = fit(broken, setup, f"--ckpt_path={broken / 'checkpoints' / 'last.ckpt'}", devices=devices)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not resumable" not in resumed.stderr  # Lightning's warning for a loader it restarts

    want, got = final_weights(straight), final_weights(broken)
    assert torch.load(broken / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == MAX_STEPS
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name

    # The logged sequence: the killed run's steps before the checkpoint, then the resumed run's.
    expected = metrics(straight, 0)
    stitched = {k: v for k, v in before.items() if k[1] < resumed_from} | metrics(broken, 1)
    assert stitched == expected
    assert {k for k, _ in expected} >= {"train/loss", "val/loss"}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SETUPS))
def test_a_sigkilled_run_resumed_from_last_ckpt_equals_an_uninterrupted_run(name, tmp_path):
    check_resume(tmp_path, SETUPS[name])


@pytest.mark.slow
@pytest.mark.distributed
def test_a_sigkilled_two_process_ddp_run_resumes_exactly(tmp_path):
    check_resume(tmp_path, SINUSOID_MAML, devices=2)


def test_a_resumed_sampler_starts_at_the_saved_global_batch_once_then_runs_whole_epochs():
    from lightning_meta.data.sampler import MetaBatchSampler

    sampler = MetaBatchSampler(tasks_per_batch=2, batches_per_epoch=5, num_replicas=2, rank=1)
    sampler.resume_at = 7  # epoch 1, its third batch
    assert list(sampler) == [(30, 31), (34, 35), (38, 39)]  # global batch 7 = tasks 28..31 on, rank 1 takes 30, 31
    assert sampler.epoch == 1 and len(list(sampler)) == 5
    fresh = MetaBatchSampler(tasks_per_batch=2, batches_per_epoch=5, num_replicas=2, rank=1)
    fresh.set_epoch(1)
    assert list(fresh)[2:] == [(30, 31), (34, 35), (38, 39)]
