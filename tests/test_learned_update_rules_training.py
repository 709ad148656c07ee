"""The learned update rules (`LearnedOptimizer`, `MetaLSTM`) inside MAML as a user trains them:
a checkpoint restores the rule's weights, the real CLI trains with each one's config, and a run
killed mid-way resumes to the same weights. One parametrised body for both rules."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lightning_meta.algorithms import MAML
from lightning_meta.cli import run_cli
from lightning_meta.data import SinusoidDataModule
from lightning_meta.models import MLP
from lightning_meta.update_rules import LearnedOptimizer, MetaLSTM
from tests.helpers import quiet_trainer
from tests.test_resume import SINUSOID_MAML, check_resume

REPO = Path(__file__).resolve().parents[1]
RULES = {"learned_optimizer": LearnedOptimizer, "metalstm": MetaLSTM}
CONFIGS = {
    "learned_optimizer": "configs/sinusoid/maml_learned_opt.yaml",
    "metalstm": "configs/sinusoid/maml_metalstm.yaml",
}


@pytest.mark.parametrize("rule", RULES)
def test_a_checkpoint_restores_the_rules_weights(tmp_path, rule):
    torch.manual_seed(0)
    model = MAML(MLP(hidden_sizes=[8]), inner_steps=3, update_rule=RULES[rule](hidden_size=4))
    initial = {k: v.clone() for k, v in model.update_rule.state_dict().items()}
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, inference_mode=False, default_root_dir=tmp_path)
    data = SinusoidDataModule(tasks_per_batch=2)
    trainer.fit(model, datamodule=data)
    # The outer optimizer trains the rule's own weights.
    assert any(not torch.equal(v, initial[k]) for k, v in model.update_rule.state_dict().items())
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    # Like the backbone, the rule is built by the caller (the CLI: from the config), with fresh,
    # differently drawn weights, and its trained weights come from the checkpoint.
    torch.manual_seed(1)
    restored = MAML.load_from_checkpoint(
        tmp_path / "model.ckpt", backbone=MLP(hidden_sizes=[8]), update_rule=RULES[rule](hidden_size=4)
    )
    for name, value in model.update_rule.state_dict().items():
        assert torch.equal(restored.update_rule.state_dict()[name], value), name
    batch = next(iter(data.val_dataloader()))
    model.eval(), restored.eval()
    torch.testing.assert_close(restored(batch).predictions, model(batch).predictions, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("rule", RULES)
def test_maml_with_the_rule_trains_through_the_real_cli(tmp_path, monkeypatch, rule):
    monkeypatch.chdir(REPO)
    cli = run_cli(
        [
            "fit",
            f"--config={CONFIGS[rule]}",
            "--data.tasks_per_batch=4",
            "--trainer.max_steps=3",
            "--trainer.val_check_interval=3",
            "--data.val_tasks=4",
            "--data.test_tasks=4",
            "--data.eval_tasks_per_batch=2",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    model = cli.model
    assert isinstance(model.update_rule, RULES[rule]) and cli.trainer.global_step == 3
    # Auto batching times the loop and vmap with it (tests/test_update_rule_vmap.py: equal results).
    assert [path for path, _ in model.task_batcher.times] == ["loop", "vmap", "loop"]
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert math.isfinite(metrics["test/loss"]) and metrics["test/tasks"] == 4
    checkpoint = torch.load(next(Path(tmp_path).rglob("*.ckpt")), weights_only=False)
    saved = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("update_rule.")}
    assert len(saved) == len(model.update_rule.state_dict())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in saved.items())
    print(json.dumps(metrics))


# One rule only: resuming restores the rule as any submodule (its weights are parameters of the
# LightningModule, their Adam state the optimizer's), so a second rule tests nothing new at ~30-50 s
# of two subprocess fits.
@pytest.mark.slow
@pytest.mark.parametrize("rule", ["learned_optimizer"])
def test_maml_with_the_rule_resumes_exactly(tmp_path, rule):
    setup = [
        *SINUSOID_MAML,
        f"--model.init_args.update_rule=lightning_meta.update_rules.{RULES[rule].__name__}",
        "--model.init_args.update_rule.init_args.hidden_size=4",
    ]
    check_resume(tmp_path, setup)
