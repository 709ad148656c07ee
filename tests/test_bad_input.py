"""Every row of the README's "When something is wrong" table: the bad input gives an error that
names the bad value and says how to fix it. Rows whose test lives elsewhere (real files, data
downloads) name that test here, so the table has one place to be checked against."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch

from lightning_meta.algorithms import MAML, MAMLPlusPlus, MetaSGD, ProtoNet, Reptile
from lightning_meta.callbacks import NonFinite, TaskBatching
from lightning_meta.cli import run_cli, unknown_option_hint
from lightning_meta.data import OmniglotDataModule, SinusoidDataModule
from lightning_meta.models import MLP, Conv4
from tests.helpers import SyntheticClassesDataModule

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
