"""Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017).

Learn an initialisation θ such that a few gradient steps on a task's support set give
parameters that do well on its query set; the meta-gradient differentiates through those
inner steps (second order), or treats their gradients as constants (`first_order`, FOMAML),
which costs about a third less and loses little on Omniglot (paper §5.2).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_meta.algorithms.base import MetaLearner, TaskOutput, check_inner_loop_args, supervised_loss
from lightning_meta.algorithms.predictor import Predictor, adapted_predictor, detached, support_task
from lightning_meta.inner_loop import UpdateRule, adapt, forward, named_params
from lightning_meta.losses.inner import InnerLoss
from lightning_meta.task import Params, Task
from lightning_meta.update_rules import SGD


class MAML(MetaLearner):
    """MAML and first-order MAML.

    Args:
        backbone: the network being meta-learned; for classification its output size is the
            number of ways.
        inner_lr: α, the inner-loop SGD step size on the mean loss over the support set (0.1
            for Omniglot 5- and 20-way here, 0.01 for sinusoid). The paper's Omniglot values (0.4
            at 5-way, 0.1 at 20-way) are for its code's loss, the per-example losses summed and
            divided by the shots (N times the mean at N-way); 0.4 here overshoots at 5-way
            (README, "MAML's inner learning rate at 5-way").
        inner_steps: inner steps during meta-training.
        eval_inner_steps: inner steps at validation and test (default: `inner_steps`; the
            paper evaluates with more steps than it trains with).
        first_order: drop the second-order terms (FOMAML).
        update_rule: the inner update (`lightning_meta.update_rules`; default: SGD at `inner_lr`,
            which is then unused). A rule with parameters of its own, e.g. a `LearnedOptimizer`,
            is meta-trained with θ.
        inner_loss: the support loss the inner loop descends (`lightning_meta.losses.inner`:
            `CandidateLoss`, `ML3Loss`, ...; default: the task's own loss). One with parameters is
            meta-trained with θ; the query loss is always the task's own.
        optimizer: the outer optimizer (default Adam, lr 1e-3).
        lr_scheduler: optional outer learning-rate schedule, stepped every meta-batch.
    """

    uses_output_head = True
    supports_vmap = True

    def __init__(
        self,
        backbone: nn.Module,
        inner_lr: float = 0.1,
        inner_steps: int = 1,
        eval_inner_steps: int | None = None,
        first_order: bool = False,
        update_rule: UpdateRule | None = None,
        inner_loss: InnerLoss | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(backbone, optimizer, lr_scheduler)
        eval_inner_steps = check_inner_loop_args(inner_lr, inner_steps, eval_inner_steps)
        self.inner_lr, self.inner_steps, self.eval_inner_steps = inner_lr, inner_steps, eval_inner_steps
        self.first_order = first_order
        self.update_rule = SGD(inner_lr) if update_rule is None else update_rule
        self.update_rule.bind(named_params(backbone))
        self.inner_loss = inner_loss

    @property
    def compile_by_default(self) -> bool:
        """First order only: measured faster compiled (0.82-0.90× the eager step time on CPU, README
        "Compiling the backbone"), with float64 parity (`tests/test_compile.py`). Second order runs
        its support forwards eagerly even when compiled, and that was not measured. Measured and
        proven with the SGD update only: with another rule (a learned optimizer's LSTM dominates the
        step) "auto" stays eager."""
        return self.first_order and type(self.update_rule) is SGD

    def adapt(self, task: Task, steps: int) -> list[Params]:
        """The inner-loop trajectory θ0..θK on `task`'s support set."""

        support_loss = self.support_loss_fn(task, lambda params, x: forward(self.backbone, params, x))
        # Without an outer backward (evaluation) the second-order graph is dead weight.
        first_order = self.first_order or not self.training
        return adapt(support_loss, named_params(self.backbone), steps, self.update_rule, first_order)

    def task_loss(self, task: Task) -> TaskOutput:
        steps = self.inner_steps if self.training else self.eval_inner_steps
        trajectory = self.adapt(task, steps)
        predictions = forward(self.backbone, trajectory[-1], task.query_x)
        loss_before = None
        if not self.training:
            with torch.no_grad():
                loss_before = supervised_loss(forward(self.backbone, trajectory[0], task.query_x), task.query_y)
        return TaskOutput(supervised_loss(predictions, task.query_y), predictions, loss_before)

    def adapt_to(self, support_x: Tensor, support_y: Tensor) -> Predictor:
        """`eval_inner_steps` inner steps on the support set; the predictor runs θK (`MetaLearner.adapt_to`)."""

        def adapt() -> Callable[[Tensor], Tensor]:
            adapted = detached(self.adapt(support_task(support_x, support_y), self.eval_inner_steps)[-1])
            return lambda query_x: forward(self.backbone, adapted, query_x)

        return adapted_predictor(self, support_x, support_y, adapt)
