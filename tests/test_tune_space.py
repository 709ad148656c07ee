"""Sweep pieces checked without starting Ray: spaces, CLI keys, metrics, results files, callbacks."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tune.report import TrialRow, plot_metric, rank, write_results_csv
from tune.space import ConfigChecker, SpaceError, load_space, metric_mode, overrides_to_args, parse_space
from tune.sweep import SweepSettings, plan

REPO = Path(__file__).resolve().parents[1]
SINUSOID = str(REPO / "configs/sinusoid/maml.yaml")
SWEEPS = sorted((REPO / "configs/sweeps").glob("*.yaml"))


@pytest.fixture(scope="module")
def checker():
    return ConfigChecker(SINUSOID)


def test_each_kind_becomes_the_matching_tune_domain():
    space = parse_space(
        {
            "model.init_args.inner_lr": {"loguniform": [1e-3, 1.0]},
            "model.init_args.optimizer.init_args.lr": {"uniform": [1e-4, 1e-2]},
            "model.init_args.inner_steps": {"randint": [1, 3]},
            "model.init_args.eval_inner_steps": {"choice": [5, 10]},
            "data.init_args.tasks_per_batch": {"grid": [4, 8]},
            "trainer.max_steps": 50,
            "model.init_args.first_order": {"value": True},
        }
    )
    tune = space.to_tune()
    assert [p.key for p in space.swept] == list(tune)[:5]
    assert tune["data.init_args.tasks_per_batch"] == {"grid_search": [4, 8]}
    assert tune["trainer.max_steps"] == 50 and tune["model.init_args.first_order"] is True
    inner = [tune["model.init_args.inner_lr"].sample() for _ in range(200)]
    # Log-uniform reaches the low decades.
    assert all(1e-3 <= v <= 1.0 for v in inner) and min(inner) < 1e-2 < max(inner)
    steps = {tune["model.init_args.inner_steps"].sample() for _ in range(200)}
    assert steps == {1, 2, 3}, "randint [low, high] includes both ends"
    assert {tune["model.init_args.eval_inner_steps"].sample() for _ in range(50)} == {5, 10}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"loguniform": [0.0, 1.0]}, "loguniform needs 0 < low < high"),
        ({"loguniform": [1.0, 0.1]}, "low < high"),
        ({"uniform": [1.0]}, r"uniform needs \[low, high\]"),
        ({"uniform": ["a", 2]}, "finite numbers"),
        ({"randint": [1.5, 3]}, "randint needs integers"),
        ({"randint": [5, 1]}, "low <= high"),
        ({"choice": []}, "non-empty list"),
        ({"grid": "abc"}, "non-empty list"),
        ({"logunifrom": [1e-3, 1.0]}, "not a distribution"),
        ({"uniform": [0, 1], "choice": [1]}, "not a distribution"),
    ],
)
def test_a_bad_entry_is_refused_naming_file_and_key(entry, message):
    with pytest.raises(SpaceError, match=message) as info:
        parse_space({"model.init_args.inner_lr": entry}, source="my_space.yaml")
    assert str(info.value).startswith("my_space.yaml: model.init_args.inner_lr: ")


def test_a_space_of_constants_or_not_a_mapping_is_refused():
    with pytest.raises(SpaceError, match="nothing to search"):
        parse_space({"trainer.max_steps": 10})
    with pytest.raises(SpaceError, match="non-empty mapping"):
        parse_space([1, 2])


def test_an_unknown_key_is_refused_by_the_real_cli_parser_naming_it(checker):
    space = parse_space({"model.init_args.inner_lrr": {"loguniform": [1e-3, 1.0]}}, source="typo.yaml")
    with pytest.raises(SpaceError) as info:
        checker.check(space)
    text = str(info.value)
    assert text.startswith("typo.yaml: model.init_args.inner_lrr=")
    assert "inner_lrr" in text.splitlines()[-1] or "'inner_lrr' is not accepted" in text


def test_a_float_range_on_an_integer_option_is_refused(checker):
    space = parse_space({"model.init_args.inner_steps": {"uniform": [1, 5]}}, source="s.yaml")
    with pytest.raises(SpaceError, match=r"s.yaml: model.init_args.inner_steps=1.0 \(uniform\) is refused"):
        checker.check(space)


def test_a_choice_value_the_option_cannot_take_is_refused(checker):
    space = parse_space({"model.init_args.inner_lr": {"choice": [0.1, "fast"]}}, source="s.yaml")
    with pytest.raises(SpaceError, match="inner_lr=fast"):
        checker.check(space)


@pytest.mark.parametrize("space_file", SWEEPS, ids=lambda p: p.name)
def test_every_sweep_space_validates_against_the_config_its_header_names(space_file):
    header = "\n".join(line for line in space_file.read_text().splitlines() if line.startswith("#"))
    assert header.startswith("# "), f"{space_file} needs a header comment saying what it searches"
    configs = re.findall(r"--config (\S+\.yaml)", header)
    assert configs, f"{space_file}: the header should show the sweep command with its --config"
    space = load_space(space_file)
    for config in configs:
        ConfigChecker(REPO / config).check(space)


def test_overrides_become_args_the_cli_parses_back_to_the_same_values(checker):
    overrides = {
        "model.init_args.inner_lr": 0.1 / 3,
        "model.init_args.first_order": True,
        "model.init_args.backbone.init_args.hidden_sizes": [8, 8],
        "data.init_args.tasks_per_batch": 7,
        "model.init_args.optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}},
    }
    args = overrides_to_args(overrides)
    assert args[0] == f"--model.init_args.inner_lr={0.1 / 3!r}"
    config = checker.parse(overrides)
    assert config.model.init_args.inner_lr == 0.1 / 3  # exact: floats go through repr
    assert config.model.init_args.first_order is True
    assert config.model.init_args.backbone.init_args.hidden_sizes == [8, 8]
    assert config.data.init_args.tasks_per_batch == 7
    assert config.model.init_args.optimizer.class_path == "torch.optim.SGD"
    assert yaml.safe_load(checker.dump(overrides))["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 0.5


@pytest.mark.parametrize(
    ("metric", "mode"),
    [("val/loss", "min"), ("val/acc", "max"), ("val/loss_before", "min"), ("test/accuracy", "max")],
)
def test_the_mode_follows_the_metric(metric, mode):
    assert metric_mode(metric) == mode


def test_a_metric_that_says_no_direction_asks_for_mode():
    with pytest.raises(ValueError, match="--mode"):
        metric_mode("val/tasks")


def _settings(tmp_path, **changes):
    space = tmp_path / "space.yaml"
    space.write_text("model.init_args.inner_lr: {loguniform: [1.0e-3, 1.0]}\n")
    return SweepSettings(config=SINUSOID, space=str(space), storage_path=str(tmp_path), **changes)


def test_plan_derives_the_budget_and_refuses_bad_combinations(tmp_path):
    p = plan(_settings(tmp_path, trial_args=("--trainer.max_steps=40", "--trainer.val_check_interval=10")))
    assert p.mode == "min" and p.reports == 4
    assert p.spec.config == SINUSOID and p.spec.args == ("--trainer.max_steps=40", "--trainer.val_check_interval=10")
    with pytest.raises(SpaceError, match="Lightning's own DDP cannot run inside a Tune trial"):
        plan(_settings(tmp_path, trial_args=("--trainer.devices=2", "--trainer.strategy=ddp")))
    with pytest.raises(SpaceError, match="pbt needs single-process trials"):
        plan(_settings(tmp_path, scheduler="pbt", workers_per_trial=2))
    with pytest.raises(SpaceError, match="should go up or down"):
        plan(_settings(tmp_path, metric="val/tasks"))
    grid = tmp_path / "grid.yaml"
    grid.write_text("model.init_args.inner_lr: {grid: [0.1, 0.2]}\n")
    with pytest.raises(SpaceError, match="Optuna samples; it cannot run grid entries"):
        plan(dataclass_replace(_settings(tmp_path, search="optuna"), space=str(grid)))


def dataclass_replace(settings, **changes):
    import dataclasses

    return dataclasses.replace(settings, **changes)


def test_the_command_refuses_a_bad_space_before_starting_ray(tmp_path):
    space = tmp_path / "bad.yaml"
    space.write_text("model.init_args.inner_lrr: {loguniform: [1.0e-3, 1.0]}\n")
    command = [sys.executable, "-m", "tune", "--config", SINUSOID, "--space", str(space)]
    command += ["--storage-path", str(tmp_path / "out")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "bad.yaml: model.init_args.inner_lrr=" in result.stderr
    assert "Ray" not in result.stdout + result.stderr.split("python -m tune: error")[0], "Ray was started"
    assert not (tmp_path / "out").exists()


def test_results_table_ranks_trials_and_the_plot_is_a_png(tmp_path):
    space = parse_space({"model.init_args.inner_lr": {"loguniform": [1e-3, 1.0]}, "trainer.max_steps": 5})
    rows = [
        TrialRow("a", "TERMINATED", {"model.init_args.inner_lr": 0.01, "trainer.max_steps": 5}, 4, 2.0, 1.9),
        TrialRow("b", "ERROR", {"model.init_args.inner_lr": 0.9, "trainer.max_steps": 5}, error="boom"),
        TrialRow("c", "TERMINATED", {"model.init_args.inner_lr": 0.1, "trainer.max_steps": 5}, 4, 1.0, 1.0),
        TrialRow("d", "TERMINATED", {"model.init_args.inner_lr": 0.002, "trainer.max_steps": 5}, 1, 3.0, 3.0),
    ]
    rows[3].stopped_early = True
    ranked = rank(rows, "min")
    assert [r.trial_id for r in ranked] == ["c", "a", "d", "b"]
    assert [r.trial_id for r in rank(rows, "max")] == ["d", "a", "c", "b"]
    keys = ["model.init_args.inner_lr", "trainer.max_steps"]
    path = write_results_csv(ranked, tmp_path / "results.csv", "val/loss", keys)
    table = list(csv.DictReader(path.open()))
    assert [r["trial_id"] for r in table] == ["c", "a", "d", "b"]
    assert table[0]["val/loss (last)"] == "1.0" and table[0]["model.init_args.inner_lr"] == "0.1"
    assert table[3]["status"] == "ERROR" and table[3]["error"] == "boom" and table[3]["val/loss (last)"] == ""
    png = plot_metric(ranked, space, "val/loss", "min", tmp_path / "val_loss.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_after_a_pbt_restore_the_configured_optimizer_hyperparameters_win_and_its_state_stays():
    from types import SimpleNamespace

    import torch

    from lightning_meta.cli import run_cli
    from tune.callbacks import ApplyConfiguredOptimizer

    args = ["--config", SINUSOID, "--trainer.logger=false", "--model.init_args.optimizer.init_args.lr=0.5"]
    model = run_cli(args, run=False).model
    restored = torch.optim.Adam(model.parameters(), lr=1e-3)  # as a checkpoint of another trial left it
    sum(p.sum() for p in model.parameters()).backward()
    restored.step()
    moments = [restored.state[p]["exp_avg"].clone() for p in model.parameters()]
    ApplyConfiguredOptimizer().on_train_start(SimpleNamespace(optimizers=[restored]), model)
    assert restored.param_groups[0]["lr"] == 0.5
    assert all(torch.equal(restored.state[p]["exp_avg"], m) for p, m in zip(model.parameters(), moments, strict=True))


def test_a_trial_whose_metric_diverged_is_ended_naming_it():
    from tune.callbacks import _stop_if_diverged

    _stop_if_diverged({"val/loss": 1.5, "step": 10}, "val/loss")
    _stop_if_diverged({"val/acc": float("nan"), "step": 10}, "val/loss")  # only the sweep's metric counts
    with pytest.raises(FloatingPointError, match="val/loss is nan at step 10: the trial diverged"):
        _stop_if_diverged({"val/loss": float("nan"), "step": 10}, "val/loss")
