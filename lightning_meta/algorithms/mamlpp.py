"""MAML++ (Antoniou, Edwards & Storkey, "How to train your MAML", ICLR 2019).

MAML with the fixes that make it train stably and better (paper §4, settings as in the authors'
code): learned per-layer per-step inner learning rates (LSLR); a multi-step loss (MSL) that
scores the query set after every inner step, with weights annealed over the first epochs from
uniform to the last step alone; optionally first order for the first epochs, then second order
(derivative-order annealing, DA: the paper's text; its released configs run second order
throughout, the default here); per-step BatchNorm weights and biases (BNWB), which are
meta-learned but not adapted in the inner loop. Cosine annealing of the outer learning rate
(CA) is the config's `lr_scheduler`. The paper's per-step running statistics have no analogue
here: BatchNorm uses batch statistics (DESIGN.md).

Under first order, the BatchNorm weights of step k reach the meta-loss only through the query
loss after step k + 1 (the support gradient that carries them into later steps is detached). So
first order with per-step BatchNorm is refused beyond the multi-step-loss phase: once the loss
scores the last step alone, the weights of every earlier step would get exactly zero gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_meta.algorithms.base import MetaLearner, TaskOutput, check_inner_loop_args, supervised_loss
from lightning_meta.algorithms.predictor import Predictor, adapted_predictor, detached, support_task
from lightning_meta.inner_loop import UpdateRule, forward, named_params, update_step
from lightning_meta.losses.inner import InnerLoss
from lightning_meta.task import Params, Task
from lightning_meta.update_rules.rates import PerStepRates, rate_key, rename_legacy_rates


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
            (0, second order throughout, as in the authors' released configs; the paper's text
            says 50). With `per_step_bn` and more than one inner step it may not exceed
            `multi_step_loss_epochs` (see the module docstring).
        per_step_bn: one set of BatchNorm weights and biases per inner step (BNWB); the
            backbone must have BatchNorm layers (any layer whose class name has "BatchNorm").
        update_rule: the inner update of the adapted (non-BatchNorm) parameters (default:
            `PerStepRates(inner_lr, inner_steps)`, LSLR; another rule replaces LSLR and keeps MSL,
            DA and BNWB).
        inner_loss: the support loss the inner loop descends (`lightning_meta.losses.inner`:
            `CandidateLoss`, `ML3Loss`, ...; default: the task's own loss). One with parameters is
            meta-trained with θ; the query loss is always the task's own.
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
        first_order_epochs: int = 0,
        per_step_bn: bool = True,
        update_rule: UpdateRule | None = None,
        inner_loss: InnerLoss | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(backbone, optimizer, lr_scheduler)
        eval_inner_steps = check_inner_loop_args(inner_lr, inner_steps, eval_inner_steps)
        self.inner_steps, self.eval_inner_steps = inner_steps, eval_inner_steps
        for key, value in (
            ("multi_step_loss_epochs", multi_step_loss_epochs),
            ("first_order_epochs", first_order_epochs),
        ):
            if value < 0:
                raise ValueError(f"model.init_args.{key}={value} must be >= 0")
        if per_step_bn and inner_steps > 1 and first_order_epochs > multi_step_loss_epochs:
            raise ValueError(
                f"model.init_args.first_order_epochs={first_order_epochs} > model.init_args.multi_step_loss_epochs="
                f"{multi_step_loss_epochs} with model.init_args.per_step_bn=true: from epoch {multi_step_loss_epochs} "
                f"to {first_order_epochs - 1} the loss scores the last inner step alone and, first order, the "
                f"BatchNorm weights of steps 0..{inner_steps - 2} would get exactly zero gradient. Set "
                f"first_order_epochs to at most {multi_step_loss_epochs} (0, second order throughout, as in the "
                "authors' released configs), or per_step_bn=false"
            )
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
        self.update_rule = PerStepRates(inner_lr, inner_steps) if update_rule is None else update_rule
        self.update_rule.bind({n: p for n, p in params.items() if n not in self.bn_names})
        self._register_load_state_dict_pre_hook(rename_legacy_rates, with_module=True)
        self.inner_loss = inner_loss
        self.bn_per_step = nn.ParameterDict(
            {rate_key(n): nn.Parameter(params[n].detach().repeat(inner_steps - 1, 1)) for n in self.bn_names}
            if inner_steps > 1
            else {}
        )

    @property
    def inner_lrs(self) -> nn.ParameterDict:
        """LSLR's learned rates, `[inner_steps]` per adapted tensor, keyed by `rate_key`."""
        return self.update_rule.rates

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
        state = self.update_rule.init_state(trajectory[0])
        for step in range(steps):
            bn = self.bn_params(step)

            support_loss = self.support_loss_fn(
                task, lambda params, x, bn=bn: forward(self.backbone, {**params, **bn}, x), step=step
            )
            params, state = update_step(
                support_loss, trajectory[-1], self.update_rule, state, step, self.first_order_now()
            )
            trajectory.append(params)
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
            # A query loss of weight 0 adds nothing to the meta-gradient: skip its forward. Every
            # parameter still gets a gradient: second order reaches step k's BatchNorm weights
            # through the later support losses, and the constructor refuses first order beyond
            # the multi-step-loss phase, where the weights are all positive.
            if weights[k - 1] > 0:
                predictions = forward(self.backbone, trajectory[k], task.query_x)
                loss = loss + weights[k - 1] * supervised_loss(predictions, task.query_y)
        return TaskOutput(loss, predictions)

    def adapt_to(self, support_x: Tensor, support_y: Tensor) -> Predictor:
        """`eval_inner_steps` inner steps with the learned per-step rates; the predictor runs θK with
        its step's BatchNorm weights (`MetaLearner.adapt_to`)."""

        def adapt() -> Callable[[Tensor], Tensor]:
            adapted = detached(self.adapt(support_task(support_x, support_y), self.eval_inner_steps)[-1])
            return lambda query_x: forward(self.backbone, adapted, query_x)

        return adapted_predictor(self, support_x, support_y, adapt)
