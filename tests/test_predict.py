"""Prediction on a support set of one's own (`MetaLearner.adapt_to`, `predict_step`): the predictor
gives the evaluation path's outputs on the same task, for every algorithm of the contract test,
under both evaluation protocols (float64)."""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from lightning_meta.algorithms import MAML, MetaLearner, ProtoNet
from lightning_meta.cli import run_cli
from lightning_meta.data import omniglot_splits
from lightning_meta.models import Conv4
from lightning_meta.task import TaskBatch
from tests.helpers import SyntheticClassesDataModule, quiet_trainer
from tests.test_contract import SETUPS

REPO = Path(__file__).resolve().parents[1]


def float64_batch(batch: TaskBatch) -> TaskBatch:
    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.double() if torch.is_floating_point(t) else t

    return TaskBatch(cast(batch.support_x), cast(batch.support_y), cast(batch.query_x), cast(batch.query_y))


def trained_a_little(name: str) -> tuple[MetaLearner, TaskBatch]:
    """The setup's learner after one meta-step (so learned rates and weights are not at their
    initial values), in float64, and a validation batch."""
    torch.manual_seed(0)
    model, dm = SETUPS[name]()
    model.double()
    loss, _ = model.meta_loss(float64_batch(next(iter(dm.train_dataloader()))))
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 1e-2 * p.grad
    return model, float64_batch(next(iter(dm.val_dataloader())))


# MeTAL's inner loss has an unlabelled term over the query inputs, which `adapt_to` adapts before
# it has: its predictor is MeTAL without that term (tests/test_metal.py checks that one instead).
QUERY_INPUTS_IN_THE_INNER_LOOP = {"MAML-metal"}


@pytest.mark.parametrize("protocol", ["transductive", "per_example"])
@pytest.mark.parametrize("name", sorted(set(SETUPS) - QUERY_INPUTS_IN_THE_INNER_LOOP))
def test_the_predictor_gives_the_evaluation_outputs(name, protocol):
    model, batch = trained_a_little(name)
    model.eval_protocol = protocol
    model.eval()
    expected = model(batch).predictions.detach()
    model.train()  # adapt_to evaluates whatever the mode, and restores it
    for i, task in enumerate(batch):
        predictor = model.adapt_to(task.support_x, task.support_y)
        got = predictor(task.query_x)
        torch.testing.assert_close(got, expected[i], rtol=1e-9, atol=1e-10, msg=f"{name}, task {i}")
        assert model.training
        if task.is_classification:
            probs = predictor.probabilities(task.query_x)
            torch.testing.assert_close(probs.sum(-1), torch.ones(len(probs), dtype=probs.dtype))
            assert (probs.argmax(-1) == got.argmax(-1)).all()


def test_per_example_predictions_do_not_depend_on_the_other_queries():
    model, batch = trained_a_little("ProtoNet")
    model.eval_protocol = "per_example"
    task = batch[0]
    predictor = model.adapt_to(task.support_x, task.support_y)
    alone = torch.cat([predictor(task.query_x[i : i + 1]) for i in range(len(task.query_x))])
    torch.testing.assert_close(alone, predictor(task.query_x), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(
    "make", [lambda: MAML(Conv4(hidden_channels=8, out_features=3)), lambda: ProtoNet(Conv4(hidden_channels=8))]
)
def test_predict_step_through_a_trainer_gives_the_evaluation_predictions(make):
    torch.manual_seed(0)
    model, dm = make(), SyntheticClassesDataModule()
    batch = next(iter(dm.val_dataloader()))
    model.eval()
    expected = model(batch).predictions.detach()
    predicted = quiet_trainer(inference_mode=False).predict(model, DataLoader([batch], batch_size=None))
    torch.testing.assert_close(predicted[0], expected, rtol=1e-5, atol=1e-6)


def test_predict_refuses_inference_mode_for_gradient_adaptation():
    model, dm = MAML(Conv4(hidden_channels=8, out_features=3)), SyntheticClassesDataModule()
    loader = DataLoader([next(iter(dm.val_dataloader()))], batch_size=None)
    with pytest.raises(RuntimeError, match=r"inference_mode=False"):
        pl.Trainer(logger=False, enable_progress_bar=False, inference_mode=True).predict(model, loader)


def test_bad_support_sets_are_refused_with_the_fix():
    model = ProtoNet(Conv4(hidden_channels=8))
    x = torch.randn(4, 1, 28, 28)
    with pytest.raises(ValueError, match=r"classes \[1\] have no support example"):
        model.adapt_to(x, torch.tensor([0, 0, 2, 2]))
    with pytest.raises(ValueError, match=r"one label per support example"):
        model.adapt_to(x, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match=r"integer class labels"):
        model.adapt_to(x, torch.randn(4))
    maml = MAML(Conv4(hidden_channels=8, out_features=3))
    with pytest.raises(ValueError, match=r"predicts 3 classes but the support set has 2"):
        maml.adapt_to(x, torch.tensor([0, 1, 0, 1]))(x)


# ------------------------------------------------------------------------ lightning-meta predict

PROTONET = "configs/omniglot_5w1s/protonet.yaml"
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false"]


def arrange_unseen_characters(data_root: Path, folder: Path, queries: int = 5) -> dict[str, str]:
    """Five characters of Omniglot's test split (never trained on) as `folder/support/<character>/`
    (one drawing each) and `folder/query/` (`queries` other drawings each, named q00.png, ...).
    Returns each query file's true class."""
    test = omniglot_splits(data_root)["test"]
    characters = [n.removesuffix("/rot000") for n in test.class_names() if n.endswith("/rot000")][::20][:5]
    truth, q = {}, 0
    for part in ("images_background", "images_evaluation"):
        with zipfile.ZipFile(data_root / "omniglot" / f"{part}.zip") as z:
            names = z.namelist()
            for character in characters:
                members = sorted(m for m in names if m.startswith(f"{part}/{character}/") and m.endswith(".png"))
                if not members:
                    continue
                name = character.replace("/", "_")
                (folder / "support" / name).mkdir(parents=True)
                (folder / "support" / name / "drawing.png").write_bytes(z.read(members[0]))
                (folder / "query").mkdir(exist_ok=True)
                for member in members[1 : 1 + queries]:
                    (folder / "query" / f"q{q:02d}.png").write_bytes(z.read(member))
                    truth[f"q{q:02d}.png"], q = name, q + 1
    assert len(truth) == 5 * queries
    return truth


def fit_protonet(tmp_path: Path, data_root: Path, steps: int, *extra: str) -> Path:
    run_cli(
        [
            "fit",
            "--config",
            PROTONET,
            f"--data.root={data_root}",
            f"--trainer.max_steps={steps}",
            "--trainer.limit_val_batches=0",
            "--test_after_fit=false",
            f"--checkpoint.dirpath={tmp_path / 'ckpt'}",
            f"--trainer.default_root_dir={tmp_path}",
            *extra,
            *QUIET,
        ]
    )
    return tmp_path / "ckpt" / "last.ckpt"


def predict(config: str, ckpt: Path | str, folders: Path, *extra: str) -> None:
    run_cli(["predict", "--config", config, f"--ckpt_path={ckpt}", f"--folders={folders}", *extra, *QUIET])


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory, data_root) -> Path:
    """A ProtoNet (Conv4-8) after one meta-step on Omniglot."""
    return fit_protonet(
        tmp_path_factory.mktemp("fit"),
        data_root,
        1,
        "--data.train_ways=5",
        "--model.backbone.init_args.hidden_channels=8",
    )


