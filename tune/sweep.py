"""Run a sweep: validate, start or attach to Ray, run the trials, write the results.

Everything that can be wrong with a sweep's inputs is checked before Ray starts: the space file,
every key against the real CLI parser with the base config, the metric's direction, and the
scheduler/search/worker combination. Then Ray Tune runs one `lightning-meta fit` per trial
(`tune.trial`), with ASHA (default), PBT or no scheduler, random/grid or Optuna search, and one
W&B run per trial (grouped by the sweep's name, logged from the driver by Ray's
`WandbLoggerCallback`, which finishes each run cleanly even when the scheduler stops the trial;
offline unless W&B credentials exist). The sweep's settings are saved beside Tune's own state
(`sweep.json`), so `--resume` needs only the sweep's name and carries on where it was interrupted:
finished trials are kept, unfinished ones resume from their last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_meta.checkpoint_io import atomic_write_bytes
from tune.report import TrialRow, plot_metric, rank, write_best_yaml, write_results_csv
from tune.space import ConfigChecker, SearchSpace, SpaceError, metric_mode, parse_space, replay_command
from tune.trial import TrialSpec, run_trial

SETTINGS_FILE = "sweep.json"
SCHEDULERS = ("asha", "pbt", "fifo")
SEARCHES = ("random", "optuna")
LOCAL_SYNC_PERIOD_S = 10
"""Seconds between syncs of the sweep's state to local storage (Tune's default is 300)."""
RUNTIME_OPTIONS = ("resume", "address", "num_cpus", "ray_temp_dir", "verbose", "storage_path", "name", "max_concurrent")
"""Options that may differ when a sweep is resumed: where and how it runs, not what it is."""


@dataclass
class SweepSettings:
    """A sweep, as the command line describes it (`python -m tune --help` documents each).

    Args:
        config: the base `lightning-meta` config.
        space: the search space YAML.
        trial_args: `lightning-meta fit` arguments common to every trial.
        num_samples: samples drawn from the space (with grids: per grid point).
        metric: the reported metric to optimise.
        mode: `min` or `max`; None derives it from the metric's name.
        scheduler: `asha`, `pbt` or `fifo`.
        search: `random` (random and grid sampling) or `optuna`.
        name: the experiment's folder under `storage_path`; None makes one from the file names.
        storage_path: where results and checkpoints go (local folder or URI, e.g. s3://...).
        address: Ray cluster to attach to (`auto`, `host:port`); None uses `RAY_ADDRESS` or
            starts a private local cluster.
        num_cpus: CPUs of a private local cluster (None: all).
        cpus_per_trial: CPUs per trial (None: one per worker).
        gpus_per_trial: GPUs per trial, split over its workers.
        workers_per_trial: processes per trial; more than one trains with DDP through Ray Train.
        max_concurrent: trials running at once (None: as many as resources allow).
        max_failures: retries of a crashed trial, from its last checkpoint.
        max_t: ASHA's largest budget in validations (None: derived from the config).
        grace_period: validations before ASHA may stop a trial.
        reduction_factor: ASHA keeps 1/reduction_factor of the trials at each rung.
        perturbation_interval: validations between PBT's exploit/explore steps.
        seed: seed of the search algorithm.
        resume: continue the sweep `name` (or the latest one of this config and space).
        wandb: log each trial to W&B (offline unless logged in).
        wandb_project: the W&B project.
        keep_checkpoints: checkpoints kept per trial (None: 2, or 4 under PBT, whose trials
            clone each other's checkpoints).
        ray_temp_dir: Ray's temp dir for a private local cluster.
        verbose: Tune's console verbosity (0-3).
    """

    config: str
    space: str
    trial_args: tuple[str, ...] = ()
    num_samples: int = 10
    metric: str = "val/loss"
    mode: str | None = None
    scheduler: str = "asha"
    search: str = "random"
    name: str | None = None
    storage_path: str = "logs/sweeps"
    address: str | None = None
    num_cpus: int | None = None
    cpus_per_trial: float | None = None
    gpus_per_trial: float = 0.0
    workers_per_trial: int = 1
    max_concurrent: int | None = None
    max_failures: int = 0
    max_t: int | None = None
    grace_period: int = 1
    reduction_factor: float = 2.0
    perturbation_interval: int = 2
    seed: int | None = None
    resume: bool = False
    wandb: bool = True
    wandb_project: str = "lightning-meta"
    keep_checkpoints: int | None = None
    ray_temp_dir: str | None = None
    verbose: int = 1
    space_data: dict[str, Any] | None = field(default=None, repr=False)


@dataclass
class SweepOutcome:
    """What a sweep produced.

    Args:
        experiment_path: Tune's experiment folder (results, checkpoints, `sweep.json`).
        rows: one per trial, best first.
        best: the best trial's row (None if no trial reported the metric).
        results_csv: the results table.
        best_yaml: the best trial's resolved config.
        plot: the metric against each swept hyperparameter.
        wall_s: the sweep's wall time, Ray start-up included.
        interrupted: the sweep was stopped (Ctrl+C) before every trial ended; `--resume` goes on.
    """

    experiment_path: str
    rows: list[TrialRow]
    best: TrialRow | None
    results_csv: Path | None
    best_yaml: Path | None
    plot: Path | None
    wall_s: float
    interrupted: bool = False


def _is_uri(path: str) -> bool:
    return "://" in path


def _storage(path: str) -> str:
    return path if _is_uri(path) else str(Path(path).expanduser().resolve())


def _default_name(settings: SweepSettings) -> str:
    return f"{Path(settings.space).stem}-{Path(settings.config).parent.name}-{Path(settings.config).stem}"


def _find_resumable(settings: SweepSettings) -> Path:
    storage = Path(_storage(settings.storage_path))
    if settings.name:
        path = storage / settings.name
        if not (path / SETTINGS_FILE).is_file():
            raise SpaceError(f"--resume: no sweep named {settings.name!r} under {storage} (no {SETTINGS_FILE})")
        return path
    prefix = _default_name(settings) + "-"
    candidates = sorted(p for p in storage.glob(prefix + "*") if (p / SETTINGS_FILE).is_file())
    if not candidates:
        raise SpaceError(f"--resume: no sweep of this config and space under {storage}: pass --name")
    return candidates[-1]


def _load_saved(settings: SweepSettings) -> SweepSettings:
    """The saved settings of the sweep to resume, with this run's runtime options."""
    path = _find_resumable(settings)
    saved = json.loads((path / SETTINGS_FILE).read_text())
    for key in ("config", "space"):
        given = getattr(settings, key)
        if given and Path(given).resolve() != Path(saved[key]).resolve():
            raise SpaceError(f"--resume: sweep {path.name} was run with --{key} {saved[key]}, not {given}")
    runtime = {key: getattr(settings, key) for key in RUNTIME_OPTIONS}
    runtime["name"] = path.name
    fields = {f.name for f in dataclasses.fields(SweepSettings) if f.init}
    merged = {k: v for k, v in saved.items() if k in fields} | runtime
    merged["trial_args"] = tuple(merged["trial_args"])
    return SweepSettings(**merged)


@dataclass
class _Plan:
    settings: SweepSettings
    space: SearchSpace
    checker: ConfigChecker
    mode: str
    reports: int | None
    spec: TrialSpec


def _expected_reports(checker: ConfigChecker, space: SearchSpace) -> int | None:
    """Validations a trial that runs to its end reports, when the config says so plainly."""
    config = checker.parse({p.key: p.args for p in space.params if p.is_constant})
    max_steps = checker.get(config, "trainer.max_steps")
    interval = checker.get(config, "trainer.val_check_interval")
    every_epoch = checker.get(config, "trainer.check_val_every_n_epoch")
    if isinstance(interval, int) and not isinstance(interval, bool) and every_epoch is None and max_steps:
        return max_steps // interval if max_steps > 0 else None
    return None


def plan(settings: SweepSettings) -> _Plan:
    """Check everything about a sweep that can be checked without Ray.

    Raises:
        SpaceError: for a bad space, key, value, metric or combination of options.
    """
    if settings.space_data is not None:
        space = parse_space(settings.space_data, source=settings.space)
    else:
        from tune.space import load_space

        space = load_space(settings.space)
    if not Path(settings.config).is_file():
        raise SpaceError(f"--config {settings.config}: no such file")
    checker = ConfigChecker(settings.config, settings.trial_args)
    checker.check(space)
    try:
        mode = settings.mode or metric_mode(settings.metric)
    except ValueError as error:
        raise SpaceError(str(error)) from None
    if mode not in ("min", "max"):
        raise SpaceError(f"--mode must be min or max, not {mode!r}")
    if settings.scheduler not in SCHEDULERS:
        raise SpaceError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, not {settings.scheduler!r}")
    if settings.search not in SEARCHES:
        raise SpaceError(f"--search must be one of {', '.join(SEARCHES)}, not {settings.search!r}")
    if settings.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise SpaceError("--search optuna needs Optuna: pip install 'lightning-meta[optuna]'") from None
        grids = [p.key for p in space.params if p.kind == "grid"]
        if grids:
            raise SpaceError(f"{space.source}: Optuna samples; it cannot run grid entries ({', '.join(grids)})")
    workers = settings.workers_per_trial
    if workers < 1 or settings.num_samples < 1:
        raise SpaceError("--workers-per-trial and --num-samples must be at least 1")
    if settings.scheduler == "pbt":
        if workers > 1:
            raise SpaceError("--scheduler pbt needs single-process trials (--workers-per-trial 1)")
        if not [p for p in space.swept if p.kind != "grid"]:
            raise SpaceError(f"{space.source}: PBT mutates sampled entries; this space has only grids")
    if workers == 1 and settings.gpus_per_trial > 1:
        raise SpaceError("one process uses one GPU: for several, pass --workers-per-trial equal to --gpus-per-trial")
    base = checker.parse({p.key: p.probe_values()[0] for p in space.params})
    strategy, devices = checker.get(base, "trainer.strategy"), checker.get(base, "trainer.devices")
    if workers == 1 and ("ddp" in str(strategy).lower() or str(devices) not in ("auto", "1", "None")):
        raise SpaceError(
            f"the base config asks for trainer.strategy={strategy}, trainer.devices={devices}: Lightning's own "
            "DDP cannot run inside a Tune trial; use --workers-per-trial N (DDP through Ray Train) instead"
        )
    name = settings.name or f"{_default_name(settings)}-{time.strftime('%Y%m%d-%H%M%S')}"
    settings = dataclasses.replace(settings, name=name)
    cpus = settings.cpus_per_trial if settings.cpus_per_trial is not None else float(workers)
    spec = TrialSpec(
        config=str(Path(settings.config).resolve()),
        args=tuple(settings.trial_args),
        cwd=os.getcwd(),
        storage_path=_storage(settings.storage_path),
        experiment=name,
        workers=workers,
        cpus=cpus,
        gpus=settings.gpus_per_trial,
        restore_optimizer_config=settings.scheduler == "pbt",
        test_after_fit=checker.get(base, "test_after_fit") is not None,
        keep_checkpoints=_keep(settings),
        metric=settings.metric,
    )
    return _Plan(settings, space, checker, mode, _expected_reports(checker, space), spec)


def _keep(settings: SweepSettings) -> int:
    if settings.keep_checkpoints is not None:
        return settings.keep_checkpoints
    return 4 if settings.scheduler == "pbt" else 2


def _wandb_mode() -> str:
    """The W&B mode trials log with: the user's `WANDB_MODE`, else offline unless logged in."""
    from lightning_meta.cli import wandb_logged_in

    if "WANDB_MODE" in os.environ:
        return os.environ["WANDB_MODE"]
    return "online" if wandb_logged_in() else "offline"


def _init_ray(settings: SweepSettings, spec: TrialSpec, env: dict[str, str]) -> bool:
    """Start or attach to Ray unless already connected; returns whether this call connected."""
    import ray

    if ray.is_initialized():
        return False
    address = settings.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}, "log_to_driver": settings.verbose > 0}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(
            address="local",
            num_cpus=settings.num_cpus,
            # Ray Train trials stopped early free their CPUs only with the dashboard's agent
            # running (shared/STACK.md); single-process trials do not need it.
            include_dashboard=spec.workers > 1,
            _temp_dir=settings.ray_temp_dir,
            **kwargs,
        )
    return True


