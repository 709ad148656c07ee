"""MAML++ (Antoniou, Edwards & Storkey, "How to train your MAML", ICLR 2019).

MAML with the fixes that make it train stably and better (paper §4, settings as in the authors'
code): learned per-layer per-step inner learning rates (LSLR); a multi-step loss (MSL) that
scores the query set after every inner step, with weights annealed over the first epochs from
uniform to the last step alone; first order for the first epochs, then second order
(derivative-order annealing, DA); per-step BatchNorm weights and biases (BNWB), which are
meta-learned but not adapted in the inner loop. Cosine annealing of the outer learning rate
(CA) is the config's `lr_scheduler`. The paper's per-step running statistics have no analogue
here: BatchNorm uses batch statistics (DESIGN.md).
"""

from __future__ import annotations

import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_meta.algorithms.base import MetaLearner, TaskOutput, check_inner_loop_args, supervised_loss
from lightning_meta.algorithms.metasgd import rate_key
from lightning_meta.inner_loop import adapt, forward, named_params
from lightning_meta.task import Params, Task


def multi_step_loss_weights(steps: int, epoch: int, anneal_epochs: int) -> Tensor:
    """The MSL weight of the query loss after each inner step 1..K at `epoch`; they sum to 1.

    Uniform (1/K) at epoch 0; every earlier step's weight falls by 1/(K · anneal_epochs) per
    epoch to a floor of 0.03/K and the last step's takes what they lose (the authors' code);
    from `anneal_epochs` on, the last step alone.
    """
    if epoch >= anneal_epochs or steps == 1:
        return torch.eye(steps, dtype=torch.float64)[-1]
    decay, floor = 1.0 / steps / anneal_epochs, 0.03 / steps
    earlier = max(1.0 / steps - epoch * decay, floor)
    last = min(1.0 / steps + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * floor)
    return torch.tensor([earlier] * (steps - 1) + [last], dtype=torch.float64)


class MAMLPlusPlus(MetaLearner):
    """MAML++: MAML with LSLR, MSL, DA and BNWB (see the module docstring).

    Args:
        backbone: the network being meta-learned; for classification its output size is the
            number of ways.
        inner_lr: initial value of every learned per-layer, per-step inner learning rate.
        inner_steps: inner steps K during meta-training (5 in the paper).
        eval_inner_steps: inner steps at validation and test (default: `inner_steps`); steps
            beyond K reuse step K's learned rates and BatchNorm weights.
        multi_step_loss_epochs: epochs over which the MSL weights anneal to the last step
            (10 in the authors' configs); 0 scores the last step only.
        first_order_epochs: epochs trained first order before switching to second order
            (50 in the paper); 0 is second order throughout.
        per_step_bn: one set of BatchNorm weights and biases per inner step (BNWB); the
            backbone must have BatchNorm layers (any layer whose class name has "BatchNorm").
        optimizer: the outer optimizer (default Adam, lr 1e-3).
        lr_scheduler: optional outer learning-rate schedule, stepped every meta-batch (the
            paper: cosine annealing).
    """

    uses_output_head = True
    supports_vmap = True

    def __init__(
        self,
        backbone: nn.Module,
        inner_lr: float = 0.1,
        inner_steps: int = 5,
        eval_inner_steps: int | None = None,
        multi_step_loss_epochs: int = 10,
        first_order_epochs: int = 50,
        per_step_bn: bool = True,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(backbone, optimizer, lr_scheduler)
        eval_inner_steps = check_inner_loop_args(inner_lr, inner_steps, eval_inner_steps)
        self.inner_steps, self.eval_inner_steps = inner_steps, eval_inner_steps
        self.multi_step_loss_epochs, self.first_order_epochs = multi_step_loss_epochs, first_order_epochs
        params = named_params(backbone)
        # BatchNorm by class name, so batch-statistics variants written in plain ops count too.
        self.bn_names = [
            f"{module_name}.{p}" if module_name else p
            for module_name, m in backbone.named_modules()
            if per_step_bn and "BatchNorm" in type(m).__name__
            for p, _ in m.named_parameters(recurse=False)
        ]
        if per_step_bn and not self.bn_names:
            raise ValueError(f"per_step_bn=True but {type(backbone).__name__} has no BatchNorm weights: set it false")
        # LSLR: one rate per adapted tensor and step. BNWB: step 0 uses the backbone's own
        # BatchNorm weights, steps 1..K-1 these copies.
        self.inner_lrs = nn.ParameterDict(
            {
                rate_key(n): nn.Parameter(torch.full((inner_steps,), inner_lr, dtype=p.dtype))
                for n, p in params.items()
                if n not in self.bn_names
            }
        )
        self.bn_per_step = nn.ParameterDict(
            {rate_key(n): nn.Parameter(params[n].detach().repeat(inner_steps - 1, 1)) for n in self.bn_names}
            if inner_steps > 1
            else {}
        )

    def first_order_now(self) -> bool:
        """Derivative-order annealing: first order before `first_order_epochs`, and whenever evaluating."""
        return not self.training or self.current_epoch < self.first_order_epochs

    def bn_params(self, step: int) -> Params:
        """The BatchNorm weights and biases of inner step `step` (0-based; later steps reuse the last)."""
        step = min(step, self.inner_steps - 1)
        if step == 0:
            return {n: p for n, p in named_params(self.backbone).items() if n in self.bn_names}
        return {n: self.bn_per_step[rate_key(n)][step - 1] for n in self.bn_names}

    def adapt(self, task: Task, steps: int) -> list[Params]:
        """θ0..θK as full parameter dicts; θk carries the BatchNorm weights of the step that made it.

        As in the authors' code, step k's support loss and the query loss after step k both use
        step k's BatchNorm weights.
        """
        trajectory = [{n: p for n, p in named_params(self.backbone).items() if n not in self.bn_names}]
        for step in range(steps):
            bn = self.bn_params(step)

            def support_loss(params: Params, bn: Params = bn) -> Tensor:
                return supervised_loss(forward(self.backbone, {**params, **bn}, task.support_x), task.support_y)

            rates = {n: self.inner_lrs[rate_key(n)][min(step, self.inner_steps - 1)] for n in trajectory[0]}
            trajectory.append(adapt(support_loss, trajectory[-1], 1, rates, self.first_order_now())[1])
        return [{**params, **self.bn_params(max(k - 1, 0))} for k, params in enumerate(trajectory)]

    def task_loss(self, task: Task) -> TaskOutput:
        steps = self.inner_steps if self.training else self.eval_inner_steps
        trajectory = self.adapt(task, steps)
        if not self.training:
            predictions = forward(self.backbone, trajectory[-1], task.query_x)
            with torch.no_grad():
                loss_before = supervised_loss(forward(self.backbone, trajectory[0], task.query_x), task.query_y)
            return TaskOutput(supervised_loss(predictions, task.query_y), predictions, loss_before)
        weights = multi_step_loss_weights(steps, self.current_epoch, self.multi_step_loss_epochs).tolist()
        loss = 0.0
        for k in range(1, steps + 1):
            # Under first order, step k-1's BatchNorm copy reaches the meta-loss only through the
            # query loss after step k: score it even at weight 0, so every parameter gets a
            # gradient (which DDP requires).
            if weights[k - 1] > 0 or (self.bn_names and self.first_order_now()):
                predictions = forward(self.backbone, trajectory[k], task.query_x)
                loss = loss + weights[k - 1] * supervised_loss(predictions, task.query_y)
        return TaskOutput(loss, predictions)
