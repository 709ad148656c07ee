"""Reptile (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms").

Train a copy of θ on each task for k steps of SGD or Adam (β1 = 0), giving θ̃, then move θ
toward the tasks' solutions: θ ← θ + ε · mean(θ̃ − θ). No second derivatives and no
support/query split in training: the inner loop trains on all of a task's data. Evaluation
adapts on the support set alone, with the same inner optimizer, and scores the query set.

Written as gradient descent so that Lightning's optimizer, scheduler, checkpointing and DDP
apply unchanged: the meta-loss's gradient with respect to θ is θ − mean θ̃ (that of the
surrogate ½‖θ − θ̃‖², θ̃ held constant), so an outer SGD(lr=ε) step is Reptile's update exactly,
DDP's gradient average is the mean over every rank's tasks, and a LinearLR schedule anneals ε
as in the paper. The loss's value is the query loss after adaptation (what the base class
logs); only its gradient is the surrogate's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_meta.algorithms.base import MetaLearner, TaskOutput, check_inner_loop_args, supervised_loss
from lightning_meta.algorithms.predictor import Predictor, adapted_predictor, detached, support_task
from lightning_meta.inner_loop import forward, named_params
from lightning_meta.models.norm import own_statistics
from lightning_meta.task import Params, Task


def outer_sgd(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD with lr = ε = 1, the paper's outer step size on Omniglot (anneal it with LinearLR)."""
    return torch.optim.SGD(params, lr=1.0)


class Reptile(MetaLearner):
    """Reptile, with the outer update carried by the optimizer (see the module docstring).

    Args:
        backbone: the network being meta-learned; for classification its output size is the
            number of ways.
        inner_lr: the inner optimizer's learning rate (the paper: Adam 1e-3 on Omniglot).
        inner_steps: k, inner steps per task during meta-training (full batches of all the
            task's data).
        eval_inner_steps: inner steps on the support set at validation and test (default:
            `inner_steps`; the paper uses 50).
        inner_optimizer: "sgd", or "adam" with β1 = 0 as in the paper; its state starts
            fresh for every task.
        optimizer: the outer optimizer; SGD with lr = ε gives Reptile's update (default
            SGD, lr 1). Others (e.g. Adam) take θ − mean θ̃ as their gradient.
        lr_scheduler: schedule of ε, stepped every meta-batch (the paper: linear to 0).
    """

    uses_output_head = True

    def __init__(
        self,
        backbone: nn.Module,
        inner_lr: float = 0.001,
        inner_steps: int = 5,
        eval_inner_steps: int | None = None,
        inner_optimizer: Literal["sgd", "adam"] = "adam",
        optimizer: OptimizerCallable = outer_sgd,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(backbone, optimizer, lr_scheduler)
        eval_inner_steps = check_inner_loop_args(inner_lr, inner_steps, eval_inner_steps)
        if inner_optimizer not in ("sgd", "adam"):
            raise ValueError(f"model.init_args.inner_optimizer={inner_optimizer!r} is not 'sgd' or 'adam'")
        self.inner_lr, self.inner_steps, self.eval_inner_steps = inner_lr, inner_steps, eval_inner_steps
        self.inner_optimizer = inner_optimizer

    def adapt(self, task: Task, steps: int) -> list[Params]:
        """θ0..θk (detached) of the inner optimizer on the task: support and query in training,
        support alone in evaluation."""
        x, y = task.support_x, task.support_y
        if self.training:
            x, y = torch.cat([x, task.query_x]), torch.cat([y, task.query_y])
        params = {n: p.detach().clone().requires_grad_() for n, p in named_params(self.backbone).items()}
        if self.inner_optimizer == "sgd":
            optimizer = torch.optim.SGD(params.values(), lr=self.inner_lr)
        else:
            optimizer = torch.optim.Adam(params.values(), lr=self.inner_lr, betas=(0.0, 0.999))
        trajectory = [{n: p.detach().clone() for n, p in params.items()}]
        # Training adapts on support and query together: on their own statistics under either protocol.
        with torch.enable_grad(), own_statistics():
            for _ in range(steps):
                loss = supervised_loss(forward(self.backbone, params, x), y)
                grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True, materialize_grads=True)
                for param, grad in zip(params.values(), grads, strict=True):
                    param.grad = grad
                optimizer.step()
                trajectory.append({n: p.detach().clone() for n, p in params.items()})
        return trajectory

    def task_loss(self, task: Task) -> TaskOutput:
        trajectory = self.adapt(task, self.inner_steps if self.training else self.eval_inner_steps)
        with torch.no_grad():
            predictions = forward(self.backbone, trajectory[-1], task.query_x)
            loss = supervised_loss(predictions, task.query_y)
        if not self.training:
            with torch.no_grad():
                loss_before = supervised_loss(forward(self.backbone, trajectory[0], task.query_x), task.query_y)
            return TaskOutput(loss, predictions, loss_before)
        theta = named_params(self.backbone)
        surrogate = 0.5 * sum(((p - trajectory[-1][n]) ** 2).sum() for n, p in theta.items())
        # Value: the query loss after adaptation. Gradient: θ − θ̃, the Reptile direction.
        return TaskOutput(loss + surrogate - surrogate.detach(), predictions)

    def adapt_to(self, support_x: Tensor, support_y: Tensor) -> Predictor:
        """`eval_inner_steps` steps of the inner optimizer on the support set alone; the predictor
        runs θk (`MetaLearner.adapt_to`)."""

        def adapt() -> Callable[[Tensor], Tensor]:
            adapted = detached(self.adapt(support_task(support_x, support_y), self.eval_inner_steps)[-1])
            return lambda query_x: forward(self.backbone, adapted, query_x)

        return adapted_predictor(self, support_x, support_y, adapt)
