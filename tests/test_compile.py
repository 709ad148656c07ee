"""`compile_backbone`: the backbone through `torch.compile` gives the eager numbers.

The default backend (inductor, which generates and compiles C++ on a CPU) is checked in float64
for first-order MAML (which `compile="auto"` compiles) and ProtoNet; it takes tens of seconds, so
those tests are `slow`. Every other algorithm, the second-order fallback and
the vmap path are checked with the `aot_eager` backend: the same graph capture (Dynamo) and the
same compiled autograd (AOTAutograd, which refuses double backward) without code generation, in
about a second each.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

from lightning_meta.algorithms import MAML, ProtoNet, task_parallel
from lightning_meta.callbacks import TaskBatching
from lightning_meta.models import Conv4
from lightning_meta.task import TaskBatch
from tests.test_contract import SETUPS

pytestmark = [
    pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`"),
    # Inductor's own imports, nothing of ours.
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch._dynamo.reset()
    counters.clear()
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setattr(task_parallel, "COMPILE_OPTIONS", {**task_parallel.COMPILE_OPTIONS, "backend": "aot_eager"})


def batch(tasks: int = 2, ways: int = 3, per_class: int = 2, side: int = 28) -> TaskBatch:
    """Support and query sets of the same size, so one compiled graph serves both."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(ways).repeat_interleave(per_class).repeat(tasks, 1)
    return TaskBatch(
        support_x=torch.randn(tasks, ways * per_class, 1, side, side, generator=g),
        support_y=labels,
        query_x=torch.randn(tasks, ways * per_class, 1, side, side, generator=g),
        query_y=labels.clone(),
    )


def step(model, compile, tasks: TaskBatch, path: str = "loop"):
    """One training step's meta-loss and meta-gradient, then the evaluation statistics."""
    model.compile_backbone, model.task_batching = compile, path
    model.train()
    model.zero_grad()
    objective = model.training_step(tasks, 0)
    objective.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.eval()
    model._eval_step(tasks, "validation")
    (evaluation,) = model._eval_outputs
    model._eval_outputs = []
    return objective.detach(), grads, evaluation


def assert_same(compiled, eager, tol: float) -> None:
    (loss, grads, evaluation), (ref_loss, ref_grads, ref_evaluation) = compiled, eager
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=tol, atol=tol, msg=name)
    for key in ref_evaluation:
        torch.testing.assert_close(evaluation[key], ref_evaluation[key], rtol=tol, atol=tol, msg=key)
    assert any(g.abs().max() > 1e-3 for g in ref_grads.values())


def twins(build):
    torch.manual_seed(0)
    eager = build()
    torch.manual_seed(0)
    return eager, build()


@pytest.mark.slow
@pytest.mark.parametrize(
    "build",
    [
        lambda: MAML(Conv4(hidden_channels=4, out_features=3), inner_lr=0.4, inner_steps=2, first_order=True),
        lambda: ProtoNet(Conv4(hidden_channels=4)),
    ],
    ids=["first-order-MAML", "ProtoNet"],
)
def test_inductor_compiled_steps_match_eager_in_float64(build):
    eager, compiled = twins(build)
    tasks = batch()
    reference = step(eager, False, tasks)
    assert eager.backbone._compiled_call_impl is None
    result = step(compiled, True, tasks)
    assert compiled.backbone._compiled_call_impl is not None
    assert counters["stats"]["unique_graphs"] >= 1
    # One graph per shape and mode: inner_loop.forward's key check and the per-task function's
    # autograd.grad run outside the compiled backbone, so nothing breaks its graph.
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert_same(result, reference, tol=1e-10)


@pytest.mark.parametrize("name", [n for n in SETUPS if "sinusoid" not in n])
def test_every_algorithm_gives_the_eager_numbers_compiled(name, aot_eager):
    eager, compiled = twins(lambda: SETUPS[name]()[0])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "compiled backbone: second-order", UserWarning)
        assert_same(step(compiled, True, batch()), step(eager, False, batch()), tol=1e-12)
    assert compiled.backbone._compiled_call_impl is not None


@pytest.mark.filterwarnings("ignore:compiled backbone. second-order")  # ANIL's head adapts second order
@pytest.mark.parametrize("name", ["MAML-first-order", "ProtoNet", "ANIL"])
def test_the_per_example_protocol_gives_the_eager_numbers_compiled(name, aot_eager):
    # Its BatchNorm hooks read context variables, which Dynamo does not trace: graph breaks, same numbers.
    eager, compiled = twins(lambda: SETUPS[name]()[0])
    for model in (eager, compiled):
        model.train_protocol = model.eval_protocol = "per_example"
    assert_same(step(compiled, True, batch()), step(eager, False, batch()), tol=1e-12)
    assert counters["graph_break"]


@pytest.mark.parametrize("algorithm", ["MAML", "MetaSGD", "MAMLPlusPlus-second-order"])
def test_second_order_runs_the_support_forward_eagerly_and_says_so(algorithm, aot_eager):
    eager, compiled = twins(lambda: SETUPS[algorithm]()[0])
    reference = step(eager, False, batch())
    with pytest.warns(UserWarning, match="second-order inner gradients run the support forward eagerly"):
        result = step(compiled, True, batch())
    assert_same(result, reference, tol=1e-12)


