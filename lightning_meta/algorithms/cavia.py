"""CAVIA, fast context adaptation via meta-learning (Zintgraf, Shiarlis, Kurin, Hofmann &
Whiteson, ICML 2019).

MAML adapts every weight of the network per task; CAVIA adapts only a few context parameters
φ fed to the network (`lightning_meta.models.ContextConditioned`), reset to zero for every
task, while the network's weights θ are meta-learned by the outer loop alone. The inner loop is
then small (5 numbers for sinusoid, 100 for miniImageNet, against MAML's thousands of weights),
less prone to overfitting the support set, and the meta-gradient still flows to θ through φ's
inner gradients (second order) or through the adapted forward (first order).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_meta.algorithms.base import MetaLearner, TaskOutput, check_inner_loop_args, supervised_loss
from lightning_meta.algorithms.predictor import Predictor, adapted_predictor, detached, support_task
from lightning_meta.inner_loop import adapt, forward, named_params
from lightning_meta.losses.inner import InnerLoss
from lightning_meta.models.context import ContextConditioned
from lightning_meta.task import Params, Task


class CAVIA(MetaLearner):
    """CAVIA: context parameters adapted per task, the network meta-learned.

    Args:
        backbone: the network; wrapped in `ContextConditioned` with the arguments below (an
            already wrapped backbone is taken as it is). For classification its output size is
            the number of ways; with `condition="input"` its input takes the data's features
            plus `context_size`.
        context_size: the number of context parameters φ (CAVIA: 5 for sinusoid, 100 for
            miniImageNet).
        condition: "input" (φ concatenated to the input: MLPs) or "film" (FiLM of one layer:
            convolutional networks).
        film_at: with "film", the backbone's submodule whose output is modulated (default: the
            third block's norm of `Conv4`, CAVIA's choice).
        inner_lr: the inner SGD step size on φ (CAVIA's code: 1.0, sinusoid and miniImageNet).
        inner_steps: inner steps during meta-training (CAVIA: 1 for sinusoid, 2 for miniImageNet).
        eval_inner_steps: inner steps at validation and test (default: `inner_steps`).
        first_order: treat φ's inner gradients as constants.
        inner_loss: the support loss the inner loop descends (`lightning_meta.losses.inner`:
            `CandidateLoss`, `ML3Loss`, ...; default: the task's own loss). One with parameters is
            meta-trained with θ (φ alone is adapted on it); the query loss is always the task's own.
        optimizer: the outer optimizer (default Adam, lr 1e-3), over θ and the FiLM layer.
        lr_scheduler: optional outer learning-rate schedule, stepped every meta-batch.
    """

    uses_output_head = True
    supports_vmap = True

    def __init__(
        self,
        backbone: nn.Module,
        context_size: int = 5,
        condition: str = "input",
        film_at: str | None = None,
        inner_lr: float = 1.0,
        inner_steps: int = 1,
        eval_inner_steps: int | None = None,
        first_order: bool = False,
        inner_loss: InnerLoss | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        if not isinstance(backbone, ContextConditioned):
            backbone = ContextConditioned(backbone, context_size, condition, film_at)
        super().__init__(backbone, optimizer, lr_scheduler)
        eval_inner_steps = check_inner_loop_args(inner_lr, inner_steps, eval_inner_steps)
        self.inner_lr, self.inner_steps, self.eval_inner_steps = inner_lr, inner_steps, eval_inner_steps
        self.first_order = first_order
        self.inner_loss = inner_loss

    def adapted_parameters(self) -> int:
        """How many numbers the inner loop adapts per task (φ's size)."""
        return self.backbone.context.numel()

    def adapt(self, task: Task, steps: int) -> list[Params]:
        """φ0..φK on `task`'s support set (each a `{"context": φ}` dict), θ fixed."""
        theta = named_params(self.backbone)

        support_loss = self.support_loss_fn(task, lambda context, x: forward(self.backbone, {**theta, **context}, x))
        # A fresh φ = 0 per task, in θ's dtype and device (a buffer follows the module's).
        phi0 = {"context": torch.zeros_like(self.backbone.context)}
        first_order = self.first_order or not self.training
        return adapt(support_loss, phi0, steps, self.inner_lr, first_order)

    def task_loss(self, task: Task) -> TaskOutput:
        steps = self.inner_steps if self.training else self.eval_inner_steps
        trajectory = self.adapt(task, steps)
        theta = named_params(self.backbone)
        predictions = forward(self.backbone, {**theta, **trajectory[-1]}, task.query_x)
        loss_before = None
        if not self.training:
            with torch.no_grad():
                loss_before = supervised_loss(
                    forward(self.backbone, {**theta, **trajectory[0]}, task.query_x), task.query_y
                )
        return TaskOutput(supervised_loss(predictions, task.query_y), predictions, loss_before)

    def adapt_to(self, support_x: Tensor, support_y: Tensor) -> Predictor:
        """`eval_inner_steps` inner steps on the context φ alone (θ fixed); the predictor runs the
        network with φK (`MetaLearner.adapt_to`)."""

        def adapt() -> Callable[[Tensor], Tensor]:
            adapted = detached(self.adapt(support_task(support_x, support_y), self.eval_inner_steps)[-1])
            return lambda query_x: forward(self.backbone, {**named_params(self.backbone), **adapted}, query_x)

        return adapted_predictor(self, support_x, support_y, adapt)
