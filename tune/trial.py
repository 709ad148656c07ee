"""One trial = one `lightning-meta fit` run of the base config with the trial's overrides.

The trial function builds the same argument list a user would type (base config, the sweep's
common arguments, the sampled `--key=value` overrides) and runs it through
`lightning_meta.cli.run_cli`, adding only what connects the run to Ray: a report callback, a CSV
logger in the trial's directory, no progress bar, no test at the end (a sweep selects on
validation; the chosen config is tested when it is replayed), and `--ckpt_path` when Tune resumes
the trial from a checkpoint. So every trial replays with `lightning-meta fit` and the printed
overrides, and nothing in `lightning_meta` imports Ray.

Multi-process trials (`workers > 1`) run the same argument list on every worker of a Ray Train
`TorchTrainer`, with Ray's DDP strategy and cluster environment: Lightning's own DDP launchers do
not work inside a Tune trial (`ddp` kills the actor, `ddp_fork` hangs, `ddp_spawn` never reports;
see shared/STACK.md).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.tune

from tune.space import overrides_to_args

CALLBACKS = "tune.callbacks"


@dataclass(frozen=True)
class TrialSpec:
    """What every trial of a sweep shares; sent to the trial processes by Ray.

    Args:
        config: absolute path of the base config.
        args: `lightning-meta fit` arguments common to every trial.
        cwd: the sweep's working directory; trials run there, so relative paths in the config
            and arguments mean what they mean on the command line.
        storage_path: where Tune keeps the experiment (absolute local path or URI).
        experiment: the experiment (sweep) name, a folder under `storage_path`.
        workers: processes per trial; more than one runs Ray Train DDP.
        cpus: CPUs per trial (all workers together).
        gpus: GPUs per trial (all workers together).
        restore_optimizer_config: re-apply configured optimizer hyperparameters after a restore
            (PBT mutates them).
        test_after_fit: whether the CLI has `--test_after_fit` (turned off in trials).
        keep_checkpoints: checkpoints a Ray Train trial keeps (Tune keeps its own the same).
        metric: the sweep's metric (a trial whose value is not finite is ended).
    """

    config: str
    args: tuple[str, ...] = ()
    cwd: str = field(default_factory=os.getcwd)
    storage_path: str = ""
    experiment: str = ""
    workers: int = 1
    cpus: float = 1.0
    gpus: float = 0.0
    restore_optimizer_config: bool = False
    test_after_fit: bool = True
    keep_checkpoints: int = 2
    metric: str = "val/loss"

    @property
    def local_storage(self) -> bool:
        """Whether `storage_path` is a local folder (else a URI such as s3://)."""
        return "://" not in self.storage_path

    def worker_resources(self) -> dict[str, float]:
        """Resources of each Ray Train worker: the trial's CPUs less 0.01 for the trial's driver."""
        resources = {"CPU": round((self.cpus - 0.01) / self.workers, 4)}
        if self.gpus:
            resources["GPU"] = self.gpus / self.workers
        return resources


def _callback(name: str, **init_args: Any) -> str:
    return json.dumps({"class_path": f"{CALLBACKS}.{name}", "init_args": init_args})


def trial_arguments(
    spec: TrialSpec,
    overrides: Mapping[str, Any],
    log_dir: str,
    callbacks: list[str],
    ckpt_path: str | None = None,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """The `lightning-meta fit` argument list of one trial.

    Args:
        spec: the sweep's shared settings.
        overrides: the trial's sampled values, by dotted key.
        log_dir: where the trial's CSV logs and Lightning files go.
        callbacks: JSON class specs appended to `trainer.callbacks`.
        ckpt_path: a Lightning checkpoint to resume from.
        extra: arguments for this kind of trial (strategy, devices).
    """
    logger = [{"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": log_dir}}]
    args = ["fit", "--config", spec.config, *spec.args, *overrides_to_args(overrides)]
    args += [
        f"--trainer.logger={json.dumps(logger)}",
        f"--trainer.default_root_dir={log_dir}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *(f"--trainer.callbacks+={callback}" for callback in callbacks),
        *extra,
    ]
    if spec.test_after_fit:
        args.append("--test_after_fit=false")
    if ckpt_path:
        args.append(f"--ckpt_path={ckpt_path}")
    return args


def trial_dir_name() -> str:
    """The current trial's folder name (the same under the storage path and Ray's staging dirs)."""
    return Path(ray.tune.get_context().get_trial_dir()).name


def trial_storage_dir(spec: TrialSpec) -> str:
    """The current trial's folder under the storage path (a local path or a URI)."""
    return f"{spec.storage_path.rstrip('/')}/{spec.experiment}/{trial_dir_name()}"


def _log_dir(spec: TrialSpec) -> str:
    # Local storage: write logs straight into the trial's folder beside Tune's result.json.
    # Remote storage: write into Ray's per-trial working dir, which the sweep syncs up
    # (SyncConfig(sync_artifacts=True)).
    return trial_storage_dir(spec) if spec.local_storage else os.getcwd()


@contextlib.contextmanager
def _checkpoint_file(checkpoint: Any) -> Iterator[str | None]:
    """A local path of the Lightning checkpoint inside a Ray checkpoint, or None."""
    from tune.callbacks import CHECKPOINT_NAME

    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as directory:
        path = Path(directory, CHECKPOINT_NAME)
        yield str(path) if path.is_file() else None


def run_trial(config: dict[str, Any], spec: TrialSpec) -> None:
    """The Tune trainable: run one trial (see the module docstring).

    Args:
        config: the trial's sampled values, by dotted key (Tune's trial config).
        spec: the sweep's shared settings (bound with `tune.with_parameters`).
    """
    log_dir = _log_dir(spec)
    os.chdir(spec.cwd)
    if spec.workers > 1:
        _run_ray_train(config, spec, log_dir)
        return
    from lightning_meta.cli import run_cli

    callbacks = [_callback("TuneReportCallback", metric=spec.metric)]
    if spec.restore_optimizer_config:
        callbacks.append(_callback("ApplyConfiguredOptimizer"))
    extra = ("--trainer.accelerator=gpu", "--trainer.devices=1") if spec.gpus else ()
    with _checkpoint_file(ray.tune.get_checkpoint()) as ckpt_path:
        run_cli(trial_arguments(spec, config, log_dir, callbacks, ckpt_path, extra))


def _run_ray_train(config: dict[str, Any], spec: TrialSpec, log_dir: str) -> None:
    """Run the trial on `spec.workers` Ray Train workers; their reports reach Tune."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"overrides": dict(config), "spec": spec, "log_dir": log_dir},
        scaling_config=ray.train.ScalingConfig(
            num_workers=spec.workers, use_gpu=spec.gpus > 0, resources_per_worker=spec.worker_resources()
        ),
        # The same name and storage on a restarted trial: Ray Train finds its checkpoints there.
        run_config=ray.train.RunConfig(
            name="ray_train",
            storage_path=trial_storage_dir(spec),
            callbacks=[TuneReportCallback()],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=spec.keep_checkpoints),
        ),
    )
    trainer.fit()


def _worker_loop(train_config: dict[str, Any]) -> None:
    """One Ray Train worker: the trial's `lightning-meta fit` with Ray's DDP strategy."""
    import ray.train

    from lightning_meta.cli import run_cli

    spec: TrialSpec = train_config["spec"]
    os.chdir(spec.cwd)
    extra = (
        '--trainer.strategy={"class_path": "ray.train.lightning.RayDDPStrategy"}',
        '--trainer.plugins=[{"class_path": "ray.train.lightning.RayLightningEnvironment"}]',
        "--trainer.devices=auto",
        f"--trainer.accelerator={'gpu' if spec.gpus else 'cpu'}",
    )
    callbacks = [_callback("TrainReportCallback", metric=spec.metric)]
    with _checkpoint_file(ray.train.get_checkpoint()) as ckpt_path:
        args = trial_arguments(spec, train_config["overrides"], train_config["log_dir"], callbacks, ckpt_path, extra)
        run_cli(args)
