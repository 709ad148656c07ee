"""Mixed precision: the chunked meta-gradient goes through the float16 loss scaler like one backward.

Lightning's `MixedPrecision("16-mixed")` multiplies the loss a training step returns by its
`GradScaler`'s scale before the backward, so that small float16 gradients do not underflow, and
skips the optimizer step (halving the scale) when the scaled gradient overflowed. With more than
one chunk per step (the loop's default: one task per chunk), each chunk's gradient is taken inside
the training step, before Lightning's backward: it must be scaled the same way, and an overflow in
it must still reach the scaler.

On CPU, Lightning replaces `precision="16-mixed"` by `"bf16-mixed"` (it warns: no fp16 AMP on CPU),
so the float16 tests build `MixedPrecision("16-mixed", "cpu")` themselves: torch runs float16
autocast and `GradScaler` on CPU. The same tests run on CUDA in the `gpu` tier.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import nn

from lightning_meta.algorithms import MAML
from lightning_meta.algorithms.base import MetaLearner, TaskOutput
from lightning_meta.data import SinusoidDataModule
from lightning_meta.models import MLP
from lightning_meta.task import Task
from tests.helpers import quiet_trainer

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]


class TinyLoss(MetaLearner):
    """A linear read-out whose query loss is `1e-8 ×` its mean output: under float16 autocast the
    gradient reaching each float16 output (1e-8 shared by the queries and tasks of the batch) is
    below float16's smallest subnormal (6e-8) and rounds to 0 unless the loss is scaled first, as
    `GradScaler` does.

    `inf_at_task`: the n-th task this learner runs (counting from 0) adds `sqrt(b − b)`, which is 0
    but has an infinite gradient, so that chunk's meta-gradient is inf while the meta-loss is finite.
    """

    def __init__(self, inf_at_task: int | None = None) -> None:
        super().__init__(nn.Linear(1, 1))
        self.inf_at_task, self.tasks_run = inf_at_task, 0

    def task_loss(self, task: Task) -> TaskOutput:
        out = self.backbone(task.query_x)
        loss = 1e-8 * out.float().mean()
        if self.tasks_run == self.inf_at_task:
            bias = self.backbone.bias
            loss = loss + torch.sqrt(bias - bias.detach()).sum()
        self.tasks_run += 1
        return TaskOutput(loss, out)


class Gradients(pl.Callback):
    """The meta-gradient of each step as the optimizer sees it (after the scaler unscaled it)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []
        self.weights_before: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.weights_before.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters()})


