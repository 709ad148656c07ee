"""DDP on 2 CPU processes (gloo): the averaged meta-gradient after one step equals one process's
gradient on the union of both ranks' tasks, in float64. The runs are the session's two launches
of `tests/ddp_gradients.py` (fixtures `ddp_launches` and `ddp_run` in conftest.py)."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.distributed
@pytest.mark.parametrize(
    "ddp_case",
    [
        "maml",
        "maml-vmap",
        "protonet",
        "metasgd",
        "mamlpp",
        "reptile",
        "siamese",
        "siamese-contrastive",
        "matching",
        "relation",
        "cavia",
        "maml-learned-opt",
        "maml-metalstm",
        "maml-metal",
    ],
)
def test_ddp_meta_gradient_equals_single_process_gradient_on_the_union_of_tasks(ddp_case, ddp_run):
    single, half, ddp = (run["grads"] for run in ddp_run)
    assert single.keys() == ddp.keys() and single
    for name in single:
        assert single[name].dtype == torch.float64
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-9, atol=1e-12, msg=name)
    # Not vacuous: one rank's half of the tasks alone gives a different gradient.
    assert max((half[n] - single[n]).abs().max() for n in single) > 1e-6

    # Evaluation after that step: the 5 fixed validation tasks, split 3 + 2 across the ranks and
    # gathered, give the single process's mean and confidence interval.
    assert ddp_run.ddp["val"]["val/tasks"] == ddp_run.single["val"]["val/tasks"] == 5
    for key in ("val/loss", "val/loss_ci95", "val/acc", "val/acc_ci95"):
        # Accuracies are float32 (`.float()` of a boolean) whatever the precision, and the
        # gathered order differs from the single process's: 1e-7 apart is rounding.
        tolerance = 1e-6 if "acc" in key else 1e-9
        assert abs(ddp_run.ddp["val"][key] - ddp_run.single["val"][key]) < tolerance, key


def test_a_crashed_launch_is_relaunched_once_from_the_case_it_was_running(tmp_path, monkeypatch):
    from tests.helpers import launch_ddp_cases

    marker = tmp_path / "aborted"
    monkeypatch.setenv("DDP_GRADIENTS_ABORT_ONCE", f"reptile:{marker}")
    with pytest.warns(
        UserWarning, match=r"crashed \(exit status -6\) in case reptile; relaunching cases \['reptile'\]"
    ):
        launch_ddp_cases(["protonet", "reptile"], 1, tmp_path / "out")
    assert marker.exists()
    assert (tmp_path / "out" / "protonet.pt").exists() and (tmp_path / "out" / "reptile.pt").exists()


def test_a_launch_that_exits_with_an_error_is_not_relaunched(tmp_path):
    from tests.helpers import launch_ddp_cases

    with pytest.raises(AssertionError, match=r"exit status 2(.|\n)*unknown cases \['no-such-case'\]"):
        launch_ddp_cases(["no-such-case"], 1, tmp_path / "out")