def _ray_train_concurrency(spec: TrialSpec) -> int:
    """How many Ray Train trials fit in the cluster at once.

    Each trial's driver holds 0.01 CPU while its workers wait for theirs; with more trials
    started than fit, the drivers' fractions leave no trial enough CPUs for its workers and all
    of them wait forever (seen on 2 CPUs: two trials at 0.01 + 2 x 0.995 each).
    """
    import ray

    resources = ray.cluster_resources()
    fits = [resources.get("CPU", 0.0) / spec.cpus]
    if spec.gpus:
        fits.append(resources.get("GPU", 0.0) / spec.gpus)
    return max(1, math.floor(min(fits) + 1e-6))


def _unfinished(experiment_path: str) -> int:
    """Trials the saved experiment state holds as not yet ended (after Ctrl+C: the running ones)."""
    from ray.tune import ExperimentAnalysis

    trials = ExperimentAnalysis(experiment_path).trials
    return sum(t.status not in ("TERMINATED", "ERROR") for t in trials)


def _scheduler(p: _Plan) -> Any:
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining

    s = p.settings
    if s.scheduler == "asha":
        # One more than the validations a trial makes: a trial then ends by itself rather than
        # being stopped by ASHA at its last report (the rungs are the same either way).
        max_t = s.max_t or ((p.reports + 1) if p.reports else 100)
        return ASHAScheduler(
            time_attr="training_iteration",
            max_t=max_t,
            grace_period=s.grace_period,
            reduction_factor=s.reduction_factor,
        )
    if s.scheduler == "pbt":
        tune_space = p.space.to_tune()
        mutations = {q.key: tune_space[q.key] for q in p.space.swept if q.kind != "grid"}
        return PopulationBasedTraining(
            time_attr="training_iteration",
            perturbation_interval=s.perturbation_interval,
            hyperparam_mutations=mutations,
        )
    return None


