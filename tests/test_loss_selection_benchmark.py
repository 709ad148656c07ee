"""benchmarks/loss_selection.py's scoring: the oracle and the per-task metric (no training)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from lightning_meta.task import Task

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "loss_selection.py"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # the script imports bench_trainer beside it
    return importlib.import_module("loss_selection")


def test_the_accuracy_oracle_takes_the_most_accurate_candidate_and_breaks_ties_by_query_loss(bench) -> None:
    # Three candidates (rows) on four tasks (columns); accuracy, higher is better.
    accuracy = torch.tensor([[80.0, 60.0, 40.0, float("nan")], [80.0, 70.0, 20.0, 50.0], [60.0, 70.0, 40.0, 50.0]])
    loss = torch.tensor([[0.9, 1.0, 2.0, 1.0], [0.5, 1.2, 3.0, 1.1], [0.1, 0.8, 1.5, 0.9]])
    best, choice = bench.oracle(accuracy, loss, higher_is_better=True)
    assert best.tolist() == [80.0, 70.0, 40.0, 50.0]
    # Task 0: a tie at 80 between 0 and 1, 1 has the lower loss (2 has lower loss but is less accurate).
    # Task 3: a NaN accuracy is the worst, not the best.
    assert choice.tolist() == [1, 2, 2, 2]


def test_the_mse_oracle_takes_the_lowest_error_and_a_diverged_task_never_wins(bench) -> None:
    mse = torch.tensor([[0.5, float("nan")], [0.25, 3.0]])
    best, choice = bench.oracle(mse, mse, higher_is_better=False)
    assert best.tolist() == [0.25, 3.0] and choice.tolist() == [1, 1]


class _Fixed(torch.nn.Module):
    """A 'model' whose adaptation returns fixed logits: scores the metric alone."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.backbone, self.inner_loss, self.logits = torch.nn.Identity(), torch.nn.Identity(), logits

    def adapt(self, task: Task, steps: int) -> list[dict]:
        return [{}]


def test_classification_tasks_are_scored_by_query_accuracy_in_percent(bench, monkeypatch) -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 5.0]])
    monkeypatch.setattr(bench, "forward", lambda module, params, x: logits)
    task = Task(torch.zeros(2, 1), torch.tensor([0, 1]), torch.zeros(4, 1), torch.tensor([0, 1, 1, 1]))
    accuracy, loss, choices = bench.query_scores(_Fixed(logits), [task], steps=1)
    assert accuracy.tolist() == [75.0] and choices is None
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, task.query_y).item())


def test_the_omniglot_mode_sets_classification_selectors_and_metal(bench) -> None:
    mode = bench.Mode("omniglot")
    assert "--model.init_args.inner_loss.init_args.kind=classification" in mode.inner_loss_args("mixture")
    assert "--model.init_args.inner_loss.init_args.outputs=5" in mode.inner_loss_args("ML3")
    assert "--model.init_args.inner_loss=lightning_meta.losses.MeTALLoss" in mode.inner_loss_args("MeTAL")
    assert all("kind=" not in a for a in bench.Mode("loss").inner_loss_args("mixture"))


def test_selector_args_reach_the_mixture_and_the_policy_but_not_the_bandit(bench) -> None:
    mode = bench.Mode("omniglot", ["probe_lr=0.1", "label_consistency=true"])
    for method in ("mixture", "policy"):
        args = mode.inner_loss_args(method)
        # After the class path, so jsonargparse applies them to the selector.
        assert args.index("--model.init_args.inner_loss.init_args.probe_lr=0.1") > args.index(
            f"--model.init_args.inner_loss={bench.SELECTORS[method]}"
        )
    assert all("probe_lr" not in a for a in mode.inner_loss_args("bandit"))
    assert all("probe_lr" not in a for a in mode.inner_loss_args("cross_entropy"))


def test_selector_args_override_the_omniglot_candidates_to_reach_the_step_size_axis(bench) -> None:
    # `--selector-arg=candidates=[cross_entropy] --selector-arg=lr_scales=[...]`: the lr axis in
    # omniglot mode. jsonargparse keeps the last value, so the selector args must follow the default
    # candidates (the five losses) for the one-loss candidate list to win.
    mode = bench.Mode("omniglot", ["candidates=[cross_entropy]", "lr_scales=[0.25,1.0]"])
    prefix = "--model.init_args.inner_loss.init_args."
    for method in ("mixture", "policy"):
        args = mode.inner_loss_args(method)
        defaults = args.index(prefix + "candidates=[" + ",".join(bench.OMNIGLOT_CANDIDATES) + "]")
        assert args.index(prefix + "candidates=[cross_entropy]") > defaults
        assert args.index(prefix + "lr_scales=[0.25,1.0]") > defaults


def test_a_candidate_outside_the_default_five_is_a_fixed_method_and_joins_the_oracle(bench) -> None:
    mode = bench.Mode("omniglot", ["candidates=[cross_entropy,consistency_filtered_cross_entropy]"])
    name = "consistency_filtered_cross_entropy"
    assert name not in mode.candidates  # the default methods (and the README's table) are unchanged
    assert f"--model.init_args.inner_loss.init_args.name={name}" in mode.inner_loss_args(name)
    assert mode.fixed({"policy": 0, name: 0, "cross_entropy": 0}) == ["cross_entropy", name]
    with pytest.raises(ValueError, match="choose among"):
        mode.inner_loss_args("no_such_loss")


def test_the_omniglot_caption_states_the_training_inner_steps_an_override_sets(bench) -> None:
    import argparse

    kinds = torch.tensor([0, 1])
    args = argparse.Namespace(mode="omniglot", steps=250, seed=0, eval_steps=3, test_tasks=2, override=[])
    assert "1 inner step in training" in bench.caption(args, kinds, ("clean", "corrupted"))
    args.override = ["--model.init_args.eval_inner_steps=10", "--model.init_args.inner_steps=3"]
    assert "3 inner steps in training" in bench.caption(args, kinds, ("clean", "corrupted"))


@pytest.fixture
def paired(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    return importlib.import_module("loss_selection_paired")


def test_paired_rows_difference_per_task_type_and_over_all(paired) -> None:
    kinds = torch.tensor([0, 0, 1, 1])
    values, reference = torch.tensor([90.0, 80.0, 60.0, 40.0]), torch.tensor([80.0, 80.0, 60.0, 50.0])
    row = paired.paired_row("a − b", values, reference, kinds, 2)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "a − b"
    assert [c.split(" ± ")[0] for c in cells[1:]] == ["+5.00", "-5.00", "+0.00"]


def test_the_scale_auc_is_one_when_every_corrupted_task_takes_the_smaller_step(paired) -> None:
    kinds = torch.tensor([0, 0, 1, 1])
    assert paired.scale_auc(torch.tensor([1.0, 0.9, 0.5, 0.6]), kinds) == 1.0
    assert paired.scale_auc(torch.tensor([0.5, 0.6, 1.0, 0.9]), kinds) == 0.0
    assert paired.scale_auc(torch.ones(4), kinds) == 0.5
