"""The `lightning-meta` command as a user runs it: entry points, default logging, the README."""

from __future__ import annotations

import csv
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_meta.cli import run_cli

REPO = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPT = Path(sys.executable).with_name("lightning-meta")


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_python_dash_m_and_the_console_script_show_the_subcommands():
    for command in ([sys.executable, "-m", "lightning_meta", "--help"], [str(CONSOLE_SCRIPT), "--help"]):
        out = run(command, REPO).stdout
        assert all(sub in out for sub in ("fit", "validate", "test"))


@pytest.mark.slow
def test_default_logging_is_wandb_offline_plus_csv_when_not_logged_in(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), NETRC=str(tmp_path / "no-netrc"), OMP_NUM_THREADS="1")
    config = REPO / "configs/sinusoid/maml.yaml"
    args = ["fit", "--config", str(config), "--trainer.max_steps=4", "--trainer.val_check_interval=2"]
    args += ["--data.val_tasks=4", "--data.test_tasks=8", "--trainer.log_every_n_steps=1"]
    result = run([str(CONSOLE_SCRIPT), *args], tmp_path, env)
    assert "logging offline" in result.stdout
    runs = list((tmp_path / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb")), "no offline W&B run was written"
    metrics_files = list((tmp_path / "logs" / "lightning_logs").rglob("metrics.csv"))
    assert len(metrics_files) == 1
    rows = list(csv.DictReader(metrics_files[0].open()))
    columns = set(rows[0])
    assert {"train/loss", "val/loss", "test/loss", "test/loss_before", "test/loss_ci95"} <= columns
    test_rows = [r for r in rows if r["test/loss"]]
    assert len(test_rows) == 1 and float(test_rows[0]["test/tasks"]) == 8


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [None, "true", "false"])
def test_enable_checkpointing_false_trains_without_writing_a_checkpoint(tmp_path, checkpointing):
    env = {k: v for k, v in os.environ.items() if k != "LIGHTNING_META_TRACEBACK"}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    args = ["fit", "--config", str(REPO / "configs/sinusoid/maml.yaml"), "--trainer.logger=false"]
    args += ["--trainer.max_steps=2", "--trainer.val_check_interval=2", "--data.val_tasks=4", "--data.test_tasks=4"]
    if checkpointing:
        args.append(f"--trainer.enable_checkpointing={checkpointing}")
    result = run([sys.executable, "-m", "lightning_meta", *args], tmp_path, env)
    assert "test/loss" in result.stdout  # trained, validated and tested (the config's test_after_fit)
    written = sorted(p.name for p in tmp_path.rglob("*.ckpt"))
    assert written == ([] if checkpointing == "false" else ["epoch=0-step=2.ckpt", "last.ckpt"])


def test_without_checkpointing_the_trainer_has_no_checkpoint_callback():
    config = str(REPO / "configs/sinusoid/maml.yaml")
    for flag, expected in [("true", True), ("false", False)]:
        args = ["--config", config, "--trainer.logger=false", f"--trainer.enable_checkpointing={flag}"]
        trainer = run_cli(args, run=False).trainer
        assert (trainer.checkpoint_callback is not None) is expected
        assert any(isinstance(c, ModelCheckpoint) for c in trainer.callbacks) is expected


def readme_commands() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            if line.startswith(("lightning-meta ", "python -m lightning_meta ")):
                commands.append(shlex.split(line))
    return commands


def test_every_config_the_readme_names_exists():
    names = set(re.findall(r"configs/[\w/.-]+\.yaml", (REPO / "README.md").read_text()))
    assert names, "the README names no config"
    missing = [n for n in names if not (REPO / n).is_file()]
    assert not missing, f"README names configs that do not exist: {missing}"


def test_every_lightning_meta_command_in_the_readme_parses(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    commands = readme_commands()
    assert len(commands) >= 3, "expected the README to show lightning-meta commands"
    for command in commands:
        args = command[1:] if command[0] == "lightning-meta" else command[3:]
        if args and args[0] in ("fit", "validate", "test"):
            with pytest.raises(SystemExit) as exit_info:
                run_cli([*args, "--print_config"])
            assert exit_info.value.code in (0, None), command
            assert "class_path" in capsys.readouterr().out