def _search(p: _Plan) -> Any:
    s = p.settings
    if s.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=s.seed)
    from ray.tune.search import BasicVariantGenerator

    # Tune ignores TuneConfig.max_concurrent_trials (with a warning) for a generator instance.
    return BasicVariantGenerator(random_state=s.seed, max_concurrent=s.max_concurrent or 0)


def _wandb_callback(p: _Plan) -> Any:
    from tune.wandb_logging import TrialWandbCallback

    s = p.settings
    return TrialWandbCallback(
        local_storage=p.spec.local_storage,
        project=s.wandb_project,
        group=s.name,
        job_type="sweep-trial",
        tags=[Path(s.config).stem, Path(s.space).stem],
        upload_checkpoints=False,
    )


def _tuner(p: _Plan, experiment_path: str, restore: bool) -> Any:
    import ray.tune

    s, spec = p.settings, p.spec
    trainable: Any = ray.tune.with_parameters(run_trial, spec=spec)
    # A Ray Train trial itself only drives a TorchTrainer: 0.01 CPU ({"cpu": 0} is refused), the
    # rest goes to its workers (TrialSpec.worker_resources); see shared/STACK.md.
    resources = {"cpu": 0.01} if spec.workers > 1 else {"cpu": spec.cpus, "gpu": spec.gpus}
    trainable = ray.tune.with_resources(trainable, resources)
    if restore:
        return ray.tune.Tuner.restore(experiment_path, trainable=trainable, resume_unfinished=True)
    callbacks = [_wandb_callback(p)] if s.wandb and os.environ.get("WANDB_MODE") != "disabled" else []
    run_config = ray.tune.RunConfig(
        name=s.name,
        storage_path=spec.storage_path,
        callbacks=callbacks,
        failure_config=ray.tune.FailureConfig(max_failures=s.max_failures),
        checkpoint_config=ray.tune.CheckpointConfig(num_to_keep=spec.keep_checkpoints),
        # Tune restores a sweep from the state it last synced to storage, every 5 minutes by
        # default: a driver killed (SIGKILL, a lost node) would rerun the trials that ended
        # since. A local copy is cheap, so sync it as often as the state is saved (~10 s).
        sync_config=ray.tune.SyncConfig(
            sync_artifacts=not spec.local_storage, sync_period=LOCAL_SYNC_PERIOD_S if spec.local_storage else 300
        ),
        verbose=s.verbose,
    )
    tune_config = ray.tune.TuneConfig(
        metric=s.metric,
        mode=p.mode,
        scheduler=_scheduler(p),
        search_alg=_search(p),
        num_samples=s.num_samples,
        # Random/grid search limits concurrency in its generator (_search); Tune wraps a Searcher.
        max_concurrent_trials=s.max_concurrent if s.search != "random" else None,
        # A trial's process pays ~5-10 s of imports (torch, Lightning) before its first step;
        # reusing it for the next trial skips that. Each trial is a fresh CLI run in it.
        reuse_actors=True,
    )
    return ray.tune.Tuner(trainable, param_space=p.space.to_tune(), tune_config=tune_config, run_config=run_config)


