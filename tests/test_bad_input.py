"""Every row of the README's "When something is wrong" table: the bad input gives an error that
names the bad value and says how to fix it. Rows whose test lives elsewhere (real files, data
downloads) name that test here, so the table has one place to be checked against. The last
section runs each row through the real command, as a user sees it: the usage line and one
`error:` line, exit status 2, no traceback."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch

from lightning_meta.algorithms import MAML, MAMLPlusPlus, MetaSGD, ProtoNet, Reptile
from lightning_meta.callbacks import NonFinite, TaskBatching
from lightning_meta.cli import run_cli, unknown_option_hint, user_error_message
from lightning_meta.data import OmniglotDataModule, SinusoidDataModule
from lightning_meta.data import omniglot as om
from lightning_meta.models import MLP, Conv4
from tests.helpers import SyntheticClassesDataModule
from tests.test_omniglot import _load, _members, _write_zip

REPO = Path(__file__).resolve().parents[1]
BASE = ["fit", "--config", str(REPO / "configs" / "sinusoid" / "maml.yaml"), "--trainer.logger=false"]


def cli_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """What `lightning-meta fit` prints when it refuses `args` (it exits with status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli([*BASE, *args])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_unknown_option_of_a_class_names_it_and_suggests_the_right_one(capsys):
    err = cli_error(capsys, "--model.init_args.inner_lrr=0.1")
    assert "'inner_lrr' is not an option of lightning_meta.algorithms.MAML; did you mean 'inner_lr'" in err
    assert len(err.splitlines()) < 20  # the error, not a wall of usage


def test_unknown_trainer_option_on_the_command_line_suggests_the_right_one(capsys):
    err = cli_error(capsys, "--trainer.max_stepz=3")
    assert "did you mean 'trainer.max_steps'" in err


def test_unknown_keys_in_a_yaml_file_suggest_the_right_ones(capsys, tmp_path):
    (tmp_path / "group.yaml").write_text("trainer:\n  max_stepz: 3\n")
    assert "did you mean 'trainer.max_steps'" in cli_error(capsys, "--config", str(tmp_path / "group.yaml"))
    (tmp_path / "top.yaml").write_text("modle:\n  init_args:\n    inner_lr: 3\n")
    assert "'modle' is not an option; did you mean 'model'" in cli_error(capsys, "--config", str(tmp_path / "top.yaml"))


def test_an_unknown_option_with_nothing_close_points_at_the_help():
    hint = unknown_option_hint("Group 'trainer' does not accept option 'zzz'", ["trainer.max_steps"])
    assert hint is not None and "'zzz' is not an option of trainer" in hint and "--help" in hint


def test_wrong_type_names_the_key_the_type_and_the_value(capsys):
    err = cli_error(capsys, "--model.init_args.inner_lr=fast")
    assert 'key "inner_lr"' in err and "float" in err and "fast" in err


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: MAML(MLP(), inner_lr=0), r"model\.init_args\.inner_lr=0 must be > 0"),
        (lambda: MAML(MLP(), inner_lr=-0.1), r"model\.init_args\.inner_lr=-0\.1 must be > 0"),
        (lambda: MAML(MLP(), inner_steps=0), r"model\.init_args\.inner_steps=0 must be at least 1"),
        (lambda: MetaSGD(MLP(), eval_inner_steps=-1), r"model\.init_args\.eval_inner_steps=-1 must be at least 1"),
        (lambda: Reptile(MLP(), inner_lr=0.0), r"model\.init_args\.inner_lr=0\.0 must be > 0"),
        (lambda: MAMLPlusPlus(MLP(), inner_steps=0), r"model\.init_args\.inner_steps=0 must be at least 1"),
        (lambda: SinusoidDataModule(tasks_per_batch=0), r"data\.tasks_per_batch=0 must be a positive integer"),
        (lambda: SinusoidDataModule(batches_per_epoch=-2), r"data\.batches_per_epoch=-2 must be a positive"),
    ],
)
def test_zero_or_negative_rates_and_step_counts_name_the_config_key(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize("lr", [0.0, -1e-3])
def test_a_zero_or_negative_outer_learning_rate_names_the_config_key(lr):
    model = ProtoNet(Conv4(hidden_channels=4), optimizer=lambda p: torch.optim.Adam(p, lr=lr))
    with pytest.raises(ValueError, match=r"model\.init_args\.optimizer\.init_args\.lr"):
        model.configure_optimizers()


def test_negative_max_steps_is_refused_by_lightning_naming_the_value(capsys):
    with pytest.raises(Exception, match=r"max_steps.*non-negative integer or -1.*-5"):
        run_cli([*BASE, "--trainer.max_steps=-5"])


def test_more_ways_than_the_split_has_classes():
    data = SyntheticClassesDataModule(ways=20, num_classes=12)
    with pytest.raises(ValueError, match=r"ways=20 is larger than the 12 classes.*lower `data\.ways` to at most 12"):
        data.setup()


def test_more_shots_and_queries_than_a_class_has_examples():
    data = SyntheticClassesDataModule(shots=5, query_shots=4)  # classes of 8 examples
    with pytest.raises(
        ValueError, match=r"5 \+ 4 = 9 is more than the 8 examples.*`data\.shots` or `data\.query_shots`"
    ):
        data.setup()


def test_a_missing_dataset_says_where_it_looked_and_how_to_get_the_data(tmp_path):
    # More cases (the environment variable, the default) in test_omniglot.py::test_missing_root_names_paths_and_fixes.
    data = OmniglotDataModule(root=str(tmp_path / "nowhere"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError) as err:
        data.setup()
    message = str(err.value)
    assert str(tmp_path / "nowhere") in message and "images_background.zip" in message
    assert "--data.root" in message and "--data.download true" in message


def test_a_corrupt_zip_names_the_file_and_the_fix(tmp_path):
    # A damaged PNG inside a good zip: test_omniglot.py::test_corrupt_png_names_the_member.
    for part in ("images_background", "images_evaluation"):
        (tmp_path / "omniglot").mkdir(exist_ok=True)
        (tmp_path / "omniglot" / f"{part}.zip").write_bytes(b"not a zip" * 50)
    data = OmniglotDataModule(root=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(
        ValueError, match=r"images_background\.zip is not a readable zip.*good copy.*--data\.download true"
    ):
        data.setup()


def test_forced_vmap_over_batchnorm_is_refused_before_training_naming_the_layer_and_the_fix(tmp_path):
    model = MAML(Conv4(out_features=3, hidden_channels=4, norm="batch"), inner_lr=0.4)
    trainer = pl.Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        callbacks=[TaskBatching(mode="vmap")], default_root_dir=tmp_path,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"mode='vmap' cannot be used: .*BatchNorm2d.*norm='plain_batch'"):
        trainer.fit(model, datamodule=SyntheticClassesDataModule())
    assert trainer.global_step == 0


def test_inference_mode_names_the_trainer_flag_to_turn_it_off():
    # Also test_contract.py::test_evaluation_refuses_inference_mode_with_a_clear_message.
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, inference_mode=True, limit_val_batches=1)
    with pytest.raises(RuntimeError, match=r"inference mode.*--trainer\.inference_mode=false"):
        trainer.validate(MAML(MLP(), inner_lr=0.01), datamodule=SinusoidDataModule(tasks_per_batch=2, val_tasks=2))


def test_inference_mode_with_test_after_fit_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"inference_mode=true with --test_after_fit.*--trainer\.inference_mode=false"):
        run_cli([*BASE, "--trainer.inference_mode=true", f"--trainer.default_root_dir={tmp_path}"])
    assert not list(tmp_path.iterdir())  # refused before anything ran


