"""`python -m tune` against a Ray head the test starts on loopback (`ray start --head`).

One head for the module (2 CPUs), stopped afterwards by its own process ids and temp dir. The
sweeps run as a user runs them, as subprocesses attaching with `--address` or `RAY_ADDRESS`: a
trial that crashes (retried from its last checkpoint up to `--max-failures`, then failed), an
interrupted sweep resumed, a driver SIGKILLed and its sweep resumed.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.tune_helpers import REPO, TINY, ray_head

pytestmark = pytest.mark.ray

SINUSOID = str(REPO / "configs/sinusoid/maml.yaml")


HEAD_AUTH: dict[str, str] = {}  # the head's token settings, which every client gets


@pytest.fixture(scope="module")
def head():
    with ray_head(num_cpus=2, dashboard=False) as (address, auth):
        HEAD_AUTH.update(auth)
        yield address
    HEAD_AUTH.clear()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "PL_", "RAY_ADDRESS", "RAY_AUTH"))}
    env.update(WANDB_MODE="disabled", PYTHONPATH=str(REPO), **HEAD_AUTH, **extra)
    return env


def _sweep(tmp_path: Path, space: str, *options: str, trial_args=TINY, env=None) -> list[str]:
    (tmp_path / "space.yaml").write_text(space)
    command = [sys.executable, "-m", "tune", "--config", SINUSOID, "--space", str(tmp_path / "space.yaml")]
    command += ["--storage-path", str(tmp_path / "sweeps"), "--num-samples", "1", *options, "--", *trial_args]
    return command


def _run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)


def _table(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open()))


def _mtime(path: Path) -> float:
    return path.stat().st_mtime


def _reports(trial_dir: Path) -> list[dict]:
    path = trial_dir / "result.json"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_a_crashing_trial_is_reported_and_the_sweep_finishes_on_the_head(head, tmp_path):
    space = "model.init_args.crash_at_step: {grid: [null, 7]}\n"
    command = _sweep(tmp_path, space, "--name", "crash")
    command += ["--model.class_path=tests.tune_helpers.CrashingMAML"]
    result = _run(command, _env(RAY_ADDRESS=head))
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert "Started a local Ray instance" not in out, "the sweep did not attach to the head"
    rows = {r["model.init_args.crash_at_step"]: r for r in _table(tmp_path / "sweeps/crash/results.csv")}
    assert rows["null"]["status"] == "TERMINATED" and rows["null"]["iterations"] == "4"
    assert rows["7"]["status"] == "ERROR" and "deliberate crash at step 7" in rows["7"]["error"]
    assert rows["7"]["iterations"] == "1"  # its validation at step 5 was reported before the crash
    assert (Path(rows["7"]["path"]) / "error.txt").is_file()
    assert "FAILED" in result.stdout and (tmp_path / "sweeps/crash/best.yaml").is_file()


def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(head, tmp_path):
    # 6 validations a trial; the second trial sleeps 0.5 s a step, so it is still running when
    # the test interrupts it after its second validation (unslowed, its last 4 validations took
    # 0.3 s and it could finish before the Ctrl+C landed).
    args = (*TINY, "--trainer.max_steps=30")
    space = "model.init_args.step_sleep: {grid: [0.0, 0.5]}\n"
    options = ("--name", "resume", "--max-concurrent", "1", "--scheduler", "fifo", "--address", head)
    command = _sweep(tmp_path, space, *options, trial_args=args)
    command += ["--model.class_path=tests.tune_helpers.CrashingMAML"]
    (tmp_path / "space.yaml").write_text(space)
    log = (tmp_path / "first.log").open("w")
    sweep = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    experiment = tmp_path / "sweeps/resume"
    deadline = time.time() + 300
    try:
        while True:
            trials = sorted(experiment.glob("run_trial_*"))
            if len(trials) == 2 and len(_reports(trials[0])) == 6 and len(_reports(trials[1])) >= 2:
                break
            assert sweep.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
            assert time.time() < deadline, "the first trial did not finish in time"
            time.sleep(0.5)
        sweep.send_signal(signal.SIGINT)  # Ctrl+C
        assert sweep.wait(timeout=120) == 130, (tmp_path / "first.log").read_text()[-4000:]
    finally:
        if sweep.poll() is None:
            sweep.kill()
    finished = (trials[0] / "result.json").read_bytes()
    interrupted_steps = [r["step"] for r in _reports(trials[1])]
    assert len(interrupted_steps) < 6 and "--resume --name resume" in (tmp_path / "first.log").read_text()

    resume = [sys.executable, "-m", "tune", "--resume", "--name", "resume"]
    resume += ["--storage-path", str(tmp_path / "sweeps"), "--address", head]
    result = _run(resume, _env())
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert (trials[0] / "result.json").read_bytes() == finished, "the finished trial was run again"
    steps = [r["step"] for r in _reports(trials[1])]
    assert steps[: len(interrupted_steps)] == interrupted_steps
    # Resumed from the last checkpoint Tune had saved: the last validation before Ctrl+C, or the
    # one before it when the interrupt came between a report and the state snapshot; not step 0.
    resumed = steps[len(interrupted_steps)]
    assert interrupted_steps[-1] <= resumed <= interrupted_steps[-1] + 5, f"not resumed from a checkpoint: {steps}"
    assert sorted(set(steps)) == [5, 10, 15, 20, 25, 30], steps
    table = _table(experiment / "results.csv")
    assert [r["status"] for r in table] == ["TERMINATED", "TERMINATED"] and {r["iterations"] for r in table} == {"6"}


def test_a_crashing_trial_is_retried_from_its_checkpoint_up_to_max_failures_then_failed(head, tmp_path):
    attempts = tmp_path / "attempts"
    space = (
        "model.init_args.crash_times: {grid: [1, 10]}\n"  # crashes once, then recovers / always
        "model.init_args.crash_at_step: 7\n"
        f"model.init_args.attempts_file: {attempts}\n"
    )
    command = _sweep(tmp_path, space, "--name", "retry", "--max-failures", "2", "--scheduler", "fifo")
    command += ["--model.class_path=tests.tune_helpers.CrashingMAML"]
    result = _run(command, _env(RAY_ADDRESS=head))
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    rows = {r["model.init_args.crash_times"]: r for r in _table(tmp_path / "sweeps/retry/results.csv")}
    # Crashed at step 7, retried from the checkpoint of its validation at step 5, then finished.
    assert Path(f"{attempts}.1").read_text().split() == ["0", "5"]
    assert rows["1"]["status"] == "TERMINATED" and rows["1"]["iterations"] == "4" and not rows["1"]["error"]
    # 1 attempt + 2 retries, each from step 5, then marked failed; the sweep went on.
    assert Path(f"{attempts}.10").read_text().split() == ["0", "5", "5"]
    assert rows["10"]["status"] == "ERROR" and "deliberate crash at step 7" in rows["10"]["error"]


def test_a_sigkilled_driver_resumes_without_rerunning_trials_finished_before_its_last_snapshot(head, tmp_path):
    args = (*TINY, "--trainer.max_steps=40")  # 8 validations a trial
    space = "model.init_args.step_sleep: {grid: [0.0, 1.0]}\n"  # the second trial is slow: time to kill
    options = ("--name", "killed", "--max-concurrent", "1", "--scheduler", "fifo", "--address", head)
    command = _sweep(tmp_path, space, *options, trial_args=args)
    command += ["--model.class_path=tests.tune_helpers.CrashingMAML"]
    log = (tmp_path / "first.log").open("w")
    sweep = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    experiment = tmp_path / "sweeps/killed"
    deadline, first_ended = time.time() + 300, None
    try:
        while True:
            trials = sorted(experiment.glob("run_trial_*"))
            if first_ended is None and trials and len(_reports(trials[0])) == 8:
                first_ended = time.time()
            # Tune saves its state every >= 10 s and syncs it to storage every 10 s
            # (tune.sweep.LOCAL_SYNC_PERIOD_S): 25 s after trial 0 ended, storage knows it did.
            if first_ended and time.time() > first_ended + 25 and len(trials) == 2 and _reports(trials[1]):
                break
            assert sweep.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
            assert time.time() < deadline, "the first trial did not finish in time"
            time.sleep(0.5)
    finally:
        sweep.kill()  # SIGKILL: no handler runs, nothing is flushed
        sweep.wait(timeout=30)
    assert sweep.returncode == -signal.SIGKILL
    assert len(_reports(trials[1])) < 8, "the second trial ended before the kill"
    assert not (experiment / "results.csv").exists()
    finished = (trials[0] / "result.json").read_bytes()

    resume = [sys.executable, "-m", "tune", "--resume", "--name", "killed"]
    resume += ["--storage-path", str(tmp_path / "sweeps"), "--address", head]
    result = _run(resume, _env())
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert (trials[0] / "result.json").read_bytes() == finished, "the finished trial was run again"
    table = _table(experiment / "results.csv")
    assert [r["status"] for r in table] == ["TERMINATED", "TERMINATED"], table
    assert {r["step"] for r in table} == {"40"}, table