def replay_arguments(settings: SweepSettings) -> tuple[str, ...]:
    """The common arguments of a trial's replay command: a Ray Train trial replays with DDP."""
    args = tuple(settings.trial_args)
    if settings.workers_per_trial > 1:
        accelerator = "gpu" if settings.gpus_per_trial else "cpu"
        args += (f"--trainer.devices={settings.workers_per_trial}", "--trainer.strategy=ddp")
        args += (f"--trainer.accelerator={accelerator}",)
    return args


def _rows(results: Any, p: _Plan) -> list[TrialRow]:
    s = p.settings
    keys = [q.key for q in p.space.params]
    rows = []
    for result in results:
        metrics = result.metrics or {}
        overrides = {k: result.config[k] for k in keys if result.config and k in result.config}
        history = result.metrics_dataframe
        values = []
        if history is not None and s.metric in history:
            values = [float(v) for v in history[s.metric] if isinstance(v, (int, float)) and math.isfinite(v)]
        best = (min(values) if p.mode == "min" else max(values)) if values else None
        last = metrics.get(s.metric)
        error = ""
        if result.error is not None:
            text = str(result.error).strip().splitlines()
            error = next((line for line in reversed(text) if line.strip()), type(result.error).__name__)[:300]
        rows.append(
            TrialRow(
                trial_id=metrics.get("trial_id") or Path(result.path).name,
                status="ERROR" if result.error is not None else "TERMINATED",
                overrides=overrides,
                iterations=int(metrics.get("training_iteration") or 0),
                last=float(last) if isinstance(last, (int, float)) else None,
                best=best,
                step=metrics.get("step"),
                time_s=metrics.get("time_total_s"),
                path=result.path,
                error=error,
                replay=replay_command(s.config, replay_arguments(s), overrides),
            )
        )
    done = [r.iterations for r in rows if r.status == "TERMINATED"]
    expected = p.reports or (max(done) if done else 0)
    if s.scheduler == "asha":
        for r in rows:
            r.stopped_early = r.status == "TERMINATED" and 0 < r.iterations < expected
    return rank(rows, p.mode)


