"""The functional inner loop shared by every gradient-based meta-learner.

Adaptation takes gradient steps on a parameter dict, never on the module itself: the
module's parameters stay the meta-parameters θ0, and the adapted parameters θ1..θK are new
tensors whose graph back to θ0 is kept (second order, MAML, Finn et al. 2017) or cut
(`first_order=True`, FOMAML). Each step is an `UpdateRule`, `(params, grads, state, step) ->
(params, state)`: SGD with a float step size (MAML), learned per-entry rates (Meta-SGD, Li et al.
2017), learned per-step rates (MAML++, Antoniou et al. 2019), a learned LSTM optimizer
(Andrychowicz et al. 2016); the rules live in `lightning_meta.update_rules`. A rule may carry
state across the inner steps (an LSTM's hidden state) and hold parameters of its own, which the
outer optimizer trains like θ. `first_order` only decides whether the inner gradients keep their
graph. `adapt` returns the whole trajectory, so multi-step losses need no second code path.
Nothing here calls `.backward()` or mutates a module, so a per-task call is pure in
(params, task) and can be vmapped over the tasks of a batch: inside `functional_gradients()`
(which the task-parallel path of `MetaLearner` enters around `torch.func.vmap`) the inner
gradients come from `torch.func.grad`, which vmap can batch, instead of `torch.autograd.grad`,
which it cannot. Both give the same values (tested in float64).

A backbone may run compiled (`torch.compile`, `MetaLearner.compile_backbone`): inside
`compiled_backbone()` a second-order inner gradient runs its support forward eagerly, because
AOTAutograd's compiled backward cannot itself be differentiated ("does not currently support
double backward"); every other forward (first-order steps, the query set) stays compiled.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_meta.task import Params

StepSize = Union[float, Tensor, Mapping[str, Union[float, Tensor]]]
"""A scalar for every parameter, or one entry per adapted parameter name."""

StepSizes = Union[StepSize, Sequence[StepSize]]
"""One `StepSize` for all steps, or a sequence with one per step."""

_FUNCTIONAL = contextvars.ContextVar("lightning_meta_functional_gradients", default=False)
_COMPILED = contextvars.ContextVar("lightning_meta_compiled_backbone", default=False)


@contextlib.contextmanager
def functional_gradients() -> Iterator[None]:
    """Within this context, `adapt` takes inner gradients with `torch.func.grad` (vmap-able)."""
    token = _FUNCTIONAL.set(True)
    try:
        yield
    finally:
        _FUNCTIONAL.reset(token)


@contextlib.contextmanager
def compiled_backbone() -> Iterator[None]:
    """Within this context the module `loss_fn` runs may be compiled: second-order inner
    gradients then run `loss_fn` eagerly (see the module docstring)."""
    token = _COMPILED.set(True)
    try:
        yield
    finally:
        _COMPILED.reset(token)


def _eager_for_double_backward(loss_fn: Callable[[Params], Tensor], inputs: Params) -> Tensor:
    warnings.warn(
        "compiled backbone: second-order inner gradients run the support forward eagerly, since "
        "torch.compile's AOTAutograd cannot differentiate a compiled backward again (double backward); "
        "the query forwards stay compiled. For a fully compiled step use first_order=True",
        stacklevel=3,
    )
    with torch.compiler.set_stance("force_eager"):
        return loss_fn(inputs)


def inner_gradients(loss_fn: Callable[[Params], Tensor], params: Params, first_order: bool) -> Params:
    """∇ loss_fn(params), differentiable w.r.t. the params' own graph unless `first_order`."""
    return inner_gradients_and_loss(loss_fn, params, first_order)[0]


