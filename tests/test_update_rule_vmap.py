"""The learned update rules (`LearnedOptimizer`, `MetaLSTM`) under `torch.func.vmap`: the tasks of
a meta-batch run vmapped give the loop's per-task losses and meta-gradients in float64, first and
second order, over several inner steps (so the rules' LSTM hidden and cell states and MetaLSTM's
previous gates are carried per task), which is what lets `task_batching: auto` choose vmap for
them (issue 14). Their LSTM cell is written out in tensor ops (`lstm_cell`: vmap has no batching
rule for `aten::lstm_cell`), bitwise equal to `nn.LSTMCell` on a CPU, so the loop's numbers are
the ones `nn.LSTMCell` gave."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_meta.algorithms import MAML
from lightning_meta.algorithms.task_parallel import vmap_blocker
from lightning_meta.models import MLP
from lightning_meta.task import TaskBatch
from lightning_meta.update_rules import LearnedOptimizer, MetaLSTM
from lightning_meta.update_rules.learned_optimizer import lstm_cell
from tests.test_update_rule_parity import TOL, sine_batch

RULES = {"LearnedOptimizer": LearnedOptimizer, "MetaLSTM": MetaLSTM}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_the_written_out_lstm_cell_is_nn_lstm_cell_bitwise_with_its_derivatives(dtype):
    torch.manual_seed(0)
    cell = nn.LSTMCell(4, 6).to(dtype)
    x, h, c = (torch.randn(7, n, dtype=dtype, requires_grad=True) for n in (4, 6, 6))
    inputs = [x, h, c, *cell.parameters()]
    weight = torch.randn(7, 6, dtype=dtype)
    results = []
    for step in (cell, lambda x, hc: lstm_cell(x, hc, cell)):
        h_next, c_next = step(x, (h, c))
        grads = torch.autograd.grad((weight * h_next).sum() + (c_next**2).sum(), inputs, create_graph=True)
        second = torch.autograd.grad(sum((g**2).sum() for g in grads), inputs)
        results.append([h_next, c_next, *grads, *second])
    for reference, written_out in zip(*results, strict=True):
        assert torch.equal(written_out, reference)


def meta_loss_and_grads(model: MAML, batch: TaskBatch, path: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-task query losses and the meta-gradient of their mean on `path` ("loop" or "vmap")."""
    loss, stats = model.meta_loss(batch, path)
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True, materialize_grads=True)
    return stats["loss"], dict(zip(params, grads, strict=True))


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("rule", RULES)
def test_vmapped_tasks_give_the_loops_losses_and_meta_gradients(float64, rule, first_order):
    torch.manual_seed(0)
    model = MAML(
        MLP(hidden_sizes=[8, 8]), inner_steps=3, first_order=first_order, update_rule=RULES[rule](hidden_size=6)
    )
    model.train()
    assert vmap_blocker(model) is None
    batch = sine_batch(tasks=4)
    loop_losses, loop_grads = meta_loss_and_grads(model, batch, "loop")
    vmap_losses, vmap_grads = meta_loss_and_grads(model, batch, "vmap")
    assert loop_losses.shape == (4,) and len(set(loop_losses.tolist())) == 4  # four distinct tasks
    torch.testing.assert_close(vmap_losses, loop_losses, **TOL)
    for name, expected in loop_grads.items():
        torch.testing.assert_close(vmap_grads[name], expected, **TOL, msg=name)
    # The rule's own weights get a meta-gradient (so a wrong per-task LSTM state would show), as do θ0's.
    for prefix in ("update_rule.", "backbone."):
        assert all(g.abs().max() > 0 for n, g in loop_grads.items() if n.startswith(prefix)), prefix


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
@pytest.mark.parametrize("rule", RULES)
def test_task_batching_vmap_trains_with_the_rule_as_the_loop_does(float64, rule):
    """The learner's own training step, `task_batching="vmap"` (no longer refused) against "loop"."""
    torch.manual_seed(0)
    model = MAML(MLP(hidden_sizes=[8]), inner_steps=2, first_order=True, update_rule=RULES[rule](hidden_size=4))
    model.train()
    batch, results = sine_batch(), {}
    for batching in ("loop", "vmap"):
        model.zero_grad()
        model.task_batching, model.task_chunk_size = batching, None
        model.training_step(batch, 0).backward()
        results[batching] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert set(results["vmap"]) == set(results["loop"]) and any(n.startswith("update_rule.") for n in results["loop"])
    for name, expected in results["loop"].items():
        torch.testing.assert_close(results["vmap"][name], expected, **TOL, msg=name)