def write_outputs(p: _Plan, rows: list[TrialRow], out: Path) -> tuple[Path, Path | None, Path | None]:
    """Write results.csv, best.yaml and the plot into `out` (see tune.report)."""
    s = p.settings
    out.mkdir(parents=True, exist_ok=True)
    keys = [q.key for q in p.space.params]
    csv_path = write_results_csv(rows, out / "results.csv", s.metric, keys)
    best = rows[0] if rows and rows[0].last is not None and math.isfinite(rows[0].last) else None
    best_yaml = None
    if best is not None:
        header = [
            f"Best trial of sweep {s.name}: {s.metric}={best.last:.6g} at its last validation "
            f"(step {best.step}), {best.iterations} validations, trial {best.trial_id}.",
            f"Sweep: python -m tune --config {s.config} --space {s.space}",
            "Replay it: lightning-meta fit --config <this file>",
            f"or:        {best.replay}",
        ]
        ddp = {}
        if s.workers_per_trial > 1:  # a Ray Train trial is this DDP run (tasks_per_batch is per process)
            ddp = {"trainer.devices": s.workers_per_trial, "trainer.strategy": "ddp"}
            ddp["trainer.accelerator"] = "gpu" if s.gpus_per_trial else "cpu"
        best_yaml = write_best_yaml(p.checker.dump({**best.overrides, **ddp}), out / "best.yaml", header)
    plot = plot_metric(rows, p.space, s.metric, p.mode, out / f"{s.metric.replace('/', '_')}.png")
    return csv_path, best_yaml, plot


