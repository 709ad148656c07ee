"""How the tasks of a meta-batch are run: one by one (the loop) or together (`torch.func.vmap`).

Both paths compute the same per-task function, so they give the same losses and
meta-gradients (float64 parity in `tests/test_task_parallel.py`). Which is faster depends on
the backbone and the device (vmap turns per-task convolutions into grouped ones: a win where
kernel launches dominate, a loss for Conv4 on CPU), so `auto` times both on the first training
steps and keeps the faster. vmap is only ever chosen automatically for backbones built from
layers proven equal to the loop under it; `nn.BatchNorm*` is not among them (it gives wrong
second-order meta-gradients under vmap: `lightning_meta/models/norm.py`).

Memory: a meta-gradient is accumulated chunk by chunk (`chunk_gradients`), each chunk's graph
freed before the next, so the loop holds one task's graph at a time and vmap one chunk's.

`TaskBatching` holds this strategy for one learner (mode, auto-timing, chunk sizing, and the
state an exactly resumed run needs), so `MetaLearner` only asks it for a `Plan` per step.

Compilation: on the loop path the backbone may run through `torch.compile` (`nn.Module.compile`,
in place, so parameter names, checkpoints and optimizers are unchanged). Only the backbone's
forward is compiled, not the per-task function: that one calls `torch.autograd.grad`, where
Dynamo breaks the graph anyway, and the key check of `inner_loop.forward` stays outside the
compiled region. A second-order inner gradient runs its support forward eagerly
(`inner_loop.compiled_backbone`); vmapped steps run eagerly (`torch.func` transforms around a
compiled module are not what the parity tests cover). `compile="auto"` compiles where the
algorithm says it was measured faster and proven equal (`MetaLearner.compile_by_default`), on a
CPU, in fits long enough to pay the compilation back (`COMPILE_AUTO_MIN_STEPS`).

Mixed precision: under `precision="16-mixed"` Lightning's `GradScaler` multiplies the loss a
training step returns before its backward, so that small gradients do not underflow in float16.
The chunks' own backwards (`torch.autograd.grad`) happen before that, so each chunk's loss is
multiplied by the same scale first and its gradient divided by it after (exact for the default
scaler, whose scale is a power of two); an inf or NaN from an overflowing chunk survives both and
reaches the scaler, which skips the step and lowers its scale as it would for one backward. bf16
keeps float32's range and has no scaler.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_meta.inner_loop import UpdateRule, compiled_backbone, functional_gradients
from lightning_meta.losses.inner import InnerLoss
from lightning_meta.models.conv4 import GlobalAvgPool
from lightning_meta.models.norm import PlainBatchNorm2d
from lightning_meta.models.resnet12 import DropBlock
from lightning_meta.task import Task, TaskBatch

MODES = ("auto", "loop", "vmap")

COMPILE_OPTIONS: dict[str, Any] = {"dynamic": False}
"""Keyword arguments of `nn.Module.compile` for the backbone. Static shapes: one graph per input
shape and mode (a task's support and query sets, training and evaluation), as measured."""

COMPILE_AUTO_MIN_STEPS = 1000
"""`compile="auto"` compiles only fits planned for at least this many training steps
(`Trainer.estimated_stepping_batches`): the first steps pay the compilation (up to about a minute
for Conv4 on a CPU with a cold inductor cache), which the faster steps pay back (first-order MAML,
8 tasks of Omniglot 5-way: about 0.1 s a step, so some 500 steps); short runs and tests stay eager."""

COMPILE_AUTO_MIN_SECONDS = 1800
"""A fit bounded by `max_time` counts as long for `compile="auto"` only if it may run at least this
long: `estimated_stepping_batches` ignores the time limit. A 4-minute first-order MAML fit of
`benchmarks/omniglot_table.py` at 20-way made 30 steps compiled and 32 eager (separate runs, the
CPU shared with other jobs): nothing gained at that budget. At the measured 0.82x step time a
compilation of about a minute pays back after some 6 minutes; 30 leave a margin."""


@functools.cache
def cpu_compiler_found() -> bool:
    """Whether inductor finds the C++ compiler it builds CPU code with; without one, "auto" stays
    eager rather than failing at the first compiled step. (A private torch API: if it moves, False.)"""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception:  # no compiler, or the API moved: either way, do not compile by default
        return False
    return True


VMAP_PROVEN: tuple[type[nn.Module], ...] = (
    nn.Conv2d,
    nn.Linear,
    nn.ReLU,
    nn.LeakyReLU,
    nn.Tanh,
    nn.MaxPool2d,
    nn.Flatten,
    GlobalAvgPool,
    nn.Identity,
    nn.Sequential,
    nn.GroupNorm,
    PlainBatchNorm2d,
)
"""Layer types whose vmapped meta-gradients match the loop's in float64 (second order)."""

PARAMETER_CONTAINERS: tuple[type[nn.Module], ...] = (nn.ParameterDict, nn.ParameterList)
"""Modules that only hold tensors for the algorithm's own arithmetic (no forward of their own)."""


def vmap_blocker(module: nn.Module) -> str | None:
    """Why the tasks cannot be vmapped over `module`'s layers, or None if they can."""
    vouched: list[str] = []  # inner-loop components that answered for their whole subtree
    for name, sub in module.named_modules():
        if any(name.startswith(prefix) for prefix in vouched):
            continue
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            return (
                f"{name} is {type(sub).__name__}, whose second-order meta-gradients are wrong under "
                "vmap (pytorch/functorch#534): use Conv4(norm='plain_batch') or GroupNorm"
            )
        if isinstance(sub, DropBlock) and sub.drop_rate > 0:
            return (
                f"{name} is DropBlock, whose random masks torch.func.vmap refuses to draw (randomness='error'; "
                "the loop draws them per task): use the loop path, or drop_rate=0"
            )
        # An update rule or an inner loss says itself whether its vmapped steps are proven equal to
        # the loop's (its own layers are shared by every task, not per-task computations to vet).
        if isinstance(sub, (UpdateRule, InnerLoss)):
            if sub.vmap_blocker:
                return f"{name}: {sub.vmap_blocker}"
            vouched.append(f"{name}.")
            continue
        # The algorithm's own containers (its class, ModuleDicts, ParameterDicts of learned rates)
        # compute nothing themselves: the algorithm's task_loss uses their tensors, and that is
        # what `supports_vmap` and the family's float64 loop/vmap parity tests vouch for.
        if isinstance(sub, PARAMETER_CONTAINERS):
            continue
        if not list(sub.children()) and not isinstance(sub, VMAP_PROVEN):
            return f"{name} is {type(sub).__name__}, not among the layers proven equal to the loop under vmap"
    return None


# Memory, for sizing vmap chunks: device memory on CUDA; on a Linux host the process's resident
# set (its high-water mark reset through /proc/self/clear_refs) against MemAvailable.

MEMORY_FRACTION = {"cuda": 0.8, "cpu": 0.5}
"""Share of the free memory one vmapped chunk may take (the host's is shared with data workers)."""


def _proc_kib(path: str, field: str) -> int | None:
    try:
        found = re.search(rf"^{field}:\s+(\d+) kB", Path(path).read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(found.group(1)) * 1024 if found else None


def memory_mark(device: torch.device) -> int | None:
    """Start a peak measurement; the bytes in use now (None where it cannot be measured)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    except OSError:
        return None
    return _proc_kib("/proc/self/status", "VmRSS")


def memory_peak(device: torch.device) -> int | None:
    """Peak bytes in use since `memory_mark`."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return _proc_kib("/proc/self/status", "VmHWM") if device.type == "cpu" else None


def memory_free(device: torch.device) -> int | None:
    """Bytes a new allocation can still take."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return _proc_kib("/proc/meminfo", "MemAvailable") if device.type == "cpu" else None


def chunk_for_memory(tasks: int, bytes_per_task: float, free: int, fraction: float) -> int:
    """The most tasks (at least 1, at most `tasks`) whose vmapped step fits `fraction × free`."""
    return max(1, min(tasks, int(fraction * free / max(bytes_per_task, 1.0))))


def split(batch: TaskBatch, chunk_size: int) -> list[TaskBatch]:
    """Consecutive chunks of at most `chunk_size` tasks."""
    return [batch.slice(start, start + chunk_size) for start in range(0, len(batch), chunk_size)]


def run_loop(task_loss: Callable[[Task], object], batch: TaskBatch) -> dict[str, Tensor]:
    """Each task in turn; outputs stacked along a new task dimension."""
    outputs = [task_loss(task)._asdict() for task in batch]
    return {k: torch.stack([o[k] for o in outputs]) for k, v in outputs[0].items() if v is not None}


def run_vmap(task_loss: Callable[[Task], object], batch: TaskBatch) -> dict[str, Tensor]:
    """All tasks at once under `torch.func.vmap`, inner gradients from `torch.func.grad`."""

    def one(support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> dict[str, Tensor]:
        out = task_loss(Task(support_x, support_y, query_x, query_y))._asdict()
        return {k: v for k, v in out.items() if v is not None}

    with functional_gradients():
        return torch.func.vmap(one)(batch.support_x, batch.support_y, batch.query_x, batch.query_y)


def chunk_gradients(
    losses: Iterator[tuple[Tensor, float]], params: list[nn.Parameter], loss_scale: Tensor | None = None
) -> tuple[Tensor, list[Tensor]]:
    """Sum of `weight × loss` over chunks and its gradient w.r.t. `params`, one chunk at a time.

    Each chunk's graph is freed by its own `torch.autograd.grad` before the next chunk is built.
    With `loss_scale` (a float16 `GradScaler`'s scale), each chunk's backward runs on the scaled
    loss, as Lightning's own backward would, and the sum is divided by it after: the gradient is
    the unscaled one, and an overflow (inf) or NaN in any chunk stays in it for the scaler to see.
    """
    total = torch.zeros(())
    grads: list[Tensor] | None = None
    for loss, weight in losses:
        weighted = loss * weight
        scaled = weighted if loss_scale is None else weighted * loss_scale
        chunk = torch.autograd.grad(scaled, params, allow_unused=True, materialize_grads=True)
        grads = list(chunk) if grads is None else [g + c for g, c in zip(grads, chunk, strict=True)]
        total = total.to(weighted) + weighted.detach()
    assert grads is not None, "no chunks"
    if loss_scale is not None:
        grads = [g / loss_scale.to(g) for g in grads]
    return total, grads


def surrogate_loss(value: Tensor, params: list[nn.Parameter], grads: list[Tensor]) -> Tensor:
    """A loss equal to `value` whose gradient w.r.t. `params` is `grads`.

    Lets a meta-gradient computed chunk by chunk go through Lightning's one `backward()` per
    step, so its optimizer, gradient clipping, precision plugins and DDP all still apply: DDP
    all-reduces during that backward, as for any loss.
    """
    linear = sum((p * g.detach()).sum() for p, g in zip(params, grads, strict=True))
    return value.detach() + linear - linear.detach()


class Plan(NamedTuple):
    """How one step runs its tasks: `path` "loop" or "vmap", at most `chunk_size` tasks per chunk."""

    path: str
    chunk_size: int


def meta_objective(
    meta_loss: Callable[[TaskBatch, str], tuple[Tensor, dict[str, Tensor]]],
    batch: TaskBatch,
    plan: Plan,
    params: list[nn.Parameter],
    loss_scale: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """The meta-loss, per-task statistics, and the objective whose backward gives the meta-gradient.

    One chunk: the objective is the meta-loss itself (one graph, one backward). Several: each
    chunk's gradient is taken in turn (`chunk_gradients`, scaled by `loss_scale`) and the
    objective is their `surrogate_loss`, equal in value and gradient.

    Args:
        meta_loss: `(tasks, path) -> (mean query loss, per-task statistics)`.
        batch: the tasks of this step.
        plan: the path and chunk size (`TaskBatching.step`).
        params: the trainable parameters the meta-gradient is taken for.
        loss_scale: the float16 `GradScaler`'s current scale, if one is active.
    """
    chunks = split(batch, plan.chunk_size)
    if len(chunks) == 1:
        loss, stats = meta_loss(batch, plan.path)
        return loss, stats, loss
    chunk_stats: list[dict[str, Tensor]] = []

    def weighted_losses() -> Iterator[tuple[Tensor, float]]:
        for chunk in chunks:
            chunk_loss, stats = meta_loss(chunk, plan.path)
            chunk_stats.append(stats)
            yield chunk_loss, len(chunk) / len(batch)

    loss, grads = chunk_gradients(weighted_losses(), params, loss_scale)
    stats = {key: torch.cat([s[key] for s in chunk_stats]) for key in chunk_stats[0]}
    return loss, stats, surrogate_loss(loss, params, grads)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TaskBatching:
    """One learner's task-batching strategy: the path (loop or vmap) and chunk size of each step.

    `mode` "auto" times the loop and vmap on alternate first training steps (`AUTOTUNE_STEPS`)
    and keeps the faster, the same on every DDP rank; a vmap chunk size left unset is sized from
    the memory the first vmapped step (run whole) took. `state_dict` holds what an exactly
    resumed run needs (the choice and the timings so far); the memory measure is taken again.

    `compile` says whether the loop path runs the backbone compiled (`compiled`).

    Args:
        mode: "auto", "loop" or "vmap" (`MetaLearner.task_batching`).
        chunk_size: tasks per chunk, or None for the default (`MetaLearner.task_chunk_size`).
        compile: "auto", True or False (`MetaLearner.compile_backbone`).
    """

    AUTOTUNE_STEPS = 4
    """Auto mode times loop, vmap, loop, vmap on the first steps and compares the last two."""

    def __init__(self, mode: str = "auto", chunk_size: int | None = None, compile: str | bool = "auto") -> None:
        self.mode = mode
        self.chunk_size = chunk_size
        self.compile = compile
        self.compiled_here = False  # a backbone the user compiled is left as it is
        self.chosen: str | None = None
        self.times: list[tuple[str, float]] = []
        self.bytes_per_vmapped_task: float | None = None

    def compile_wanted(self, by_default: bool, planned_steps: Callable[[], float | None], device: torch.device) -> bool:
        """Whether the loop path runs the backbone compiled: `compile` if set, else ("auto")
        `by_default` (the algorithm's, see `MetaLearner.compile_by_default`) on a CPU, in a fit of
        at least `COMPILE_AUTO_MIN_STEPS` `planned_steps()` (None: not in a fit), where inductor
        finds a C++ compiler."""
        if not (isinstance(self.compile, bool) or self.compile == "auto"):  # 1 and 0 are not choices
            raise ValueError(f"compile={self.compile!r} is not one of 'auto', true, false")
        if self.compile != "auto":
            return self.compile
        if not by_default or device.type != "cpu" or not cpu_compiler_found():
            return False
        planned = planned_steps()
        return planned is not None and planned >= COMPILE_AUTO_MIN_STEPS

    @contextmanager
    def compiled(
        self,
        backbone: nn.Module,
        path: str,
        by_default: bool,
        planned_steps: Callable[[], float | None],
        device: torch.device,
        owner: str = "",
    ) -> Iterator[bool]:
        """Run the body of the `with` with `backbone` compiled (the loop path, where `compile_wanted`)
        or eagerly (a backbone compiled here runs eagerly through `torch.compiler.set_stance`; one
        the user compiled is left alone); yields whether it was compiled here and runs so.

        Args:
            backbone: the learner's backbone; compiled in place on first use (again after unpickling,
                which drops the compiled code).
            path: this step's path ("loop" or "vmap").
            by_default: whether the learner compiles under "auto" (`MetaLearner.compile_by_default`).
            planned_steps: the training steps of the fit in progress, or None (for "auto").
            device: where the step runs.
            owner: the learner's name, for the message that announces compilation.
        """
        is_compiled = getattr(backbone, "_compiled_call_impl", None) is not None  # set by nn.Module.compile
        if path == "loop" and self.compile_wanted(by_default, planned_steps, device):
            if not is_compiled:
                rank_zero_info(
                    f"{owner}: compiling {type(backbone).__name__} (torch.compile); the first steps of "
                    "each input shape take longer"
                )
                backbone.compile(**COMPILE_OPTIONS)
                self.compiled_here = True
            with compiled_backbone():
                yield True
        elif is_compiled and self.compiled_here:
            with torch.compiler.set_stance("force_eager"):
                yield False
        else:
            yield False

    def training_path(self, vmap_blocker: Callable[[], str | None]) -> str:
        """The path for this training step: fixed, chosen, or the next one to time.

        Args:
            vmap_blocker: why the learner's tasks cannot be vmapped, or None if they can.
        """
        if self.mode not in MODES:
            raise ValueError(f"task_batching={self.mode!r} is not one of {MODES}")
        if self.mode == "vmap" and (reason := vmap_blocker()):
            raise ValueError(f"task_batching='vmap' cannot be used: {reason}; use 'loop' or 'auto'")
        if self.mode != "auto":
            return self.mode
        if self.chosen is None and vmap_blocker() is not None:
            self.chosen = "loop"
        if self.chosen is not None:
            return self.chosen
        return ("loop", "vmap")[len(self.times) % 2]

    def chunk_size_for(self, path: str, tasks: int, device: torch.device) -> int:
        """Tasks per chunk on `path` for a batch of `tasks` (see `MetaLearner.task_chunk_size`)."""
        if self.chunk_size is not None:
            return self.chunk_size
        if path == "loop":
            return 1
        # vmap: as many tasks per chunk as the free memory holds, measured on the first vmapped
        # step (which runs whole); all of them where memory cannot be measured.
        free = memory_free(device) if self.bytes_per_vmapped_task else None
        if free is None:
            return tasks
        fraction = MEMORY_FRACTION.get(device.type, 0.5)
        return chunk_for_memory(tasks, self.bytes_per_vmapped_task, free, fraction)

    def eval_plan(self, tasks: int) -> Plan:
        """Validation and test: the path training chose (the loop before any choice), and the
        set chunk size or all the tasks at once (no meta-gradient, so no graphs to hold)."""
        path = self.chosen or (self.mode if self.mode != "auto" else "loop")
        return Plan(path, self.chunk_size or tasks)

    @contextmanager
    def step(
        self,
        tasks: int,
        device: torch.device,
        vmap_blocker: Callable[[], str | None],
        broadcast: Callable[[str], str] | None = None,
        owner: str = "",
    ) -> Iterator[Plan]:
        """Plan one training step of `tasks` tasks; time it (auto mode, before the choice) and
        measure its memory (the first whole vmapped step) around the body of the `with`.

        Args:
            tasks: the tasks in this step's batch.
            device: where the step runs (for timing and memory).
            vmap_blocker: why the tasks cannot be vmapped, or None if they can.
            broadcast: sends rank 0's value to every rank (DDP), so all ranks keep the same path.
            owner: the learner's name, for the message that reports the choice.
        """
        path = self.training_path(vmap_blocker)
        timing = self.mode == "auto" and self.chosen is None
        sizing = path == "vmap" and self.bytes_per_vmapped_task is None and self.chunk_size is None
        start_bytes = memory_mark(device) if sizing else None
        if timing:
            _synchronize(device)
            start = time.perf_counter()
        plan = Plan(path, self.chunk_size_for(path, tasks, device))
        yield plan
        if start_bytes is not None and (peak := memory_peak(device)) is not None:
            self.bytes_per_vmapped_task = max(peak - start_bytes, 1) / min(plan.chunk_size, tasks)
        if timing:
            _synchronize(device)
            self.record(path, time.perf_counter() - start, broadcast, owner)

    def record(self, path: str, seconds: float, broadcast: Callable[[str], str] | None = None, owner: str = "") -> None:
        """Add one timed step; after `AUTOTUNE_STEPS` of them, choose the faster path."""
        self.times.append((path, seconds))
        if len(self.times) < self.AUTOTUNE_STEPS:
            return
        last = dict(self.times[-2:])
        choice = min(last, key=last.get)
        if broadcast is not None:
            choice = broadcast(choice)  # all ranks run the same path
        self.chosen = choice
        rank_zero_info(
            f"{owner}: task batching '{choice}' (step time loop {1000 * last['loop']:.0f} ms, "
            f"vmap {1000 * last['vmap']:.0f} ms)"
        )

    def state_dict(self) -> dict:
        """The choice and the timings so far (checkpoint keys `chosen_batching`, `batching_times`)."""
        return {"chosen_batching": self.chosen, "batching_times": list(self.times)}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""
        self.chosen = state["chosen_batching"]
        self.times = [tuple(t) for t in state["batching_times"]]
