"""Update rules as components: chosen per learner, their parameters in the learner's state_dict
and outer optimizer, old checkpoints' rate keys still load, vmap refused where not proven."""

from __future__ import annotations

import pytest
import torch

from lightning_meta.algorithms import ANIL, MAML, MAMLPlusPlus, MetaSGD
from lightning_meta.algorithms.task_parallel import vmap_blocker
from lightning_meta.inner_loop import adapt, named_params
from lightning_meta.models import MLP, Conv4
from lightning_meta.update_rules import SGD, LearnedOptimizer, LearnedRates, MetaLSTM, PerStepRates
from tests.test_update_rule_parity import TOL, conv_batch, sine_batch


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def test_an_explicit_sgd_rule_is_the_default_float_step():
    torch.manual_seed(0)
    default = MAML(MLP(hidden_sizes=[8]), inner_lr=0.07, inner_steps=2)
    explicit = MAML(MLP(hidden_sizes=[8]), inner_steps=2, update_rule=SGD(0.07))
    explicit.load_state_dict(default.state_dict())
    task = sine_batch()[0]
    for a, b in zip(default.adapt(task, 2), explicit.adapt(task, 2), strict=True):
        for n in a:
            torch.testing.assert_close(a[n], b[n], **TOL)


def test_sgd_takes_one_rate_per_step_and_checks_the_count():
    module = MLP(hidden_sizes=[4])
    params = named_params(module)
    x, y = torch.randn(5, 1), torch.randn(5, 1)

    def loss(p):
        return ((torch.func.functional_call(module, p, (x,)) - y) ** 2).mean()

    per_step = adapt(loss, params, 2, SGD([0.1, 0.0]))
    torch.testing.assert_close(per_step[2]["net.0.weight"], per_step[1]["net.0.weight"], **TOL)
    with pytest.raises(ValueError, match="per-step step sizes for 3 inner steps"):
        adapt(loss, params, 3, [0.1, 0.2])


@pytest.mark.parametrize(
    "build",
    [
        lambda: MAML(MLP(hidden_sizes=[8]), update_rule=LearnedRates((0.01, 0.02))),
        lambda: ANIL(MLP(hidden_sizes=[8]), update_rule=PerStepRates(0.05, steps=2)),
        lambda: MetaSGD(MLP(hidden_sizes=[8]), update_rule=LearnedOptimizer(hidden_size=4)),
        lambda: MAMLPlusPlus(MLP(hidden_sizes=[8]), per_step_bn=False, update_rule=LearnedOptimizer(hidden_size=4)),
    ],
    ids=["MAML+LearnedRates", "ANIL+PerStepRates", "MetaSGD+LearnedOptimizer", "MAMLPlusPlus+LearnedOptimizer"],
)
def test_a_rule_with_parameters_is_meta_trained_with_the_learner(build):
    torch.manual_seed(0)
    model = build()
    rule_params = {f"update_rule.{n}": p for n, p in model.update_rule.named_parameters()}
    assert rule_params and set(rule_params) <= set(model.state_dict())
    optimizer = model.configure_optimizers()
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all(id(p) in in_optimizer for p in rule_params.values())
    before = {n: p.detach().clone() for n, p in rule_params.items()}
    model.train()
    loss, _ = model.meta_loss(sine_batch())
    loss.backward()
    assert all(p.grad is not None for p in rule_params.values())
    assert sum(float(p.grad.abs().sum()) for p in rule_params.values()) > 0
    optimizer.step()
    assert any(not torch.equal(p.detach(), before[n]) for n, p in rule_params.items())
    assert "update_rule" not in model.hparams  # a module: its weights are in the state_dict


@pytest.mark.parametrize("cls", [MetaSGD, MAMLPlusPlus])
def test_checkpoints_from_before_update_rules_still_load(cls):
    torch.manual_seed(0)
    kwargs = {"per_step_bn": False} if cls is MAMLPlusPlus else {}
    model = cls(MLP(hidden_sizes=[8]), **kwargs)
    with torch.no_grad():
        for rates in model.inner_lrs.values():
            rates.mul_(3.0)
    old = {k.replace("update_rule.rates.", "inner_lrs."): v for k, v in model.state_dict().items()}
    assert any(k.startswith("inner_lrs.") for k in old)
    fresh = cls(MLP(hidden_sizes=[8]), **kwargs)
    fresh.load_state_dict(old)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_a_rule_not_proven_under_vmap_is_never_vmapped_and_says_why():
    class Unproven(SGD):
        vmap_blocker = "its update is not covered by a float64 loop/vmap parity test"

    model = MAML(Conv4(hidden_channels=4, out_features=3, norm="plain_batch"), update_rule=Unproven(0.1))
    assert "not covered" in vmap_blocker(model)
    model.task_batching = "vmap"
    with pytest.raises(ValueError, match=r"task_batching='vmap' cannot be used: update_rule: .*not covered"):
        model.training_step(conv_batch(), 0)
    # The rules whose loop/vmap parity is tested (tests/test_update_rule_parity.py,
    # tests/test_update_rule_vmap.py) are not refused.
    for rule in (SGD(0.1), LearnedRates(), PerStepRates(), LearnedOptimizer(), MetaLSTM()):
        backbone = Conv4(hidden_channels=4, out_features=3, norm="plain_batch")
        assert vmap_blocker(MAML(backbone, update_rule=rule)) is None


def test_auto_compilation_stays_with_the_measured_sgd_update():
    backbone = MLP(hidden_sizes=[8])
    assert MAML(backbone, first_order=True).compile_by_default
    assert not MAML(backbone, first_order=True, update_rule=LearnedOptimizer(hidden_size=4)).compile_by_default
