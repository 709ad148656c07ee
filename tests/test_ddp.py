"""DDP on 2 CPU processes (gloo): the averaged meta-gradient after one step equals one process's
gradient on the union of both ranks' tasks, in float64."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_gradients.py")
SCRUB = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUB and not k.startswith("PL_")}
    env["OMP_NUM_THREADS"] = "1"  # 2 cores, 2 processes: one thread each
    return env


def run_ddp_script(script: str, devices: int, tasks_per_batch: int, out: Path, *args: str) -> dict:
    """Run `tests/<script>` (one training step, the gradient saved to `out`) on `devices` gloo
    processes in a clean environment; the saved dict, checked to come from that many processes."""
    command = [sys.executable, str(Path(__file__).with_name(script)), "--devices", str(devices)]
    command += ["--tasks-per-batch", str(tasks_per_batch), "--out", str(out), *args]
    result = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    saved = torch.load(out)
    assert saved["world_size"] == devices
    return saved


def meta_gradient(
    algorithm: str, devices: int, tasks_per_batch: int, out: Path, half_out: Path | None = None
) -> dict[str, torch.Tensor]:
    extra = ["--half-out", str(half_out)] if half_out is not None else []
    return run_ddp_script(SCRIPT.name, devices, tasks_per_batch, out, "--algorithm", algorithm, *extra)


@pytest.mark.distributed
@pytest.mark.parametrize(
    "algorithm",
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
def test_ddp_meta_gradient_equals_single_process_gradient_on_the_union_of_tasks(algorithm, tmp_path):
    # The single process also fits on half the tasks in the same launch (for the check below).
    single_run = meta_gradient(algorithm, 1, 4, tmp_path / "single.pt", half_out=tmp_path / "half.pt")
    ddp_run = meta_gradient(algorithm, devices=2, tasks_per_batch=2, out=tmp_path / "ddp.pt")
    single, ddp = single_run["grads"], ddp_run["grads"]
    assert single.keys() == ddp.keys() and single
    for name in single:
        assert single[name].dtype == torch.float64
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-9, atol=1e-12, msg=name)
    # Not vacuous: one rank's half of the tasks alone gives a different gradient.
    half = torch.load(tmp_path / "half.pt")["grads"]
    assert max((half[n] - single[n]).abs().max() for n in single) > 1e-6

    # Evaluation after that step: the 5 fixed validation tasks, split 3 + 2 across the ranks and
    # gathered, give the single process's mean and confidence interval.
    assert ddp_run["val"]["val/tasks"] == single_run["val"]["val/tasks"] == 5
    for key in ("val/loss", "val/loss_ci95", "val/acc", "val/acc_ci95"):
        # Accuracies are float32 (`.float()` of a boolean) whatever the precision, and the
        # gathered order differs from the single process's: 1e-7 apart is rounding.
        tolerance = 1e-6 if "acc" in key else 1e-9
        assert abs(ddp_run["val"][key] - single_run["val"][key]) < tolerance, key
