"""Small builders shared by the tests (and by the DDP script they launch)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from lightning_meta.data import Augmentation, EpisodicDataModule, FewShotTasks, TaskSource, TensorClasses
from lightning_meta.data.datamodule import split_augment


class SyntheticClassesDataModule(EpisodicDataModule):
    """Few-shot tasks over random 'images' with a per-class signal, so a model can learn something.

    Train, val and test have disjoint classes that share one structure (see `__init__`), so
    an evaluation score measures generalisation to new classes.

    Args:
        ways: classes per task.
        shots: support examples per class.
        query_shots: query examples per class.
        num_classes: classes in each split (3 × num_classes in all, none shared).
        image_size: side of the square single-channel images.
        tasks_per_batch: see `EpisodicDataModule`.
        val_tasks: see `EpisodicDataModule`.
        seed: see `EpisodicDataModule`.
        batches_per_epoch: see `EpisodicDataModule`.
        augment: augmentation of the training tasks (see `OmniglotDataModule`).
    """

    def __init__(
        self,
        ways: int = 3,
        shots: int = 2,
        query_shots: int = 2,
        num_classes: int = 10,
        image_size: int = 28,
        tasks_per_batch: int = 2,
        val_tasks: int = 4,
        seed: int = 0,
        batches_per_epoch: int = 10,
        augment: Augmentation | None = None,
    ) -> None:
        super().__init__(tasks_per_batch, batches_per_epoch, val_tasks, val_tasks, None, seed, 0, 0)
        self.ways, self.shots, self.query_shots, self.augment = ways, shots, query_shots, augment
        g = torch.Generator().manual_seed(1234)
        # Each split has classes of its own (as Omniglot's do), so a validation or test score
        # measures what a learner does on classes it never trained on, not memorisation. What
        # carries over is the structure: every class is a coarse 4×4 pattern of blocks (random
        # brightness per block) under per-pixel noise, so a learner that learns to read block
        # brightness on the training classes can tell new classes apart. (Classes with a random
        # value per pixel do not transfer: an 8-feature Conv4 learns the 10 training patterns.)
        coarse = torch.randn(3 * num_classes, 1, 4, 4, generator=g)
        centres = F.interpolate(coarse, size=(image_size, image_size), mode="nearest")
        centres = centres.reshape(3, num_classes, 1, 1, image_size, image_size)
        noise = 0.5 * torch.randn(3, num_classes, 8, 1, image_size, image_size, generator=g)
        self.splits = [TensorClasses(centres[i] + noise[i]) for i in range(3)]

    def build_sources(self) -> dict[str, TaskSource]:
        return {
            name: FewShotTasks(
                split, self.ways, self.shots, self.query_shots, augment=split_augment(self.augment, name)
            )
            for name, split in zip(("train", "val", "test"), self.splits, strict=True)
        }


def quiet_trainer(**overrides) -> pl.Trainer:
    """A `pl.Trainer` with no logger, checkpoints, progress bar or model summary; `overrides` pass through."""
    quiet = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return pl.Trainer(**{**quiet, **overrides})


def cli_fit_with_checkpoints(config: str, tmp_path, max_steps: int, every_n_train_steps: int, *overrides: str):
    """`lightning-meta fit --config configs/<config>` in-process, quiet, no time limit, checkpoints
    every `every_n_train_steps` under `<tmp_path>/ckpt`, no test after fit; `overrides` come last.
    Returns the LightningCLI (its `.model`, `.trainer`)."""
    from pathlib import Path

    from lightning_meta.cli import run_cli

    repo = Path(__file__).resolve().parents[1]
    args = [
        "fit",
        "--config",
        str(repo / "configs" / config),
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.max_time=null",
        f"--trainer.max_steps={max_steps}",
        f"--trainer.default_root_dir={tmp_path}",
        f"--checkpoint.dirpath={tmp_path}/ckpt",
        f"--checkpoint.every_n_train_steps={every_n_train_steps}",
        "--test_after_fit=false",
        *overrides,
    ]
    return run_cli(args)


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """The two modules' state dicts hold the same names and bit-identical tensors."""
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


# What a parent process's DDP or Lightning set-up leaves in the environment, which would make a
# subprocess join (or mimic) that run instead of starting its own.
DISTRIBUTED_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")
REPO = Path(__file__).resolve().parents[1]


def clean_env() -> dict[str, str]:
    """This environment for a subprocess that starts its own (DDP) run: no distributed or `PL_`
    variables, one thread per process (2 cores), the repository importable, W&B off."""
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV and not k.startswith("PL_")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["WANDB_MODE"] = "disabled"
    return env


def launch_ddp_cases(cases: list[str], devices: int, out_dir: Path, half: bool = False) -> None:
    """Run `tests/ddp_gradients.py` on `devices` gloo processes for every case in `cases` (one
    training step each, gradients and a validation saved under `out_dir`); fail with its output.

    A launch that *crashes* (killed by a signal, e.g. SIGABRT from "terminate called without an
    active exception", which killed the 2-process launch once in a fresh-clone run of the suite,
    during case cavia, and did not recur on rerun) is relaunched once for the case it was running and those after it:
    the cases are seeded one by one, so what they save does not depend on the launch, and the
    parity checks run on it unchanged. The crash is reported as a warning, with its output. A
    launch that exits with an error (a failing case, a bad argument) is never retried."""
    out_dir.mkdir(parents=True, exist_ok=True)
    script = Path(__file__).with_name("ddp_gradients.py")
    pending = list(cases)
    for attempt in (1, 2):
        command = [sys.executable, str(script), "--cases", ",".join(pending), "--devices", str(devices)]
        command += ["--out-dir", str(out_dir)] + (["--half"] if half else [])
        result = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=900)
        output = result.stdout[-4000:] + result.stderr[-4000:]
        if result.returncode == 0:
            return
        started = [line.split(":")[0].removeprefix("case ") for line in result.stdout.splitlines()]
        started = [c for c in started if c in pending]
        crashed = result.returncode < 0 or "terminate called" in result.stderr
        assert attempt == 1 and crashed and started, f"exit status {result.returncode}\n{output}"
        pending = pending[pending.index(started[-1]) :]
        warnings.warn(
            f"the {devices}-process launch crashed (exit status {result.returncode}) in case {started[-1]}; "
            f"relaunching cases {pending} once. Its output:\n{output}",
            stacklevel=2,
        )
