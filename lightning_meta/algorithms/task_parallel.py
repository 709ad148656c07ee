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
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_meta.inner_loop import functional_gradients
from lightning_meta.models.conv4 import GlobalAvgPool
from lightning_meta.models.norm import PlainBatchNorm2d
from lightning_meta.task import Task, TaskBatch

MODES = ("auto", "loop", "vmap")

VMAP_PROVEN: tuple[type[nn.Module], ...] = (
    nn.Conv2d,
    nn.Linear,
    nn.ReLU,
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
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            return (
                f"{name} is {type(sub).__name__}, whose second-order meta-gradients are wrong under "
                "vmap (pytorch/functorch#534): use Conv4(norm='plain_batch') or GroupNorm"
            )
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


def chunk_gradients(losses: Iterator[tuple[Tensor, float]], params: list[nn.Parameter]) -> tuple[Tensor, list[Tensor]]:
    """Sum of `weight × loss` over chunks and its gradient w.r.t. `params`, one chunk at a time.

    Each chunk's graph is freed by its own `torch.autograd.grad` before the next chunk is built.
    """
    total = torch.zeros(())
    grads: list[Tensor] | None = None
    for loss, weight in losses:
        weighted = loss * weight
        chunk = torch.autograd.grad(weighted, params, allow_unused=True, materialize_grads=True)
        grads = list(chunk) if grads is None else [g + c for g, c in zip(grads, chunk, strict=True)]
        total = total.to(weighted) + weighted.detach()
    assert grads is not None, "no chunks"
    return total, grads


def surrogate_loss(value: Tensor, params: list[nn.Parameter], grads: list[Tensor]) -> Tensor:
    """A loss equal to `value` whose gradient w.r.t. `params` is `grads`.

    Lets a meta-gradient computed chunk by chunk go through Lightning's one `backward()` per
    step, so its optimizer, gradient clipping, precision plugins and DDP all still apply: DDP
    all-reduces during that backward, as for any loss.
    """
    linear = sum((p * g.detach()).sum() for p, g in zip(params, grads, strict=True))
    return value.detach() + linear - linear.detach()