@pytest.mark.parametrize("split", ["val", "test"])
def test_more_processes_than_fixed_evaluation_tasks_names_the_count_and_the_fix(split):
    data = SinusoidDataModule(val_tasks=1, test_tasks=1)
    data.trainer = SimpleNamespace(world_size=2, global_rank=0)
    with pytest.raises(
        ValueError, match=rf"data\.{split}_tasks=1 fixed tasks cannot be dealt to 2 processes.*at least 2"
    ):
        getattr(data, f"{split}_dataloader")()


def test_a_bad_nonfinite_action_lists_the_choices():
    with pytest.raises(ValueError, match=r"action='ignore' is not one of \('raise', 'skip'\)"):
        NonFinite("ignore")


# ------------------------------------------------------------------------ through the real command

SINUSOID = REPO / "configs" / "sinusoid" / "maml.yaml"
OMNIGLOT = REPO / "configs" / "omniglot_5w1s" / "protonet.yaml"
CLASSES_YAML = """\
model:
  class_path: lightning_meta.algorithms.ProtoNet
  init_args:
    backbone: {class_path: lightning_meta.models.Conv4, init_args: {hidden_channels: 4}}
data: {class_path: tests.helpers.SyntheticClassesDataModule}
trainer: {enable_progress_bar: false}
"""
VMAP_BATCHNORM_YAML = """\
model:
  class_path: lightning_meta.algorithms.MAML
  init_args:
    inner_lr: 0.4
    backbone: {class_path: lightning_meta.models.Conv4, init_args: {hidden_channels: 4, norm: batch}}
data: {class_path: tests.helpers.SyntheticClassesDataModule}
trainer:
  callbacks: [{class_path: lightning_meta.callbacks.TaskBatching, init_args: {mode: vmap}}]
"""
# The command with downloads pointed at a port nothing listens on (as test_no_network.py does).
CLOSED_PORT_MAIN = """\
import os
from lightning_meta.data import omniglot as om
base = "http://127.0.0.1:" + os.environ["CLOSED_PORT"]
om.ZIP_RESOURCES = {part: (f"{base}/{part}.zip", "0" * 32) for part in om.PARTS}
om.SPLIT_URL = base + "/splits/{name}.txt"
from lightning_meta.cli import main
main()
"""
# The command with the check of Omniglot's 1623 characters off, so that a small fake copy reaches
# the decoding of its PNGs.
SMALL_OMNIGLOT_MAIN = """\
from lightning_meta.data import omniglot as om
om._check_counts = lambda *args: None
from lightning_meta.cli import main
main()
"""
# The command with a genuine bug inside lightning-meta: a function that is no longer callable.
BUGGY_MAIN = """\
import lightning_meta.data.datamodule as datamodule
datamodule.check_positive = None
from lightning_meta.cli import main
main()
"""