def fit_fp16(
    model: MetaLearner, device: str, chunk: int | None, steps: int, init_scale: float = 2.0**16, tasks: int = 4
) -> tuple[Gradients, torch.amp.GradScaler]:
    pl.seed_everything(0)
    model.task_batching, model.task_chunk_size = "loop", chunk
    scaler = torch.amp.GradScaler(device, init_scale=init_scale)
    grads = Gradients()
    trainer = quiet_trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        plugins=[MixedPrecision("16-mixed", device, scaler)],
        max_steps=steps,
        limit_val_batches=0,
        callbacks=[grads],
    )
    trainer.fit(model, datamodule=SinusoidDataModule(tasks_per_batch=tasks, val_tasks=2))
    return grads, scaler


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_float16_meta_gradient_is_scaled_and_equals_the_unchunked_one(device):
    whole, _ = fit_fp16(TinyLoss(), device, chunk=4, steps=1)  # one chunk: Lightning's scaled backward
    (reference,) = whole.steps
    assert reference["backbone.weight"].abs().item() > 1e-10, "the scaled gradient should not underflow"
    for chunk in (None, 3):  # None: the loop's default, one task per chunk
        chunked, _ = fit_fp16(TinyLoss(), device, chunk=chunk, steps=1)
        (grads,) = chunked.steps
        # Unscaled, every chunk's float16 gradient would have underflowed to exactly 0.
        for name in reference:
            torch.testing.assert_close(grads[name], reference[name], rtol=1e-3, atol=0, msg=f"chunk={chunk} {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_maml_chunked_float16_meta_gradient_equals_the_unchunked_one(device):
    def gradient(chunk: int | None) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = MAML(MLP(hidden_sizes=[16, 16]), inner_lr=0.01, inner_steps=2)
        # A scale that does not overflow on this model's first step, so that step is taken.
        recorded, _ = fit_fp16(model, device, chunk=chunk, steps=1, init_scale=2.0**8)
        (grads,) = recorded.steps
        return grads

    reference = gradient(4)  # one chunk of all 4 tasks: one graph, Lightning's own backward
    assert all(torch.isfinite(g).all() for g in reference.values())
    for chunk in (None, 3):  # None: the loop's default, one task per chunk
        grads = gradient(chunk)
        for name in reference:
            torch.testing.assert_close(grads[name], reference[name], rtol=1e-3, atol=1e-6, msg=f"chunk={chunk} {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_an_inf_in_one_chunks_gradient_reaches_the_scaler_which_skips_the_step(device):
    model = TinyLoss(inf_at_task=1)  # the second chunk of the first step (one task per chunk)
    grads, scaler = fit_fp16(model, device, chunk=1, steps=3, init_scale=2.0**10)
    # The scaler saw the inf: it skipped the first optimizer step and halved its scale; the two
    # steps after it were taken at that scale. Not the project's non-finite guard: the meta-loss
    # was finite, and an overflow under a loss scaler is the scaler's to handle.
    assert not torch.isfinite(grads.steps[0]["backbone.bias"]).all()
    assert scaler.get_scale() == 2.0**9
    assert model.skipped_steps == 0
    for name, before in grads.weights_before[0].items():
        assert torch.equal(grads.weights_before[1][name], before), f"{name} changed in the skipped step"
    assert not torch.equal(grads.weights_before[2]["backbone.weight"], grads.weights_before[1]["backbone.weight"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_nan_meta_loss_under_the_scaler_still_stops_training():
    """Deferring overflows to the scaler must not hide a diverged meta-loss."""
    model = MAML(MLP(hidden_sizes=[8]), inner_lr=1e30)
    with pytest.raises(FloatingPointError, match=r"MAML: meta-loss is (nan|inf) at global step 0"):
        fit_fp16(model, "cpu", chunk=1, steps=2)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_trains_through_the_cli(precision, tmp_path):
    """`--trainer.precision 16-mixed` on CPU: Lightning runs bf16 autocast there (with a warning),
    so both flags train here; the gpu tier's float16 run is `test_float16_trains_through_the_cli_on_cuda`."""
    from lightning_meta.cli import run_cli

    cli = run_cli(cli_args(precision, tmp_path), run=False)
    before = {n: p.detach().clone() for n, p in cli.model.named_parameters()}
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 4
    assert cli.trainer.precision == "bf16-mixed"  # what Lightning runs on CPU for either flag
    for name, value in cli.model.named_parameters():
        assert torch.isfinite(value).all() and not torch.equal(value, before[name]), name


@pytest.mark.gpu
def test_float16_trains_through_the_cli_on_cuda(tmp_path):
    from lightning_meta.cli import run_cli

    # 20 steps: the scaler starts at 2**16 and may skip the first few while it halves its scale.
    args = [*cli_args("16-mixed", tmp_path, steps=20), "--trainer.accelerator=gpu", "--trainer.devices=1"]
    cli = run_cli(args, run=False)
    before = {n: p.detach().clone() for n, p in cli.model.named_parameters()}
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.precision == "16-mixed" and cli.trainer.precision_plugin.scaler is not None
    assert cli.trainer.global_step == 20
    for name, value in cli.model.named_parameters():
        assert torch.isfinite(value).all() and not torch.equal(value.cpu(), before[name].cpu()), name


def cli_args(precision: str, tmp_path, steps: int = 4) -> list[str]:
    return [
        "--config",
        "configs/sinusoid/maml.yaml",
        f"--trainer.precision={precision}",
        f"--trainer.max_steps={steps}",
        "--trainer.limit_val_batches=0",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--data.tasks_per_batch=3",
        "--data.val_tasks=2",
    ]
