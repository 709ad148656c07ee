"""ANIL, Almost No Inner Loop (Raghu, Raghu, Bengio & Vinyals, ICLR 2020).

The paper finds that MAML's inner loop barely changes the body of the network (feature reuse,
not rapid learning), and that adapting the head alone matches MAML. So the inner loop adapts
only the head; the body's features of the support and query sets are computed once per task,
with θ0, and the head's steps run on them. The body is still meta-learned: the outer loss
reaches it through the features (and, second order, through the head's inner gradients).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_meta.algorithms.base import MetaLearner, TaskOutput, check_inner_loop_args, supervised_loss
from lightning_meta.algorithms.predictor import Predictor, adapted_predictor, detached
from lightning_meta.inner_loop import UpdateRule, adapt, forward, named_params
from lightning_meta.losses.inner import InnerLoss
from lightning_meta.models.norm import prepended_rows
from lightning_meta.task import Params, Task
from lightning_meta.update_rules import SGD


def last_linear(module: nn.Module) -> str:
    """The name of `module`'s last `nn.Linear` submodule (the head of Conv4 and MLP)."""
    names = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"{type(module).__name__} has no nn.Linear to adapt: name the head (model.init_args.head)")
    return names[-1]


class ANIL(MetaLearner):
    """ANIL: MAML whose inner loop adapts only the head, on features computed once per task.

    Args:
        backbone: the network being meta-learned; for classification its output size is the
            number of ways.
        head: name of the backbone's submodule adapted in the inner loop; its output must be
            the backbone's output. Default: the last `nn.Linear` (`head` for Conv4, `net.4`
            for a two-hidden-layer MLP).
        inner_lr: α, the head's inner SGD step size on the mean support loss (the paper keeps
            MAML's values; 0.1 here, as for `MAML`).
        inner_steps: inner steps during meta-training.
        eval_inner_steps: inner steps at validation and test (default: `inner_steps`).
        first_order: treat the head's inner gradients as constants.
        update_rule: the head's inner update (`lightning_meta.update_rules`; default: SGD at
            `inner_lr`, which is then unused), bound to the head's parameters.
        inner_loss: the support loss the inner loop descends, on the head's support features
            (`lightning_meta.losses.inner`: `CandidateLoss`, `ML3Loss`, ...; default: the task's
            own loss). One with parameters is meta-trained with θ; the query loss is always the
            task's own.
        optimizer: the outer optimizer (default Adam, lr 1e-3).
        lr_scheduler: optional outer learning-rate schedule, stepped every meta-batch.
    """

    uses_output_head = True
    supports_vmap = True

    def __init__(
        self,
        backbone: nn.Module,
        head: str | None = None,
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
        self.head = last_linear(backbone) if head is None else head
        if not list(backbone.get_submodule(self.head).parameters()):  # get_submodule raises if absent
            raise ValueError(f"model.init_args.head={self.head!r} has no parameters to adapt")
        self.inner_lr, self.inner_steps, self.eval_inner_steps = inner_lr, inner_steps, eval_inner_steps
        self.first_order = first_order
        self.update_rule = SGD(inner_lr) if update_rule is None else update_rule
        self.inner_loss = inner_loss
        self.update_rule.bind(self.head_params(named_params(backbone)))

    @property
    def head_module(self) -> nn.Module:
        # Looked up, not stored: an attribute would register the head a second time.
        return self.backbone.get_submodule(self.head)

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The head's input (the body's features) and the backbone's output, both at θ0."""
        captured: list[Tensor] = []
        skipped: list[int] = []

        def keep(_module: nn.Module, args: tuple, out: Tensor) -> None:
            # Per-example evaluation runs the support set ahead of x (models/norm.py): keep x's rows.
            skip = prepended_rows()
            skipped.append(skip)
            captured.extend((args[0][skip:], out if not skip else out[skip:]))

        hook = self.head_module.register_forward_hook(keep)
        try:
            output = self.backbone(x)
        finally:
            hook.remove()
        # With rows skipped the backbone's output is a slice of the head's: the shapes must agree.
        gives_output = len(captured) == 2 and (
            captured[1] is output if not skipped[0] else captured[1].shape == output.shape
        )
        if not gives_output:
            raise ValueError(f"ANIL head {self.head!r} must run once per forward and give the backbone's output")
        return captured[0], output

    def head_params(self, params: Params) -> Params:
        """The head's entries of `params`, named as in the head module."""
        prefix = self.head + "."
        return {name.removeprefix(prefix): p for name, p in params.items() if name.startswith(prefix)}

    def adapt_head(self, support_features: Tensor, support_y: Tensor, steps: int) -> list[Params]:
        """The head's inner-loop trajectory on precomputed support features (names as in the head)."""

        # The inner loss sees the head's inputs: the support features (and no queries).
        features_task = Task(support_features, support_y, support_features[:0], support_y[:0])
        support_loss = self.support_loss_fn(features_task, lambda params, x: forward(self.head_module, params, x))
        first_order = self.first_order or not self.training
        return adapt(support_loss, self.head_params(named_params(self.backbone)), steps, self.update_rule, first_order)

    def adapt(self, task: Task, steps: int) -> list[Params]:
        """The trajectory θ0..θK as full backbone parameter dicts (only head entries change)."""
        theta0 = named_params(self.backbone)
        trajectory = self.adapt_head(self.features(task.support_x)[0], task.support_y, steps)
        return [{**theta0, **{f"{self.head}.{n}": p for n, p in head.items()}} for head in trajectory]

    def task_loss(self, task: Task) -> TaskOutput:
        steps = self.inner_steps if self.training else self.eval_inner_steps
        # Support and query pass through the body separately, as in MAML (BatchNorm statistics per set).
        trajectory = self.adapt_head(self.features(task.support_x)[0], task.support_y, steps)
        query_features, output_before = self.features(task.query_x)
        predictions = forward(self.head_module, trajectory[-1], query_features)
        loss_before = None if self.training else supervised_loss(output_before, task.query_y).detach()
        return TaskOutput(supervised_loss(predictions, task.query_y), predictions, loss_before)

    def adapt_to(self, support_x: Tensor, support_y: Tensor) -> Predictor:
        """`eval_inner_steps` head steps on the support features; the predictor runs the body at θ0
        and the adapted head (`MetaLearner.adapt_to`)."""

        def adapt() -> Callable[[Tensor], Tensor]:
            adapted = detached(self.adapt_head(self.features(support_x)[0], support_y, self.eval_inner_steps)[-1])
            return lambda query_x: forward(self.head_module, adapted, self.features(query_x)[0])

        return adapted_predictor(self, support_x, support_y, adapt)