def test_without_the_fallback_second_order_fails_in_torch(aot_eager, monkeypatch):
    # Why the fallback exists: AOTAutograd cannot differentiate a compiled backward again. If this
    # ever passes, torch supports double backward through compiled graphs and the fallback can go.
    monkeypatch.setattr(task_parallel, "compiled_backbone", contextlib.nullcontext)  # the inner loop is not told
    torch.manual_seed(0)
    model = MAML(Conv4(hidden_channels=4, out_features=3), inner_lr=0.4)
    model.compile_backbone = True
    with pytest.raises(RuntimeError, match=r"does not currently support double backward"):
        model.training_step(batch(), 0).backward()


def test_vmapped_steps_run_eagerly_after_compiled_loop_steps(aot_eager):
    build = lambda: MAML(Conv4(hidden_channels=4, out_features=3, norm="plain_batch"), inner_steps=2, first_order=True)  # noqa: E731
    eager, compiled = twins(build)
    step(compiled, True, batch())  # the loop: compiles the backbone
    assert compiled.backbone._compiled_call_impl is not None
    # vmap around a compiled module is not what the parity tests cover: it runs eagerly.
    assert_same(step(compiled, True, batch(), "vmap"), step(eager, False, batch(), "vmap"), tol=1e-12)


def test_auto_compiles_measured_algorithms_in_long_cpu_fits_only(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # What "auto" compiles is what the inductor float64 test above proves equal.
    assert MAML(Conv4(out_features=5), first_order=True).compile_by_default
    assert not ProtoNet(Conv4()).compile_by_default  # not measured faster through the Trainer
    assert not MAML(Conv4(out_features=5)).compile_by_default  # second order: the support forward stays eager
    batching = task_parallel.TaskBatching()
    assert batching.compile == "auto"
    long_fit, short_fit, no_fit = (lambda: 10**6), (lambda: 20), (lambda: None)
    assert batching.compile_wanted(True, long_fit, cpu)
    assert not batching.compile_wanted(True, short_fit, cpu)  # compilation would not pay back: tests stay eager
    assert not batching.compile_wanted(True, no_fit, cpu)  # a step outside Trainer.fit
    assert not batching.compile_wanted(False, long_fit, cpu)
    assert not batching.compile_wanted(True, long_fit, cuda)  # not measured on a GPU
    monkeypatch.setattr(task_parallel, "cpu_compiler_found", lambda: False)
    assert not batching.compile_wanted(True, long_fit, cpu)  # inductor would fail without a C++ compiler
    batching.compile = True
    assert batching.compile_wanted(False, no_fit, cuda)
    batching.compile = 1
    with pytest.raises(ValueError, match="compile=1 is not one of 'auto', true, false"):
        batching.compile_wanted(True, long_fit, cpu)


@pytest.mark.parametrize(
    "max_steps, max_time, compiled",
    [
        (20, None, False),
        (5000, None, True),
        # A 4-minute fit (the Omniglot table's budget) would spend its time compiling.
        (5000, "00:00:04:00", False),
        (5000, "00:01:00:00", True),
    ],
)
def test_auto_weighs_the_fit_the_trainer_plans(max_steps, max_time, compiled, aot_eager, tmp_path, monkeypatch):
    import pytorch_lightning as pl

    from tests.helpers import SyntheticClassesDataModule

    class StopAfterOneStep(pl.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            trainer.should_stop = True

    monkeypatch.setattr(task_parallel, "cpu_compiler_found", lambda: True)  # aot_eager needs none
    torch.set_default_dtype(torch.float32)
    model = MAML(Conv4(hidden_channels=4, out_features=3), first_order=True)
    trainer = pl.Trainer(
        max_steps=max_steps,
        max_time=max_time,
        callbacks=[StopAfterOneStep()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=SyntheticClassesDataModule())
    assert model.compile_backbone == "auto" and trainer.global_step == 1
    assert (model.backbone._compiled_call_impl is not None) is compiled


def test_auto_compiles_training_steps_and_leaves_evaluation_eager(aot_eager, monkeypatch):
    # Evaluation's other shapes and grad mode would recompile the backbone for few steps.
    monkeypatch.setattr(task_parallel, "cpu_compiler_found", lambda: True)
    model = MAML(Conv4(hidden_channels=4, out_features=4), first_order=True)
    monkeypatch.setattr(model, "_planned_steps", lambda: 10**6)
    model.compile_backbone = "auto"
    model.training_step(batch(ways=4), 0).backward()
    assert model.backbone._compiled_call_impl is not None
    compiled_frames = counters["stats"]["unique_graphs"]
    assert compiled_frames > 0
    model._eval_step(batch(ways=4, per_class=3), "validation")  # a new shape: compiling it would add graphs
    assert counters["stats"]["unique_graphs"] == compiled_frames
    model.compile_backbone = True  # what "auto" leaves eager, true compiles
    model._eval_step(batch(ways=4, per_class=3), "validation")
    assert counters["stats"]["unique_graphs"] > compiled_frames


def test_auto_leaves_a_step_outside_a_long_fit_eager():
    model = MAML(Conv4(hidden_channels=4, out_features=3), first_order=True)
    step(model, "auto", batch())
    assert model.backbone._compiled_call_impl is None


def test_the_task_batching_callback_sets_compile_from_the_trainer_config():
    from lightning_meta.cli import run_cli

    cli = run_cli(
        [
            "--config",
            "configs/sinusoid/maml.yaml",
            "--trainer.logger=false",
            "--trainer.callbacks+=lightning_meta.callbacks.TaskBatching",
            "--trainer.callbacks.compile=true",
        ],
        run=False,
    )
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, TaskBatching)]
    callback.setup(cli.trainer, cli.model, "fit")
    assert cli.model.compile_backbone is True
    with pytest.raises(ValueError, match="compile='yes' is not one of true, false, 'auto'"):
        TaskBatching(compile="yes")
