"""Real local Ray Tune sweeps on sinusoid MAML: ASHA, W&B runs per trial, replay; Ray Train DDP.

Each test starts a private Ray cluster (`address="local"`, 2 CPUs, its own short temp dir,
removed after); `make test` runs them inside a loopback-only network namespace (Ray probes a
cloud metadata address on every start).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.tune_helpers import REPO, TINY, short_tmp, wandb_records
from tune.sweep import SweepSettings, run_sweep

pytestmark = pytest.mark.ray

CONSOLE_SCRIPT = Path(sys.executable).with_name("lightning-meta")


def _reports(trial_dir: str) -> list[dict]:
    return [json.loads(line) for line in (Path(trial_dir) / "result.json").read_text().splitlines()]


@pytest.fixture
def local_ray():
    import ray

    temp = short_tmp()
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=str(temp),
        log_to_driver=False,
        # Trials import tests.tune_helpers; W&B logs offline (the driver's variable is set by the test).
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}},
    )
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def test_local_sweep_asha_stops_bad_trials_logs_wandb_and_the_best_config_replays(local_ray, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    space = tmp_path / "lrs.yaml"
    # Two inner step sizes that adapt and two that barely move, two trials at a time.
    space.write_text("model.init_args.inner_lr: {grid: [0.05, 0.02, 1.0e-5, 1.0e-6]}\n")
    settings = SweepSettings(
        config=str(REPO / "configs/sinusoid/maml.yaml"),
        space=str(space),
        trial_args=(*TINY, "--model.init_args.optimizer.init_args.lr=0.01"),
        num_samples=1,
        name="lrs",
        storage_path=str(tmp_path / "sweeps"),
        max_concurrent=2,
        verbose=0,
    )
    outcome = run_sweep(settings)

    rows = outcome.rows
    assert len(rows) == 4 and all(r.status == "TERMINATED" for r in rows), rows
    reports = {r.trial_id: _reports(r.path) for r in rows}
    full = [r for r in rows if not r.stopped_early]
    stopped = [r for r in rows if r.stopped_early]
    assert full and all(r.iterations == 4 for r in full)  # 20 steps, a validation every 5
    assert stopped, f"ASHA stopped no trial: {rows}"
    for r in stopped:
        # Stopped at a rung because another trial had done better there.
        assert r.iterations < 4
        rung_value = reports[r.trial_id][-1]["val/loss"]
        rung = r.iterations - 1
        others = [reports[o.trial_id][rung]["val/loss"] for o in rows if o.iterations > rung and o is not r]
        assert min(others) < rung_value, (r, others)
    assert outcome.best is not None and not outcome.best.stopped_early
    assert outcome.best.overrides["model.init_args.inner_lr"] in (0.05, 0.02), "a non-adapting inner lr won"

    experiment = Path(outcome.experiment_path)
    table = list(csv.DictReader((experiment / "results.csv").open()))
    assert len(table) == 4 and table[0]["trial_id"] == outcome.best.trial_id
    assert {"status", "stopped_early", "val/loss (last)", "model.init_args.inner_lr", "replay"} <= set(table[0])
    assert (experiment / "val_loss.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((experiment / "sweep.json").read_text())
    assert saved["space_data"] == {"model.init_args.inner_lr": {"grid": [0.05, 0.02, 1e-5, 1e-6]}}

    # One W&B run per trial, grouped by the sweep's name, holding every reported validation.
    for row in outcome.rows:
        reported = reports[row.trial_id]
        (run_dir,) = (Path(row.path) / "wandb").glob("offline-run-*")
        run = wandb_records(run_dir)
        assert run["run"].run_group == "lrs" and run["run"].run_id == row.trial_id and run["exit"]
        assert json.loads(run["config"]["model.init_args.inner_lr"]) == row.overrides["model.init_args.inner_lr"]
        logged = [float(h["val/loss"]) for h in run["history"] if "val/loss" in h]
        assert logged == pytest.approx([r["val/loss"] for r in reported], rel=1e-6)
        assert len(logged) == row.iterations
        # The trial's own Lightning CSV log sits in its folder too.
        assert list(Path(row.path).glob("lightning_logs/version_*/metrics.csv"))

    # The best config is a complete `lightning-meta fit` config that reproduces the trial.
    best_yaml = experiment / "best.yaml"
    header = best_yaml.read_text().splitlines()[:4]
    assert header[0].startswith("# Best trial of sweep lrs: val/loss=") and "lightning-meta fit --config" in header[2]
    resolved = yaml.safe_load(best_yaml.read_text())
    assert resolved["model"]["init_args"]["inner_lr"] == outcome.best.overrides["model.init_args.inner_lr"]
    assert resolved["trainer"]["max_steps"] == 20
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MASTER_", "PL_"))}
    env.update(WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    replay_dir = tmp_path / "replay"
    replay_dir.mkdir()
    result = subprocess.run(
        [str(CONSOLE_SCRIPT), "fit", "--config", str(best_yaml)],
        cwd=replay_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (metrics,) = replay_dir.glob("logs/lightning_logs/version_*/metrics.csv")
    replayed = {int(r["step"]): float(r["val/loss"]) for r in csv.DictReader(metrics.open()) if r.get("val/loss")}
    # Lightning logs a validation at step s-1 for the s-th meta-step's validation.
    assert replayed[outcome.best.step - 1] == pytest.approx(outcome.best.last, rel=1e-4)


def test_a_trial_of_two_ddp_workers_runs_through_ray_train_and_reports_each_validation(tmp_path):
    """`python -m tune --workers-per-trial 2` on a laptop: a private cluster with the dashboard.

    One trial (~50 s here); that ASHA stops such trials cleanly was checked by hand with two
    (see the README's Sweeps section): a second trial costs another ~50 s of worker start-up.
    """
    temp = short_tmp()
    (tmp_path / "space.yaml").write_text("model.init_args.inner_lr: {choice: [0.05]}\n")
    command = [sys.executable, "-m", "tune", "--config", str(REPO / "configs/sinusoid/maml.yaml")]
    command += ["--space", str(tmp_path / "space.yaml"), "--storage-path", str(tmp_path / "sweeps"), "--name", "ddp"]
    command += ["--num-samples", "1", "--workers-per-trial", "2", "--num-cpus", "2", "--ray-temp-dir", str(temp)]
    command += ["--", *TINY, "--trainer.max_steps=10"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "PL_", "RAY_ADDRESS"))}
    env.update(WANDB_MODE="disabled")
    try:
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    (row,) = csv.DictReader((tmp_path / "sweeps/ddp/results.csv").open())
    assert row["status"] == "TERMINATED" and row["iterations"] == "2"
    assert "--trainer.devices=2 --trainer.strategy=ddp" in row["replay"]  # tasks_per_batch is per process
    best = yaml.safe_load((tmp_path / "sweeps/ddp/best.yaml").read_text())["trainer"]
    assert (str(best["devices"]), best["strategy"], best["accelerator"]) == ("2", "ddp", "cpu")
    trial = Path(row["path"])
    reports = _reports(str(trial))
    assert [r["step"] for r in reports] == [5, 10] and all("val/loss" in r for r in reports)
    # Ray Train kept the last --keep-checkpoints (2) Lightning checkpoints of the run.
    checkpoints = sorted(p for p in (trial / "ray_train").glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2 and all((p / "checkpoint.ckpt").is_file() for p in checkpoints)
    # Rank 0's CSV log.
    (metrics,) = trial.glob("lightning_logs/version_*/metrics.csv")
    assert any(row.get("val/loss") for row in csv.DictReader(metrics.open()))
