"""Plain SGD in the inner loop, θ ← θ − α ∇L(θ): MAML's step (Finn et al. 2017)."""

from __future__ import annotations

from collections.abc import Sequence

from lightning_meta.inner_loop import StepSizes, UpdateRule, sgd_step
from lightning_meta.task import Params


class SGD(UpdateRule):
    """θ − α g with a fixed α; no state, no parameters of its own.

    Args:
        lr: α, one float for every step, or one per step. Built in code, it may also be a tensor
            or a dict of per-parameter tensors (e.g. rates held elsewhere); names missing from
            such a dict are not updated.
    """

    def __init__(self, lr: float | list[float] = 0.1) -> None:
        super().__init__()
        self.lr: StepSizes = lr

    def forward(self, params: Params, grads: Params, state: None, step: int) -> tuple[Params, None]:
        lr = self.lr[step] if isinstance(self.lr, Sequence) else self.lr
        return sgd_step(params, grads, lr), state

    def extra_repr(self) -> str:
        return f"lr={self.lr}" if isinstance(self.lr, float | int) else ""