def inner_gradients_and_loss(
    loss_fn: Callable[[Params], Tensor], params: Params, first_order: bool
) -> tuple[Params, Tensor]:
    """(∇ loss_fn(params), loss_fn(params)): both keep their graph to the params unless `first_order`."""
    if _FUNCTIONAL.get():
        grads, loss = torch.func.grad_and_value(loss_fn)(params)
        return ({n: g.detach() for n, g in grads.items()}, loss.detach()) if first_order else (grads, loss)
    # A θ outside any graph (e.g. detached by the caller) still needs inner gradients.
    inputs = {n: p if p.requires_grad else p.detach().requires_grad_() for n, p in params.items()}
    second_order_compiled = not first_order and _COMPILED.get() and not torch.compiler.is_compiling()
    loss = _eager_for_double_backward(loss_fn, inputs) if second_order_compiled else loss_fn(inputs)
    grads = torch.autograd.grad(
        loss,
        list(inputs.values()),
        create_graph=not first_order,
        allow_unused=True,
        materialize_grads=True,
    )
    return dict(zip(inputs, grads, strict=True)), loss.detach() if first_order else loss


def named_params(module: nn.Module, names: Sequence[str] | None = None) -> Params:
    """The module's trainable parameters (or just `names`) as a dict, graph to the module kept."""
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    if names is None:
        return params
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"no trainable parameters named {missing}; the module has {sorted(params)}")
    return {n: params[n] for n in names}


_STATE_NAMES: weakref.WeakKeyDictionary[nn.Module, frozenset[str]] = weakref.WeakKeyDictionary()
"""Per module, the names `functional_call` can replace: computed once, not on every inner step."""


def _state_names(module: nn.Module, refresh: bool = False) -> frozenset[str]:
    names = None if refresh else _STATE_NAMES.get(module)
    if names is None:
        # remove_duplicate=False: a tied parameter may be passed under any of its names.
        names = frozenset(
            [n for n, _ in module.named_parameters(remove_duplicate=False)]
            + [n for n, _ in module.named_buffers(remove_duplicate=False)]
        )
        _STATE_NAMES[module] = names
    return names


def forward(module: nn.Module, params: Params, x: Tensor) -> Tensor:
    """Run `module` on `x` with `params` in place of its own (others, e.g. buffers, unchanged).

    `params` may name a subset of the module's parameters and buffers, but no other name:
    `functional_call(strict=False)` alone would drop a mis-named entry (say `wieght`) and
    silently use the module's own tensor instead.

    Raises:
        KeyError: a key of `params` is neither a parameter nor a buffer of `module`; the
            message names it and the closest real names.
    """
    # One hash lookup per key against a cached set. A miss rebuilds the set once before failing,
    # so a parameter registered after the first call is not refused on a stale cache.
    if not _state_names(module).issuperset(params) and not _state_names(module, refresh=True).issuperset(params):
        names = _state_names(module)
        hints = []
        for key in sorted(set(params) - names):
            close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
            hints.append(f"{key!r} (closest: {', '.join(map(repr, close))})" if close else repr(key))
        listed = sorted(names)
        listed_text = ", ".join(listed[:10]) + (f" and {len(listed) - 10} more" if len(listed) > 10 else "")
        raise KeyError(
            f"{type(module).__name__} has no parameter or buffer named {', '.join(hints)}; a mis-named "
            f"entry would be ignored and the module's own tensor used: fix the key in the dict passed "
            f"to forward (the module has: {listed_text})"
        )
    return functional_call(module, params, (x,), strict=False)


def sgd_step(params: Params, grads: Params, step_size: StepSize) -> Params:
    """θ - α ⊙ g, with α a scalar or a per-name entry (missing names are not updated)."""
    if isinstance(step_size, Mapping):
        return {n: p - step_size[n] * grads[n] if n in step_size else p for n, p in params.items()}
    return {n: p - step_size * grads[n] for n, p in params.items()}


