"""Task-parallel (vmapped) and chunked meta-gradients equal the per-task loop, in float64."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_meta.algorithms import MAML
from lightning_meta.algorithms.task_parallel import vmap_blocker
from lightning_meta.data import SinusoidDataModule
from lightning_meta.models import MLP, Conv4, PlainBatchNorm2d
from lightning_meta.task import TaskBatch


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def conv_batch(tasks: int = 4, ways: int = 3, shots: int = 2, queries: int = 3) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    return TaskBatch(
        support_x=torch.randn(tasks, ways * shots, 1, 16, 16, generator=g),
        support_y=torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1),
        query_x=torch.randn(tasks, ways * queries, 1, 16, 16, generator=g),
        query_y=torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1),
    )


def meta_gradient(model: MAML, batch: TaskBatch, batching: str, chunk: int | None):
    model.zero_grad()
    model.task_batching, model.task_chunk_size = batching, chunk
    objective = model.training_step(batch, 0)
    objective.backward()
    return objective.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def maml(norm: str, first_order: bool = False, downsample: str = "max_pool") -> MAML:
    torch.manual_seed(0)
    backbone = Conv4(hidden_channels=4, out_features=3, norm=norm, downsample=downsample)
    return MAML(backbone, inner_lr=0.4, inner_steps=2, first_order=first_order)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize(
    "norm, downsample",
    [("none", "max_pool"), ("group", "max_pool"), ("plain_batch", "max_pool"), ("plain_batch", "stride")],
)
def test_vmap_and_chunks_give_the_loop_meta_gradient(norm, downsample, first_order):
    model, batch = maml(norm, first_order, downsample), conv_batch()
    assert vmap_blocker(model) is None
    reference_loss, reference = meta_gradient(model, batch, "loop", chunk=4)  # one graph, one backward
    for batching, chunk in [("loop", 1), ("vmap", 4), ("vmap", 3), ("vmap", 1)]:
        loss, grads = meta_gradient(model, batch, batching, chunk)
        torch.testing.assert_close(loss, reference_loss, rtol=1e-12, atol=1e-12)
        for name in reference:
            torch.testing.assert_close(
                grads[name], reference[name], rtol=1e-9, atol=1e-11, msg=f"{batching}/{chunk} {name}"
            )
    assert any(g.abs().max() > 1e-3 for g in reference.values())


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_nn_batchnorm_is_never_vmapped_and_the_upstream_bug_is_still_there():
    model, batch = maml("batch"), conv_batch()
    assert "functorch#534" in vmap_blocker(model)
    with pytest.raises(ValueError, match=r"task_batching='vmap' cannot be used: .*BatchNorm2d.*plain_batch"):
        meta_gradient(model, batch, "vmap", None)
    # The reason, measured: vmapped second-order meta-gradients through nn.BatchNorm2d are wrong.
    # If this assertion ever fails, torch has fixed it and nn.BatchNorm can join VMAP_PROVEN.
    _, loop = meta_gradient(model, batch, "loop", None)
    model.zero_grad()
    from lightning_meta.algorithms import task_parallel

    loss = task_parallel.run_vmap(model.task_loss, batch)["loss"].mean()
    loss.backward()
    worst = max(
        ((p.grad - loop[n]).norm() / loop[n].norm().clamp_min(1e-12)).item() for n, p in model.named_parameters()
    )
    assert worst > 1e-3, "vmap through nn.BatchNorm2d now matches the loop: the upstream bug is fixed"


def test_plain_batchnorm_equals_nn_batchnorm_on_batch_statistics():
    torch.manual_seed(0)
    reference, plain = nn.BatchNorm2d(5, track_running_stats=False), PlainBatchNorm2d(5)
    with torch.no_grad():
        for layer in (reference, plain):
            layer.weight.copy_(torch.linspace(0.5, 2, 5))
            layer.bias.copy_(torch.linspace(-1, 1, 5))
    x = torch.randn(6, 5, 4, 4, requires_grad=True)
    out_ref, out_plain = reference(x), plain(x)
    torch.testing.assert_close(out_plain, out_ref, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(out_ref)
    grads_ref = torch.autograd.grad((out_ref * weights).sum(), [x, reference.weight, reference.bias])
    grads_plain = torch.autograd.grad((out_plain * weights).sum(), [x, plain.weight, plain.bias])
    for a, b in zip(grads_plain, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_auto_times_both_paths_then_keeps_one_and_training_matches_the_loop(tmp_path):
    def fit(batching: str) -> tuple[MAML, dict[str, torch.Tensor]]:
        pl.seed_everything(0)
        model = MAML(MLP(), inner_lr=0.01, inner_steps=2)
        model.task_batching = batching
        trainer = pl.Trainer(
            max_steps=6,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            precision="64-true",
            default_root_dir=tmp_path,
        )
        trainer.fit(model, datamodule=SinusoidDataModule(tasks_per_batch=5))
        return model, {n: p.detach().clone() for n, p in model.named_parameters()}

    auto, auto_weights = fit("auto")
    assert [b for b, _ in auto.task_batcher.times] == ["loop", "vmap", "loop", "vmap"]
    assert auto.task_batcher.chosen in ("loop", "vmap")
    _, loop_weights = fit("loop")
    for name in loop_weights:
        torch.testing.assert_close(auto_weights[name], loop_weights[name], rtol=1e-9, atol=1e-12)


def test_auto_picks_the_loop_without_timing_when_vmap_is_not_proven():
    model = maml("batch")
    assert model.task_batcher.training_path(model._check_vmap) == "loop" and model.task_batcher.times == []


def test_the_task_batching_callback_sets_the_mode_from_the_trainer_config():
    from lightning_meta.callbacks import TaskBatching
    from lightning_meta.cli import run_cli

    cli = run_cli(
        [
            "--config",
            "configs/sinusoid/maml.yaml",
            "--trainer.logger=false",
            "--trainer.callbacks+=lightning_meta.callbacks.TaskBatching",
            "--trainer.callbacks.mode=vmap",
            "--trainer.callbacks.chunk_size=5",
        ],
        run=False,
    )
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, TaskBatching)]
    callback.setup(cli.trainer, cli.model, "fit")
    assert (cli.model.task_batching, cli.model.task_chunk_size) == ("vmap", 5)
    with pytest.raises(ValueError, match="mode='vector' is not one of"):
        TaskBatching(mode="vector")


def test_chunk_for_memory_fits_the_budget():
    from lightning_meta.algorithms.task_parallel import chunk_for_memory

    assert chunk_for_memory(32, bytes_per_task=100.0, free=10_000, fraction=0.5) == 32
    assert chunk_for_memory(32, bytes_per_task=1000.0, free=10_000, fraction=0.5) == 5
    assert chunk_for_memory(32, bytes_per_task=1e9, free=10_000, fraction=0.5) == 1  # never 0


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_vmap_chunks_are_sized_from_measured_memory_and_keep_the_meta_gradient(monkeypatch):
    from lightning_meta.algorithms import task_parallel

    if task_parallel.memory_mark(torch.device("cpu")) is None:
        pytest.skip("this host cannot measure its peak resident memory (/proc/self/clear_refs)")
    model, batch = maml("plain_batch"), conv_batch(tasks=4)
    reference_loss, reference = meta_gradient(model, batch, "loop", None)
    # First vmapped step: whole, and it measures the bytes one vmapped task takes.
    meta_gradient(model, batch, "vmap", None)
    per_task = model.task_batcher.bytes_per_vmapped_task
    assert per_task is not None and per_task > 0
    assert model.task_batcher.chunk_size_for("vmap", len(batch), model.device) == len(
        batch
    )  # this machine has room for 4
    # With free memory for about 1.5 tasks at the host's fraction, chunks of 1 follow.
    monkeypatch.setattr(task_parallel, "memory_free", lambda device: int(1.5 * per_task / 0.5))
    sizes = []
    real_split = task_parallel.split
    monkeypatch.setattr(task_parallel, "split", lambda b, size: sizes.append(size) or real_split(b, size))
    loss, grads = meta_gradient(model, batch, "vmap", None)
    assert sizes == [1]
    torch.testing.assert_close(loss, reference_loss, rtol=1e-12, atol=1e-12)
    for name in reference:
        torch.testing.assert_close(grads[name], reference[name], rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_resnet12_vmap_verdicts():
    from lightning_meta.models import ResNet12

    def resnet_maml(**kwargs) -> MAML:
        torch.manual_seed(0)
        backbone = ResNet12(in_channels=1, channels=(2, 3, 4, 4), out_features=3, image_size=16, **kwargs)
        return MAML(backbone, inner_lr=0.4, inner_steps=2)

    # Proven: plain-op BatchNorm, LeakyReLU and the residual sums, second order, in float64.
    model, batch = resnet_maml(norm="plain_batch"), conv_batch()
    assert vmap_blocker(model) is None
    reference_loss, reference = meta_gradient(model, batch, "loop", chunk=4)
    for chunk in (4, 3):
        loss, grads = meta_gradient(model, batch, "vmap", chunk)
        torch.testing.assert_close(loss, reference_loss, rtol=1e-12, atol=1e-12)
        for name in reference:
            torch.testing.assert_close(grads[name], reference[name], rtol=1e-9, atol=1e-11, msg=f"{chunk} {name}")
    assert any(g.abs().max() > 1e-3 for g in reference.values())
    # Refused, with the reason: torch's BatchNorm (the upstream bug) and DropBlock's random masks.
    assert "BatchNorm2d" in vmap_blocker(resnet_maml())
    assert "DropBlock" in vmap_blocker(resnet_maml(norm="plain_batch", drop_rate=0.1))
    with pytest.raises(ValueError, match=r"task_batching='vmap' cannot be used: .*DropBlock.*use the loop path"):
        meta_gradient(resnet_maml(norm="plain_batch", drop_rate=0.1), batch, "vmap", None)
