"""The evaluation protocol: transductive (BatchNorm over the support set and all queries) or per
example (each query normalised with the support set's statistics alone), for every exported
algorithm, on the loop and the vmap path, and as a CLI option recorded in checkpoints."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from lightning_meta.algorithms import ANIL, MAML, MAMLPlusPlus, MetaLearner, MetaSGD, ProtoNet
from lightning_meta.algorithms.base import PROTOCOLS
from lightning_meta.callbacks import EvaluationProtocol
from lightning_meta.cli import run_cli
from lightning_meta.inner_loop import named_params
from lightning_meta.models import Conv4
from lightning_meta.models.norm import batch_statistics_norm, query_groups, support_statistics, uses_batch_statistics
from lightning_meta.task import Task, TaskBatch
from tests.helpers import SyntheticClassesDataModule
from tests.test_contract import SETUPS

REPO = Path(__file__).resolve().parents[1]


def as_double(task: Task) -> Task:
    return Task(*(t.double() if torch.is_floating_point(t) else t for t in vars(task).values()))


def double_model_and_task(name: str) -> tuple[MetaLearner, Task]:
    torch.manual_seed(0)
    model, dm = SETUPS[name]()
    dm.setup("validate")
    return model.double().eval(), as_double(next(iter(dm.val_dataloader()))[0])


def with_other_queries(task: Task) -> Task:
    """The same task with every query but the first replaced by different inputs."""
    query_x = task.query_x.clone()
    noise = torch.randn(query_x[1:].shape, generator=torch.Generator().manual_seed(1), dtype=query_x.dtype)
    query_x[1:] = 2 * noise + 0.5
    return Task(task.support_x, task.support_y, query_x, task.query_y)


def first_query_prediction(model: MetaLearner, task: Task) -> torch.Tensor:
    return model(TaskBatch.stack([task])).predictions[0, 0].detach()


@pytest.mark.parametrize("name", sorted(SETUPS))
def test_per_example_prediction_of_a_query_ignores_the_other_queries(name):
    model, task = double_model_and_task(name)
    other = with_other_queries(task)
    model.eval_protocol = "per_example"
    torch.testing.assert_close(
        first_query_prediction(model, other), first_query_prediction(model, task), rtol=0, atol=1e-9
    )
    # Transductive, the other queries move it wherever BatchNorm normalises on batch statistics
    # (so the check above can fail); MLPs have no BatchNorm, so nothing can move it.
    model.eval_protocol = "transductive"
    moved = (first_query_prediction(model, other) - first_query_prediction(model, task)).abs().max()
    has_batch_norm = any(uses_batch_statistics(m) for m in model.modules())
    assert (moved > 1e-6) == has_batch_norm, f"{name}: transductive change {moved:.3g}, BatchNorm: {has_batch_norm}"


GRADIENT_BASED = [n for n in sorted(SETUPS) if hasattr(SETUPS[n]()[0], "adapt")]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", GRADIENT_BASED)
def test_adaptation_on_the_support_set_is_the_same_under_both_protocols(name, training):
    model, task = double_model_and_task(name)
    model.train(training)
    steps = 2
    reference = model.adapt(task, steps)
    with support_statistics(model, model.backbone, task.support_x):
        per_example = model.adapt(task, steps)
    for step, (got, want) in enumerate(zip(per_example, reference, strict=True)):
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=f"{name}: θ{step}[{key}]")


def support_statistics_by_hand(backbone: nn.Module, params: dict, support_x, query_x) -> torch.Tensor:
    """The backbone on `query_x`, each BatchNorm normalising with the mean and (biased) variance
    its input had when the support set alone went through: what per-example evaluation means."""
    batch_norms = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    stats: list[tuple[torch.Tensor, torch.Tensor]] = []
    record = [
        m.register_forward_pre_hook(
            lambda _m, args: stats.append((args[0].mean((0, 2, 3)), args[0].var((0, 2, 3), unbiased=False)))
        )
        for m in batch_norms
    ]
    torch.func.functional_call(backbone, params, (support_x,))
    for handle in record:
        handle.remove()
    fixed = iter(stats)

    def frozen(module: nn.BatchNorm2d, args: tuple, _output: torch.Tensor) -> torch.Tensor:
        mean, var = (s.view(1, -1, 1, 1) for s in next(fixed))
        scale = module.weight.view(1, -1, 1, 1) / (var + module.eps).sqrt()
        return (args[0] - mean) * scale + module.bias.view(1, -1, 1, 1)

    replace = [m.register_forward_hook(frozen) for m in batch_norms]
    try:
        return torch.func.functional_call(backbone, params, (query_x,))
    finally:
        for handle in replace:
            handle.remove()


def test_protonet_per_example_is_support_statistics_computed_by_hand():
    model, task = double_model_and_task("ProtoNet")
    model.eval_protocol = "per_example"
    got = model(TaskBatch.stack([task])).predictions[0]
    params = named_params(model.backbone)
    support = model.backbone(task.support_x)  # the support set, on its own statistics
    query = support_statistics_by_hand(model.backbone, params, task.support_x, task.query_x)
    centres = torch.stack([support[task.support_y == c].mean(0) for c in range(int(task.support_y.max()) + 1)])
    want = -(query.unsqueeze(1) - centres.unsqueeze(0)).pow(2).sum(-1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_maml_per_example_normalises_queries_with_the_support_statistics_under_adapted_params():
    model, task = double_model_and_task("MAML")
    model.eval_protocol = "per_example"
    got = model(TaskBatch.stack([task])).predictions[0]
    adapted = model.adapt(task, model.eval_inner_steps)[-1]
    want = support_statistics_by_hand(model.backbone, adapted, task.support_x, task.query_x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_query_groups_normalise_each_group_as_its_own_batch():
    x = torch.randn(12, 3, 4, 4, dtype=torch.float64)
    weight, bias = torch.rand(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    whole = batch_statistics_norm(x, weight, bias, 1e-5)
    with query_groups(4):  # outside the per-example protocol: a no-op
        torch.testing.assert_close(batch_statistics_norm(x, weight, bias, 1e-5), whole, rtol=0, atol=0)
    with support_statistics(nn.Identity(), nn.Identity(), x[:1]), query_groups(4):
        grouped = batch_statistics_norm(x, weight, bias, 1e-5)
    want = torch.cat([batch_statistics_norm(g, weight, bias, 1e-5) for g in x.split(4)])
    torch.testing.assert_close(grouped, want, rtol=0, atol=1e-12)
    assert not torch.allclose(grouped, whole)


@pytest.mark.parametrize("name", sorted(SETUPS))
def test_per_example_training_gives_every_trainable_parameter_a_gradient(name):
    torch.manual_seed(0)
    model, dm = SETUPS[name]()
    model.train_protocol = "per_example"
    loss, _ = model.meta_loss(next(iter(dm.train_dataloader())))
    loss.backward()
    assert torch.isfinite(loss)
    for param_name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), f"{name}: {param_name}"


VMAP_SETUPS = {
    "MAML": lambda: MAML(Conv4(hidden_channels=4, out_features=3, norm="plain_batch"), inner_lr=0.4, inner_steps=2),
    "MetaSGD": lambda: MetaSGD(Conv4(hidden_channels=4, out_features=3, norm="plain_batch"), inner_steps=2),
    "ANIL": lambda: ANIL(Conv4(hidden_channels=4, out_features=3, norm="plain_batch"), inner_steps=2),
    "MAMLPlusPlus": lambda: MAMLPlusPlus(
        Conv4(hidden_channels=4, out_features=3, norm="plain_batch"),
        inner_steps=2,
        multi_step_loss_epochs=0,
        first_order_epochs=0,
    ),
}


def double_batch() -> TaskBatch:
    dm = SyntheticClassesDataModule(tasks_per_batch=3)
    batch = next(iter(dm.train_dataloader()))
    return TaskBatch(batch.support_x.double(), batch.support_y, batch.query_x.double(), batch.query_y)


@pytest.mark.parametrize("name", sorted(VMAP_SETUPS))
def test_per_example_under_vmap_equals_the_loop(name):
    torch.manual_seed(0)
    model = VMAP_SETUPS[name]().double()
    assert model.supports_vmap
    batch = double_batch()
    model.eval_protocol = model.train_protocol = "per_example"
    model.eval()
    loop, vmapped = model(batch, "loop"), model(batch, "vmap")
    torch.testing.assert_close(vmapped.predictions, loop.predictions, rtol=0, atol=1e-10)
    other = TaskBatch(batch.support_x, batch.support_y, batch.query_x.clone(), batch.query_y)
    other.query_x[:, 1:] = -other.query_x[:, 1:] + 1
    torch.testing.assert_close(model(other, "vmap").predictions[:, 0], vmapped.predictions[:, 0], rtol=0, atol=1e-10)
    # Meta-training under the protocol, second order: the same meta-gradient on both paths.
    model.train()
    grads = {}
    for batching in ("loop", "vmap"):
        model.zero_grad()
        model.meta_loss(batch, batching)[0].backward()
        grads[batching] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for key, want in grads["loop"].items():
        torch.testing.assert_close(grads["vmap"][key], want, rtol=1e-8, atol=1e-10, msg=key)


def test_an_unknown_protocol_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"protocol.evaluation='inductive' is not one of"):
        EvaluationProtocol(evaluation="inductive")
    model = ProtoNet(Conv4(hidden_channels=4)).double().eval()
    model.eval_protocol = "inductive"
    with pytest.raises(ValueError, match=r"protocol.evaluation='inductive'"):
        model(double_batch().slice(0, 1))


def test_the_default_is_transductive():
    assert MetaLearner.eval_protocol == MetaLearner.train_protocol == "transductive"
    assert EvaluationProtocol().evaluation == EvaluationProtocol().training == "transductive"


def fit(tmp_path: Path, *args: str):
    return run_cli(
        [
            "fit",
            "--config",
            str(REPO / "configs/sinusoid/maml.yaml"),
            "--data.tasks_per_batch=2",
            "--data.val_tasks=2",
            "--data.eval_tasks_per_batch=2",
            "--trainer.val_check_interval=1",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--test_after_fit=false",
            f"--trainer.default_root_dir={tmp_path}",
            *args,
        ]
    )


@pytest.mark.slow
def test_the_cli_option_reaches_the_model_the_logs_and_the_checkpoint(tmp_path):
    cli = fit(tmp_path, "--trainer.max_steps=1", "--protocol.evaluation=per_example")
    assert cli.model.eval_protocol == "per_example" and cli.model.train_protocol == "transductive"
    assert float(cli.trainer.callback_metrics["val/per_example"]) == 1.0
    last = next(tmp_path.rglob("last.ckpt"))
    recorded = torch.load(last, weights_only=True)["callbacks"]["EvaluationProtocol"]
    assert recorded == {"evaluation": "per_example", "training": "transductive"}
    # Resuming under another training protocol says so.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = fit(tmp_path, "--trainer.max_steps=2", "--protocol.training=per_example", f"--ckpt_path={last}")
    assert resumed.trainer.global_step == 2 and resumed.model.train_protocol == "per_example"
    assert any("trained with protocol.training='transductive'" in str(w.message) for w in caught)
    # Without the option: transductive, and the logs say so.
    default = fit(tmp_path / "default", "--trainer.max_steps=1")
    assert default.model.eval_protocol == "transductive"
    assert float(default.trainer.callback_metrics["val/per_example"]) == 0.0


# Meta-RL configs are left out: the protocols are about BatchNorm over support and query sets,
# which an agent rolling out trials does not have (MetaRLLearner ignores `protocol`).
RUN_CONFIGS = sorted(
    p
    for p in (REPO / "configs").rglob("*.yaml")
    if p.parent.name != "sweeps" and "lightning_meta.data.RLTaskDataModule" not in p.read_text()
)


@pytest.mark.parametrize("config", RUN_CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_config_states_its_evaluation_protocol_and_the_papers(config):
    stated = yaml.safe_load(config.read_text()).get("protocol", {}).get("evaluation")
    assert stated in PROTOCOLS, f"{config}: say `protocol: evaluation: ...` (README, Evaluation protocol)"
    line = next(line for line in config.read_text().splitlines() if line.strip().startswith("evaluation:"))
    assert "#" in line, f"{config}: say beside it which protocol the paper's number used"
