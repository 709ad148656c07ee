"""Lake's one-shot benchmark: the reader pairs every test image with its answer, and the scoring
path (the real DataModule through `Trainer.test`) gives raw-pixel 1-nearest-neighbour about the
published accuracy and a random guesser about chance, so it neither leaks labels nor breaks
the pairing."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_meta.algorithms import MAML, MetaLearner, TaskOutput, supervised_loss
from lightning_meta.cli import run_cli
from lightning_meta.data import LakeOneShotDataModule, load_lake_runs
from lightning_meta.data.omniglot import decode_png
from lightning_meta.models import Conv4
from lightning_meta.task import Task
from tests.helpers import quiet_trainer

REPO = Path(__file__).resolve().parents[1]


class PixelNearestNeighbour(MetaLearner):
    """Each query takes the class of the training image nearest in raw pixels (Euclidean)."""

    adapts_with_gradients = False

    def __init__(self) -> None:
        super().__init__(nn.Identity())

    def task_loss(self, task: Task) -> TaskOutput:
        d = (task.query_x.flatten(1).unsqueeze(1) - task.support_x.flatten(1).unsqueeze(0)).pow(2).sum(-1)
        return TaskOutput(supervised_loss(-d, task.query_y), -d)


class RandomGuesser(MetaLearner):
    """Guesses uniformly at random (seeded), ignoring the images."""

    adapts_with_gradients = False

    def __init__(self) -> None:
        super().__init__(nn.Identity())
        self.generator = torch.Generator().manual_seed(0)

    def task_loss(self, task: Task) -> TaskOutput:
        logits = torch.rand(len(task.query_y), len(task.support_y), generator=self.generator)
        return TaskOutput(supervised_loss(logits, task.query_y), logits)


def lake_test(model: MetaLearner, root: Path) -> dict[str, float]:
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, inference_mode=False)
    (metrics,) = trainer.test(model, datamodule=LakeOneShotDataModule(root=str(root)), verbose=False)
    return metrics


def test_reader_parses_20_runs_and_pairs_every_test_image_with_one_training_image_per_class(data_root):
    runs = load_lake_runs(data_root)
    assert [r.name for r in runs] == [f"run{i:02d}" for i in range(1, 21)]
    for run in runs:
        assert run.support.shape == run.query.shape == (20, 28, 28) and run.support.dtype == torch.uint8
        assert run.support_files == [f"{run.name}/training/class{c:02d}.png" for c in range(1, 21)]
        assert run.query_files == [f"{run.name}/test/item{c:02d}.png" for c in range(1, 21)]
        assert sorted(run.answers.tolist()) == list(range(20))  # each class answers exactly one test image
    # The pairing is the file's own: spot-check run01 against the raw text of the archive.
    with zipfile.ZipFile(data_root / "omniglot" / "all_runs.zip") as z:
        lines = z.read("run01/class_labels.txt").decode().split()
        first_train = z.read(lines[1])
    assert lines[:2] == ["run01/test/item01.png", "run01/training/class08.png"]
    assert int(runs[0].answers[0]) == 7
    # Decoded exactly as the Omniglot loader decodes its drawings (greyscale, resize, ink high).
    torch.testing.assert_close(runs[0].support[7], torch.from_numpy(decode_png(first_train, 28)))
    task = runs[0].task()
    assert task.support_x.shape == (20, 1, 28, 28) and task.support_x.min() >= 0 and task.support_x.max() <= 1
    assert task.support_x.mean() < 0.5  # ink is 1 on a background of 0, as in training


def test_a_missing_archive_says_where_it_looked_and_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_lake_runs(tmp_path)
    message = str(error.value)
    assert str(tmp_path / "omniglot" / "all_runs.zip") in message and "LIGHTNING_META_DATA" in message
    assert "github.com/brendenlake/omniglot" in message


def test_a_pairing_file_that_gives_one_class_two_test_images_is_refused(data_root, tmp_path):
    out = tmp_path / "omniglot" / "all_runs.zip"
    out.parent.mkdir()
    with zipfile.ZipFile(data_root / "omniglot" / "all_runs.zip") as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "run03/class_labels.txt":
                lines = data.decode().splitlines()
                lines[1] = lines[1].split()[0] + " " + lines[0].split()[1]
                data = "\n".join(lines).encode()
            dst.writestr(info, data)
    with pytest.raises(ValueError, match=r"run03/class_labels.txt must pair 20 distinct test images"):
        load_lake_runs(tmp_path)


@pytest.mark.slow
def test_pixel_nearest_neighbour_scores_near_the_published_accuracy_and_random_near_chance(data_root):
    # Koch et al. 2015, Table 2: 1-nearest neighbour on raw pixels, 21.7% accuracy. Measured here
    # (28×28 images): 84 / 400 = 21.0%. A random guesser (seed 0): 1/20 = 5%; measured 5.75% (23 / 400).
    # Binomial standard error at 400 trials is about 2 points (1 at 5%).
    nn_metrics = lake_test(PixelNearestNeighbour(), data_root)
    assert nn_metrics["test/tasks"] == 20
    assert 0.16 <= nn_metrics["test/acc"] <= 0.28, nn_metrics
    assert nn_metrics["test/error"] == pytest.approx(100 * (1 - nn_metrics["test/acc"]), abs=1e-4)
    assert nn_metrics["test/error_ci95"] > 0
    random_metrics = lake_test(RandomGuesser(), data_root)
    assert 0.02 <= random_metrics["test/acc"] <= 0.09, random_metrics
    assert nn_metrics["test/acc"] > random_metrics["test/acc"] + 0.1


def test_a_model_with_a_5_way_head_is_refused_with_the_fix(data_root):
    model = MAML(Conv4(hidden_channels=8, out_features=5), inner_steps=1)
    with pytest.raises(ValueError, match=r"5-way output head.*must be trained 20-way.*--data.ways 20"):
        lake_test(model, data_root)


def test_a_model_with_a_5_way_head_is_refused_at_fit_start_before_any_validation(data_root):
    # Validation tasks are 20-way as well: the head is checked before fit loads data or trains,
    # not at the first validation (where a 5-way head met a target out of bounds).
    model = MAML(Conv4(hidden_channels=8, out_features=5), inner_steps=1)
    data = LakeOneShotDataModule(root=str(data_root), ways=5, val_tasks=2)
    trainer = quiet_trainer(inference_mode=False, max_steps=1)
    with pytest.raises(ValueError, match=r"5-way output head.*must be trained 20-way.*--data.ways 20"):
        trainer.fit(model, datamodule=data)
    assert trainer.global_step == 0 and data.sources == {}


@pytest.mark.slow
def test_validation_tasks_depend_on_the_eval_seed_only(data_root):
    def draw(seed: int, eval_seed: int):
        dm = LakeOneShotDataModule(root=str(data_root), seed=seed, eval_seed=eval_seed, val_tasks=4)
        dm.setup("fit")
        characters = dm.sources["val"].dataset.characters.tolist()
        return characters, next(iter(dm.val_dataloader())), next(iter(dm.train_dataloader()))

    chars, val, train = draw(seed=0, eval_seed=0)
    other_chars, other_val, other_train = draw(seed=1, eval_seed=0)
    # Another training seed: other training tasks, the same validation characters and tasks.
    assert not torch.equal(train.support_x, other_train.support_x)
    assert chars == other_chars
    for field in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(val, field), getattr(other_val, field)), field
    # Another eval seed: other validation characters.
    assert draw(seed=0, eval_seed=1)[0] != chars


@pytest.mark.slow
def test_training_reads_the_background_set_only_and_validation_is_held_out(data_root):
    dm = LakeOneShotDataModule(root=str(data_root), val_characters=100)
    dm.setup("fit")
    train, val = dm.sources["train"].dataset, dm.sources["val"].dataset
    train_chars, val_chars = set(train.characters.tolist()), set(val.characters.tolist())
    assert len(train_chars) == 864 and len(val_chars) == 100 and not train_chars & val_chars
    # load_omniglot stacks the 964 background characters first, then the evaluation ones.
    assert max(train_chars | val_chars) < 964
    assert dm.sources["val"].ways == 20 and dm.sources["val"].shots == 1


def test_bad_arguments_name_the_config_key():
    with pytest.raises(ValueError, match=r"data.ways=0"):
        LakeOneShotDataModule(ways=0)
    with pytest.raises(ValueError, match=r"data.val_characters=2"):
        LakeOneShotDataModule(val_characters=2)


@pytest.mark.slow
def test_fit_then_test_a_checkpoint_through_the_cli_reports_percent_error(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    common = [
        "--config",
        "configs/lake/protonet.yaml",
        "--model.backbone.init_args.hidden_channels=8",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
    ]
    fit = run_cli(
        [
            "fit",
            *common,
            "--data.ways=5",
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
            "--data.val_tasks=4",
            "--test_after_fit=false",
        ]
    )
    ckpt = fit.trainer.checkpoint_callback.last_model_path
    assert Path(ckpt).is_file()
    test = run_cli(["test", *common, f"--ckpt_path={ckpt}"])
    metrics = {k: float(v) for k, v in test.trainer.callback_metrics.items()}
    assert metrics["test/tasks"] == 20
    assert metrics["test/error"] == pytest.approx(100 * (1 - metrics["test/acc"]), abs=1e-4)
