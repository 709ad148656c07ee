"""Batch normalisation for meta-learning: vmap-correct batch statistics, and per-example evaluation.

`nn.BatchNorm2d` in training mode under `torch.func.vmap` gives silently wrong second-order
meta-gradients (checked in torch 2.13 in float64: conv biases before the norm, whose true
gradient is 0, get non-zero ones; other gradients off by tens of percent; likely
pytorch/functorch#534). The same normalisation spelled out as mean/var/affine ops has no
special batching rule and differentiates correctly under vmap to any order, so the vmapped
path can use it; `tests/test_task_parallel.py` holds the float64 parity against the loop.

Per-example (non-transductive) evaluation. BatchNorm on batch statistics makes each query's
prediction depend on every other query of its batch: transductive, as in the MAML, Reptile
("+ transduction") and Relation Networks papers. `support_statistics` is the other protocol,
for any algorithm without its code knowing: within it, every forward of the backbone on
anything but the support set itself runs the task's support set ahead of its input, and each
batch-statistics BatchNorm layer of the backbone normalises every row with the mean and
variance of those support rows only (under the same parameters: adapted ones inside
`functional_call`), then the support rows are dropped from the output. So a query is
normalised independently of the other queries, and the support set, normalised with its own
statistics, adapts exactly as before. Only BatchNorm mixes examples in the backbones here
(GroupNorm and BatchNorm on running statistics in eval mode already work per example, and
are left alone). The state lives in context variables, so it holds inside `torch.func.vmap`,
`grad` and `functional_call`, and nothing outlasts the `with` block.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from torch import Tensor, nn

_RULE: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar("lightning_meta_norm_rule", default=None)
"""Which rows batch statistics come from: None, all of them; ("rows", R), the first R (the
support set run ahead of the input); ("groups", G), each run of G consecutive rows separately."""

_PER_EXAMPLE: contextvars.ContextVar[bool] = contextvars.ContextVar("lightning_meta_per_example", default=False)
_OWN_STATISTICS: contextvars.ContextVar[bool] = contextvars.ContextVar("lightning_meta_own_statistics", default=False)


def batch_statistics_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """BatchNorm of `x` `[N, C, ...]` on batch statistics (biased variance), affine if `weight`
    and `bias` are given, the statistics taken from the rows the active rule names."""
    rule = _RULE.get()
    dims = (0, *range(2, x.dim()))
    shape = (1, -1, *([1] * (x.dim() - 2)))
    if rule is not None and rule[0] == "groups":
        groups = x.unflatten(0, (-1, rule[1]))  # [N/G, G, C, ...]: one group per query
        group_dims = tuple(d + 1 for d in dims)
        mean = groups.mean(dim=group_dims, keepdim=True)
        var = (groups - mean).pow(2).mean(dim=group_dims, keepdim=True)
        normalised = ((groups - mean) * torch.rsqrt(var + eps)).flatten(0, 1)
    else:
        reference = x if rule is None else x[: rule[1]]
        mean = reference.mean(dim=dims, keepdim=True)
        var = (reference - mean).pow(2).mean(dim=dims, keepdim=True)
        if weight is not None:  # PlainBatchNorm2d's order of operations, kept bit for bit
            return (x - mean) * (weight.view(shape) * torch.rsqrt(var + eps)) + bias.view(shape)
        normalised = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        normalised = normalised * weight.view(shape) + bias.view(shape)
    return normalised


class PlainBatchNorm2d(nn.Module):
    """BatchNorm over (N, H, W) with batch statistics only (no running statistics), affine.

    Numerically the same as `nn.BatchNorm2d(num_features, track_running_stats=False)` (the
    biased variance normalises, as there), with parameters of the same names and shapes.

    Args:
        num_features: channels C of the `[N, C, H, W]` input.
        eps: added to the variance for stability.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        return batch_statistics_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def uses_batch_statistics(module: nn.Module) -> bool:
    """Whether `module` normalises with the statistics of its input batch right now."""
    if isinstance(module, PlainBatchNorm2d):
        return True
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.training or module.running_mean is None  # torch's own rule
    return False