def test_predict_refuses_bad_input_naming_the_value_and_the_fix(small_checkpoint, data_root, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    narrow = ["--model.backbone.init_args.hidden_channels=8", f"--data.root={data_root}"]
    task = tmp_path / "task"
    truth = arrange_unseen_characters(data_root, task, queries=1)
    with pytest.raises(
        ValueError, match=r"does not hold the weights of the model this config builds.*of another shape"
    ):
        predict(PROTONET, small_checkpoint, task, f"--data.root={data_root}")  # Conv4-64, not 8
    with pytest.raises(ValueError, match=r"does not hold the weights of the model this config builds"):
        predict("configs/omniglot_5w1s/maml.yaml", small_checkpoint, task, f"--data.root={data_root}")
    with pytest.raises(FileNotFoundError, match=r"--ckpt_path .*nothing.ckpt is not a file"):
        predict(PROTONET, tmp_path / "nothing.ckpt", task, *narrow)
    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"junk.ckpt could not be read as a Lightning checkpoint"):
        predict(PROTONET, tmp_path / "junk.ckpt", task, *narrow)
    with pytest.raises(FileNotFoundError, match=r"--folders .*absent is not a folder"):
        predict(PROTONET, small_checkpoint, tmp_path / "absent", *narrow)
    with pytest.raises(ValueError, match=r"needs --folders FOLDER"):
        run_cli(["predict", "--config", PROTONET, f"--ckpt_path={small_checkpoint}", *narrow, *QUIET])
    bad = tmp_path / "bad"
    (bad / "support").mkdir(parents=True)
    (bad / "query").mkdir()
    with pytest.raises(ValueError, match=r"support has no support classes: put the images of each class"):
        predict(PROTONET, small_checkpoint, bad, *narrow)
    (bad / "support" / "a").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*support/a holds no images"):
        predict(PROTONET, small_checkpoint, bad, *narrow)
    (bad / "support" / "a" / "x.png").write_bytes((task / "query" / "q00.png").read_bytes())
    with pytest.raises(ValueError, match=r"query holds no images"):
        predict(PROTONET, small_checkpoint, bad, *narrow)
    (bad / "query" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ValueError, match=r"could not read .*query/broken.jpg as an image"):
        predict(PROTONET, small_checkpoint, bad, *narrow)
    # The good task runs, and writes one row per query.
    predict(PROTONET, small_checkpoint, task, *narrow, f"--output={tmp_path / 'out.csv'}")
    with open(tmp_path / "out.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["query_file"] for r in rows) == sorted(truth)
    assert {r["predicted_class"] for r in rows} <= set(truth.values())
    assert all(0.2 <= float(r["probability"]) <= 1 for r in rows)  # the top class of 5: at least 1/5


@pytest.mark.slow
def test_a_model_meta_trained_300_steps_predicts_unseen_characters_from_folders(
    data_root, tmp_path, monkeypatch, capsys
):
    """End to end: meta-train ProtoNet (Conv4-32) 300 steps (20-way episodes) on Omniglot's training split,
    arrange 5 characters of its test split as folders (1 support drawing each, 25 queries), and
    predict. Chance is 5 of 25."""
    monkeypatch.chdir(REPO)
    narrow = "--model.backbone.init_args.hidden_channels=32"  # a quarter of Conv4-64's compute
    ckpt = fit_protonet(tmp_path, data_root, 300, "--data.train_ways=20", narrow)
    truth = arrange_unseen_characters(data_root, tmp_path / "task")
    predict(PROTONET, ckpt, tmp_path / "task", f"--data.root={data_root}", narrow)
    out = capsys.readouterr().out
    assert "query_file" in out and "predictions written to" in out
    with open(tmp_path / "task" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    correct = sum(truth[r["query_file"]] == r["predicted_class"] for r in rows)
    print(f"{correct}/25 unseen-character queries right after 300 meta-steps (chance 5/25)")
    assert correct >= 15, f"{correct}/25 right: chance is 5"
