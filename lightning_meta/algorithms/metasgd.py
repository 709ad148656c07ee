"""Meta-SGD (Li, Zhou, Chen & Li 2017, arXiv:1707.09835).

MAML with a learned inner learning rate for every entry of every parameter: α has the shapes of
θ and is meta-learned with it by the outer optimizer, so the outer loop learns the direction and
size of the inner update as well as the initialisation, θ' = θ − α ⊙ ∇L_support(θ). With one
inner step (the paper's setting) this beat MAML on sinusoid regression and Omniglot (Tables 1-2).
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
from lightning_meta.update_rules.rates import LearnedRates, rate_key, rename_legacy_rates

__all__ = ["MetaSGD", "rate_key"]


class MetaSGD(MetaLearner):
    """Meta-SGD: MAML with meta-learned per-parameter inner learning rates (`inner_lrs`, held by
    its update rule, `update_rules.LearnedRates`).

    Args:
        backbone: the network being meta-learned; for classification its output size is the
            number of ways.
        inner_lr_init: each rate in α starts uniform in [low, high] (the paper: [0.005, 0.1]);
            low = high starts every rate at that constant.
        inner_steps: inner steps during meta-training (1 in the paper).
        eval_inner_steps: inner steps at validation and test (default: `inner_steps`); every
            step uses the same learned α.
        first_order: treat the inner gradients as constants (α still gets its gradient).
        update_rule: the inner update (default: `LearnedRates(inner_lr_init)`, Meta-SGD's own;
            another rule makes this MAML with that rule).
        inner_loss: the support loss the inner loop descends (`lightning_meta.losses.inner`:
            `CandidateLoss`, `ML3Loss`, ...; default: the task's own loss). One with parameters is
            meta-trained with θ; the query loss is always the task's own.
        optimizer: the outer optimizer, over θ and α together (default Adam, lr 1e-3).
        lr_scheduler: optional outer learning-rate schedule, stepped every meta-batch.
    """

    uses_output_head = True
    supports_vmap = True

    def __init__(
        self,
        backbone: nn.Module,
        inner_lr_init: tuple[float, float] = (0.005, 0.1),
        inner_steps: int = 1,
        eval_inner_steps: int | None = None,
        first_order: bool = False,
        update_rule: UpdateRule | None = None,
        inner_loss: InnerLoss | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(backbone, optimizer, lr_scheduler)
        eval_inner_steps = check_inner_loop_args(None, inner_steps, eval_inner_steps)
        low, high = inner_lr_init
        if not 0 < low <= high:
            raise ValueError(f"model.init_args.inner_lr_init={[low, high]} must be [low, high] with 0 < low <= high")
        self.inner_steps, self.eval_inner_steps, self.first_order = inner_steps, eval_inner_steps, first_order
        self.update_rule = LearnedRates((low, high)) if update_rule is None else update_rule
        self.inner_loss = inner_loss
        self.update_rule.bind(named_params(backbone))
        self._register_load_state_dict_pre_hook(rename_legacy_rates, with_module=True)

    @property
    def inner_lrs(self) -> nn.ParameterDict:
        """The learned rates α, one tensor per parameter of the backbone, keyed by `rate_key`."""
        return self.update_rule.rates

    def adapt(self, task: Task, steps: int) -> list[Params]:
        """The inner-loop trajectory θ0..θK on `task`'s support set."""

        support_loss = self.support_loss_fn(task, lambda params, x: forward(self.backbone, params, x))
        # Without an outer backward (evaluation) the second-order graph is dead weight.
        first_order = self.first_order or not self.training
        return adapt(support_loss, named_params(self.backbone), steps, self.update_rule, first_order)

    def task_loss(self, task: Task) -> TaskOutput:
        trajectory = self.adapt(task, self.inner_steps if self.training else self.eval_inner_steps)
        predictions = forward(self.backbone, trajectory[-1], task.query_x)
        loss_before = None
        if not self.training:
            with torch.no_grad():
                loss_before = supervised_loss(forward(self.backbone, trajectory[0], task.query_x), task.query_y)
        return TaskOutput(supervised_loss(predictions, task.query_y), predictions, loss_before)

    def adapt_to(self, support_x: Tensor, support_y: Tensor) -> Predictor:
        """`eval_inner_steps` inner steps with the learned rates; the predictor runs θK (`MetaLearner.adapt_to`)."""

        def adapt() -> Callable[[Tensor], Tensor]:
            adapted = detached(self.adapt(support_task(support_x, support_y), self.eval_inner_steps)[-1])
            return lambda query_x: forward(self.backbone, adapted, query_x)

        return adapted_predictor(self, support_x, support_y, adapt)