def _renormalise(module: nn.modules.batchnorm._BatchNorm, args: tuple, output: Tensor) -> Tensor | None:
    """Forward hook on torch's BatchNorm: redo it with the rule's statistics (None: keep its output)."""
    if _RULE.get() is None or not uses_batch_statistics(module):
        return None
    return batch_statistics_norm(args[0], module.weight, module.bias, module.eps)


def prepended_rows() -> int:
    """Rows that `support_statistics` ran ahead of the current backbone input (0 outside it).

    For code that hooks a layer inside the backbone (ANIL reads its head's input): the layer
    sees these rows first, then the caller's."""
    rule = _RULE.get()
    return rule[1] if rule is not None and rule[0] == "rows" else 0


def per_example_active() -> bool:
    """Whether a `support_statistics` block is active (the per-example protocol)."""
    return _PER_EXAMPLE.get()


@contextlib.contextmanager
def support_statistics(model: nn.Module, backbone: nn.Module, support_x: Tensor) -> Iterator[None]:
    """Per-example BatchNorm for one task: see the module docstring.

    Args:
        model: the whole learner; its torch BatchNorm layers are hooked for the duration (the
            backbone's, and those of other modules, e.g. Relation Networks' relation module,
            which `query_groups` then governs).
        backbone: the module whose inputs get the support set run ahead of them. It must map
            each input row to one output row (every backbone here does).
        support_x: the task's support inputs `[S, ...]`. An input that is this very tensor is
            the support set itself and runs unchanged.
    """
    stack: list[tuple[contextvars.Token, int]] = []

    def before(_module: nn.Module, args: tuple) -> tuple | None:
        x = args[0]
        if x is support_x or _OWN_STATISTICS.get():
            stack.append((_RULE.set(None), 0))
            return None
        rows = support_x.shape[0]
        stack.append((_RULE.set(("rows", rows)), rows))
        return (torch.cat([support_x, x]), *args[1:])

    def after(_module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        token, rows = stack.pop()
        _RULE.reset(token)
        if not rows:
            return None
        if not isinstance(output, Tensor) or output.shape[0] != args[0].shape[0]:
            raise ValueError(
                f"per-example evaluation needs a backbone that maps each input row to one output row; "
                f"{type(backbone).__name__} returned {type(output).__name__} for {args[0].shape[0]} rows"
            )
        return output[rows:]

    handles = [backbone.register_forward_pre_hook(before), backbone.register_forward_hook(after)]
    # Prepended: the renormalised output replaces the layer's own, so other forward hooks on the
    # layer (CAVIA's FiLM) must see it, not the transductive output.
    handles += [
        m.register_forward_hook(_renormalise, prepend=True)
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    rule_token, flag_token = _RULE.set(None), _PER_EXAMPLE.set(True)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        _PER_EXAMPLE.reset(flag_token)
        _RULE.reset(rule_token)  # also undoes a backbone forward that raised half-way


@contextlib.contextmanager
def own_statistics() -> Iterator[None]:
    """Backbone inputs normalised on their own batch statistics, even under `support_statistics`.

    For an adaptation set that is not the support tensor itself (Reptile's training inner loop
    runs on support and query together): adaptation keeps its statistics under both protocols.
    """
    token = _OWN_STATISTICS.set(True)
    try:
        yield
    finally:
        _OWN_STATISTICS.reset(token)


@contextlib.contextmanager
def query_groups(size: int) -> Iterator[None]:
    """Under the per-example protocol, batch statistics per run of `size` consecutive rows.

    For modules after the backbone whose rows are grouped by query (Relation Networks scores
    each query against every class: `ways` rows a query): each query's rows are normalised
    among themselves, so no query depends on another. A no-op outside `support_statistics`.
    """
    if not _PER_EXAMPLE.get():
        yield
        return
    token = _RULE.set(("groups", size))
    try:
        yield
    finally:
        _RULE.reset(token)