def command(
    tmp_path: Path,
    config: Path,
    *args: str,
    subcommand: str = "fit",
    main: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """`python -m lightning_meta <subcommand> --config config *args` in `tmp_path`, or the same
    arguments to the script `main`; without a logger, and 3 steps unless `args` say otherwise (a
    check that does not fire must not train for the config's hours)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "PL_", "LIGHTNING_META_TRACEBACK"))}
    clean = {k: v for k, v in clean.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")}
    clean.update(PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    clean.update(WANDB_MODE="disabled", **(env or {}))
    program = [sys.executable, "-c", main] if main else [sys.executable, "-m", "lightning_meta"]
    return subprocess.run(
        [*program, subcommand, "--config", str(config), "--trainer.logger=false", "--trainer.max_steps=3", *args],
        cwd=tmp_path, env=clean, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def command_error(result: subprocess.CompletedProcess) -> str:
    """The message of the one `error:` line the command ended with, after checking that it exited
    with status 2, printed the usage line before it, and no traceback or jsonargparse dump."""
    out = result.stdout + result.stderr
    assert result.returncode == 2, out[-3000:]
    assert "Traceback" not in out and "Namespace(" not in out and "Union subtypes" not in out, out[-3000:]
    # Under DDP every process reports the same error, and their usage/error lines interleave
    # (usage, usage, error, error): read the trailing block of such lines, not the last two.
    usage_line = re.compile(r"usage: \S+ (fit|validate) \[--help\] \[--config CONFIG\] \.\.\.")
    tail: list[str] = []
    for line in reversed(result.stderr.rstrip("\n").splitlines()):
        if not (usage_line.fullmatch(line) or line.startswith("error: ")):
            break
        tail.insert(0, line)
    usages = [line for line in tail if usage_line.fullmatch(line)]
    errors = [line for line in tail if line.startswith("error: ")]
    assert usages and tail[0] in usages, out[-3000:]
    assert errors and len(set(errors)) == 1 and len(usages) == len(errors), result.stderr[-3000:]
    return errors[0].removeprefix("error: ")


def _closed_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def _setup_row(row: str, tmp_path: Path) -> tuple[Path, list[str], str | None]:
    """The config, arguments and script (None: `python -m lightning_meta`) of a README row."""
    classes = tmp_path / "classes.yaml"
    classes.write_text(CLASSES_YAML)
    data = [f"--data.root={tmp_path / 'data'}", f"--data.cache_dir={tmp_path / 'cache'}"]
    if row == "corrupt zip":
        (tmp_path / "data" / "omniglot").mkdir(parents=True)
        for part in om.PARTS:
            (tmp_path / "data" / "omniglot" / f"{part}.zip").write_bytes(b"not a zip" * 50)
    if row == "corrupt png":
        for part in om.PARTS:
            members = _members(part)
            if part == "images_background":
                members["images_background/Beta/character02/0002_02.png"] = b"\x89PNG garbage"
            _write_zip(tmp_path / "data" / "omniglot" / f"{part}.zip", members)
    if row == "vmap with BatchNorm":
        (tmp_path / "vmap.yaml").write_text(VMAP_BATCHNORM_YAML)
    return {
        "the issue's example": (SINUSOID, ["--data.shots", "-1"], None),
        "more ways than classes": (classes, ["--data.ways=20", "--data.num_classes=12"], None),
        "shots + queries": (classes, ["--data.shots=5", "--data.query_shots=4"], None),
        "missing dataset": (OMNIGLOT, data, None),
        "download without a network": (OMNIGLOT, [*data, "--data.download=true"], CLOSED_PORT_MAIN),
        "corrupt zip": (OMNIGLOT, data, None),
        "corrupt png": (OMNIGLOT, data, SMALL_OMNIGLOT_MAIN),
        "inner lr": (SINUSOID, ["--model.init_args.inner_lr=0"], None),
        "inner steps": (SINUSOID, ["--model.init_args.inner_steps=0"], None),
        "outer lr": (SINUSOID, ["--model.init_args.optimizer.init_args.lr=0", "--trainer.max_steps=2"], None),
        "task count": (SINUSOID, ["--data.tasks_per_batch=0"], None),
        "max_steps": (SINUSOID, ["--trainer.max_steps=-5"], None),
        "vmap with BatchNorm": (tmp_path / "vmap.yaml", [], None),
        "inference mode": (SINUSOID, ["--trainer.inference_mode=true"], None),  # `validate`
        "inference mode and test_after_fit": (SINUSOID, ["--trainer.inference_mode=true"], None),
        "more processes than tasks": (
            SINUSOID,
            ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp", "--data.val_tasks=1"],
            None,
        ),
        "non-finite meta-loss": (SINUSOID, ["--model.init_args.inner_lr=1e6", "--trainer.max_steps=3"], None),
        "checkpoint options without checkpointing": (
            SINUSOID, ["--trainer.enable_checkpointing=false", "--checkpoint.every_n_train_steps=100"], None,
        ),
    }[row]  # fmt: skip


ROW_MESSAGES = {
    "the issue's example": r"data\.shots=-1 must be a positive integer",
    "more ways than classes": r"ways=20 is larger than the 12 classes.*lower `data\.ways` to at most 12",
    "shots + queries": r"shots \+ query_shots = 5 \+ 4 = 9 is more than the 8 examples.*"
    r"`data\.shots` or `data\.query_shots`",
    "missing dataset": r"Omniglot not found under the data root \S+/data, taken from the `root` argument.*"
    r"images_background\.zip.*To fix: pass `--data\.root .*`--data\.download true`.*",
    "download without a network": r"could not download Omniglot's images_background from http://127\.0\.0\.1:\d+/"
    r"images_background\.zip.*copy images_background\.zip.*--data\.root.*",
    "corrupt zip": r"\S+/data/omniglot/images_background\.zip is not a readable zip archive.*--data\.download true.*",
    "corrupt png": r"could not decode member 'images_background/Beta/character02/0002_02\.png' of "
    r"\S+/images_background\.zip as a PNG.*",
    "inner lr": r"model\.init_args\.inner_lr=0\.0 must be > 0 \(MAML uses 0\.01-0\.1 here\)",
    "inner steps": r"model\.init_args\.inner_steps=0 must be at least 1",
    "outer lr": r"model\.init_args\.optimizer\.init_args\.lr=0\.0: the outer learning rate must be > 0.*",
    "task count": r"data\.tasks_per_batch=0 must be a positive integer",
    "max_steps": r"`max_steps` must be a non-negative integer or -1 \(infinite steps\)\. You passed in -5\.",
    "vmap with BatchNorm": r"TaskBatching mode='vmap' cannot be used: backbone\.\S+ is BatchNorm2d.*"
    r"norm='plain_batch'.*",
    "inference mode": r"MAML adapts with gradients during validation, which inference mode forbids: .*"
    r"`--trainer\.inference_mode=false`.*",
    "inference mode and test_after_fit": r"trainer\.inference_mode=true with --test_after_fit: .*"
    r"--trainer\.inference_mode=false \(the default\)",
    "more processes than tasks": r"data\.val_tasks=1 fixed tasks cannot be dealt to 2 processes.*at least 2.*",
    "non-finite meta-loss": r"MAML: meta-loss is (nan|inf) at global step 0; the usual cause is an inner or outer "
    r"learning rate too high: lower model\.init_args\.inner_lr or .*--ckpt_path.*action: skip",
    "checkpoint options without checkpointing": r"trainer\.enable_checkpointing=false writes no checkpoint, so the "
    r"checkpoint options checkpoint\.every_n_train_steps=100 would be ignored: remove them, or "
    r"--trainer\.enable_checkpointing=false",
}


@pytest.mark.slow
@pytest.mark.parametrize(
    "row",
    [
        pytest.param(row, marks=pytest.mark.distributed) if row == "more processes than tasks" else row
        for row in ROW_MESSAGES
    ],
)
def test_the_command_prints_the_projects_message_as_one_error_line(tmp_path, row):
    config, args, main = _setup_row(row, tmp_path)
    subcommand = "validate" if row == "inference mode" else "fit"  # fit validates without inference mode
    result = command(tmp_path, config, *args, subcommand=subcommand, main=main, env={"CLOSED_PORT": _closed_port()})
    assert re.fullmatch(ROW_MESSAGES[row], command_error(result)), result.stderr[-2000:]
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.slow
def test_a_mistyped_option_or_a_wrong_type_from_the_command_exit_2_without_a_traceback(tmp_path):
    for arg, hint in [
        ("--model.init_args.inner_lrr=0.1", "did you mean 'inner_lr'"),
        ("--model.init_args.inner_lr=fast", "Expected a <class 'float'>. Got value: fast"),
    ]:
        result = command(tmp_path, SINUSOID, arg)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert hint in result.stderr and result.stderr.startswith("usage: ")


@pytest.mark.slow
def test_a_bug_still_shows_its_traceback(tmp_path):
    result = command(tmp_path, SINUSOID, main=BUGGY_MAIN)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "TypeError: 'NoneType' object is not callable" in result.stderr
    assert "error: " not in result.stderr.splitlines()[-1]


@pytest.mark.slow
def test_lightning_meta_traceback_shows_the_traceback_of_a_bad_value(tmp_path):
    result = command(tmp_path, SINUSOID, "--data.shots=-1", env={"LIGHTNING_META_TRACEBACK": "1"})
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "ValueError: data.shots=-1 must be a positive integer" in result.stderr


def test_the_message_of_an_error_raised_in_a_decoding_worker_is_the_workers(tmp_path, monkeypatch):
    root = tmp_path / "data"
    members = _members("images_background")
    members["images_background/Beta/character02/0002_02.png"] = b"\x89PNG garbage"
    _write_zip(root / "omniglot" / "images_background.zip", members)
    _write_zip(root / "omniglot" / "images_evaluation.zip", _members("images_evaluation"))
    monkeypatch.setattr(om, "_MIN_IMAGES_FOR_POOL", 0)
    with pytest.raises(ValueError) as err:
        _load(root, tmp_path / "cache", num_workers=2)
    assert err.value.__cause__ is not None  # re-raised by multiprocessing, with the worker's traceback
    assert user_error_message(err.value) == str(err.value)
    assert "could not decode member 'images_background/Beta/character02/0002_02.png'" in str(err.value)


def test_errors_that_are_not_a_raise_of_lightning_meta_have_no_short_message():
    with pytest.raises(TypeError) as bug:
        SinusoidDataModule(tasks_per_batch="many")  # a comparison that fails inside lightning-meta
    assert user_error_message(bug.value) is None
    with pytest.raises(ValueError) as foreign:
        int("x")
    assert user_error_message(foreign.value) is None