class UpdateRule(nn.Module):
    """One inner step: `rule(params, grads, state, step) -> (params, state)`.

    A rule is an `nn.Module` so that its own parameters (learned rates, an LSTM's weights) live
    in the learner's `state_dict` and reach the outer optimizer when the learner holds it as a
    submodule (`learner.update_rule`). `state` is whatever the rule carries across the steps of
    one task's adaptation (None for a stateless rule); `init_state` makes it from θ0 at the
    start of every adaptation. The call must be a pure tensor function of its inputs for the
    task-parallel (vmapped) path; a rule that is not proven equal to the loop under vmap says why
    in `vmap_blocker`, and the learner then runs its tasks in a loop.
    """

    vmap_blocker: str | None = None
    """Why this rule may not run under `torch.func.vmap`, or None if its loop/vmap parity is tested."""

    needs_loss: bool = False
    """True: the rule also reads the support loss at θ_k, and `update_step` calls it with `loss=`
    (a scalar, graph kept unless first order), e.g. the Meta-Learner LSTM. False keeps the
    four-argument call, so the other rules' numbers cannot change."""

    def bind(self, params: Params) -> None:
        """Make any per-tensor parameters for the tensors `params` names (called once by the
        learner, with θ0, in its constructor). Default: nothing to make."""

    def init_state(self, params: Params) -> Any:
        """The state at the start of one task's adaptation from `params` (θ0). Default: None."""
        return None

    def forward(self, params: Params, grads: Params, state: Any, step: int) -> tuple[Params, Any]:
        """θ_{k+1} and the next state from θ_k, ∇L(θ_k), the state and k (0-based)."""
        raise NotImplementedError


def as_update_rule(step_size: StepSizes | UpdateRule) -> UpdateRule:
    """`step_size` itself if it is a rule, else plain SGD with that step size (a float, a dict
    of per-parameter tensors, or one of those per step)."""
    if isinstance(step_size, UpdateRule):
        return step_size
    from lightning_meta.update_rules.sgd import SGD  # update_rules builds on this module

    return SGD(step_size)


def update_step(
    loss_fn: Callable[[Params], Tensor],
    params: Params,
    rule: UpdateRule,
    state: Any,
    step: int,
    first_order: bool = False,
) -> tuple[Params, Any]:
    """One inner step of `rule` on `loss_fn` from `params`: (θ_{k+1}, next state)."""
    with torch.enable_grad():
        if rule.needs_loss:
            grads, loss = inner_gradients_and_loss(loss_fn, params, first_order)
            return rule(params, grads, state, step, loss=loss)
        return rule(params, inner_gradients(loss_fn, params, first_order), state, step)


def adapt(
    loss_fn: Callable[[Params], Tensor],
    params: Params,
    steps: int,
    step_size: StepSizes | UpdateRule,
    first_order: bool = False,
) -> list[Params]:
    """Adapt `params` by `steps` steps of an update rule on `loss_fn`; return θ0..θK.

    Args:
        loss_fn: the support loss as a function of the parameters being adapted.
        params: θ0, the parameters to adapt (typically the module's own, graph attached).
        steps: number of inner steps K (0 returns `[params]`).
        step_size: the update rule (`UpdateRule`), or SGD's α: a float or tensor, a dict of
            per-parameter tensors, or a sequence with one of those per step.
        first_order: do not differentiate through the inner gradients (`create_graph=False`,
            or detached gradients under `functional_gradients`): the first-order approximation
            (FOMAML). Nothing else changes; use it also when no outer backward follows
            (evaluation), where it gives the same θK for less memory.

    Returns:
        The trajectory `[θ0, θ1, ..., θK]`; θ0 is `params` itself.
    """
    if steps < 0:
        raise ValueError(f"inner steps={steps} must be >= 0")
    rule = as_update_rule(step_size)
    if isinstance(step_size, Sequence) and len(step_size) != steps:
        raise ValueError(f"got {len(step_size)} per-step step sizes for {steps} inner steps")
    trajectory = [params]
    # Under torch.no_grad (e.g. a caller's evaluation loop) the inner loop would silently not
    # adapt; gradients are always needed here, the outer graph only when the caller has one.
    with torch.enable_grad():
        state = rule.init_state(params)
        for step in range(steps):
            current, state = update_step(loss_fn, trajectory[-1], rule, state, step, first_order)
            trajectory.append(current)
    return trajectory