def _print_summary(p: _Plan, outcome: SweepOutcome) -> None:
    s = p.settings
    errors = [r for r in outcome.rows if r.status == "ERROR"]
    stopped = sum(r.stopped_early for r in outcome.rows)
    print(f"\nsweep {s.name}: {len(outcome.rows)} trials in {outcome.wall_s:.0f} s, {stopped} stopped early, "
          f"{len(errors)} failed; results in {outcome.experiment_path}")  # fmt: skip
    for r in outcome.rows[:5]:
        values = " ".join(f"{k.rsplit('.', 1)[-1]}={v:.4g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={v}"
                          for k, v in r.overrides.items())  # fmt: skip
        print(f"  {r.trial_id} {r.status:<10} {s.metric}={r.last} ({r.iterations} validations) {values}")
    for r in errors:
        print(f"  FAILED {r.trial_id}: {r.error}  (log: {r.path}/error.txt)")
    if outcome.best is not None:
        print(f"best: {s.metric}={outcome.best.last:.6g}\n  {outcome.best.replay}")
        print(f"  lightning-meta fit --config {outcome.best_yaml}")
    print(f"table: {outcome.results_csv}\nplot:  {outcome.plot}")


def run_sweep(settings: SweepSettings) -> SweepOutcome:
    """Validate, run (or resume) a sweep and write its outputs.

    Uses the Ray connection of the caller if there is one, else starts or attaches to a cluster
    (and disconnects at the end).

    Raises:
        SpaceError: before anything runs, for anything `plan` refuses.
    """
    start = time.time()
    if settings.resume:
        settings = _load_saved(settings)
    p = plan(settings)
    s, spec = p.settings, p.spec
    experiment_path = f"{spec.storage_path.rstrip('/')}/{s.name}"
    os.environ["WANDB_MODE"] = _wandb_mode()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Every validation checkpoints (ASHA and PBT need it), so Tune's "snapshotting often" hint
    # would fire on every sweep; local snapshots cost milliseconds.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    env = {"WANDB_MODE": os.environ["WANDB_MODE"], "JSONARGPARSE_DEPRECATION_WARNINGS": "off"}
    connected = _init_ray(s, spec, env)
    try:
        import ray.tune

        restore = settings.resume and ray.tune.Tuner.can_restore(experiment_path)
        if settings.resume and not restore:
            raise SpaceError(f"--resume: {experiment_path} holds no Tune state to restore")
        if not restore and spec.local_storage:
            Path(experiment_path).mkdir(parents=True, exist_ok=True)
            saved = {k: v for k, v in dataclasses.asdict(s).items() if k not in RUNTIME_OPTIONS}
            saved |= {"name": s.name, "space_data": {q.key: _entry(q) for q in p.space.params}}
            atomic_write_bytes(Path(experiment_path) / SETTINGS_FILE, (json.dumps(saved, indent=2) + "\n").encode())
        if spec.workers > 1 and s.max_concurrent is None:
            p.settings = s = dataclasses.replace(s, max_concurrent=_ray_train_concurrency(spec))
        results = _tuner(p, experiment_path, restore).fit()
        rows = _rows(results, p)
        interrupted = _unfinished(experiment_path) > 0
    finally:
        if connected:
            import ray

            ray.shutdown()
    if interrupted:
        print(f"\nsweep {s.name} interrupted; finished trials are kept. Go on with:")
        print(f"  python -m tune --resume --name {s.name} --storage-path {spec.storage_path}")
        return SweepOutcome(experiment_path, rows, None, None, None, None, time.time() - start, interrupted=True)
    out = Path(experiment_path) if spec.local_storage else Path("logs/sweeps") / s.name
    csv_path, best_yaml, plot = write_outputs(p, rows, out)
    best = rows[0] if best_yaml is not None else None
    outcome = SweepOutcome(experiment_path, rows, best, csv_path, best_yaml, plot, time.time() - start)
    _print_summary(p, outcome)
    return outcome


def _entry(param: Any) -> Any:
    if param.kind == "value":
        return {"value": param.args}
    return {param.kind: list(param.args)}
