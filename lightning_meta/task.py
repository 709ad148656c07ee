"""The shared vocabulary of the project: a few-shot task, a batch of tasks, a parameter dict.

Every layer speaks these types: the data layer yields `TaskBatch`es, the algorithms adapt
`Params` on a task's support set and score its query set. Nothing here imports Lightning, so
the types can be used from a plain training loop too.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch
from torch import Tensor

Params = dict[str, Tensor]
"""Named parameters, as `torch.func.functional_call` takes them."""


@dataclass
class Task:
    """One task: a support set to adapt on and a query set to score the adapted model on.

    Classification labels are integer class indices 0..ways-1 (`torch.long`); regression
    targets are float tensors with the same leading dimension as the inputs.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    @property
    def is_classification(self) -> bool:
        return not torch.is_floating_point(self.query_y)


@dataclass
class TaskBatch:
    """Tasks of identical shapes stacked along a new leading dimension (the task dimension).

    A plain dataclass, so Lightning moves it between devices and precisions field by field.

    A family whose tasks come in types (clean / corrupted: issue 15) also sets `task_type` and
    `type_names` on the batch it stacks; they are attributes, not fields, so every other batch and
    every `TaskBatch(...)` call stay as they were, and `slice`, `to` and `pin_memory` keep them.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    task_type = None
    """None, or each task's type `[tasks]` (int64), an index into `type_names` (set per instance)."""

    type_names = None
    """None, or the names of the types `task_type` indexes, e.g. ("clean", "corrupted")."""

    def with_types(self, task_type: Tensor | None, type_names: tuple[str, ...] | None) -> TaskBatch:
        """This batch with `task_type` and `type_names` set (in place; returned for chaining)."""
        if task_type is not None:
            if type_names is None or task_type.shape != (len(self),):
                raise ValueError(
                    f"task_type needs one type per task ({len(self)}) and type_names, got shape "
                    f"{tuple(task_type.shape)} and {type_names}"
                )
            self.task_type, self.type_names = task_type, tuple(type_names)
        return self

    def __post_init__(self) -> None:
        sizes = {f.name: getattr(self, f.name).shape[0] for f in fields(self)}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"TaskBatch fields disagree on the number of tasks: {sizes}")

    @classmethod
    def stack(cls, tasks: list[Task]) -> TaskBatch:
        """Stack tasks of identical shapes; raises if any two tasks differ in shape."""
        if not tasks:
            raise ValueError("TaskBatch.stack needs at least one task")
        return cls(**{f.name: torch.stack([getattr(t, f.name) for t in tasks]) for f in fields(cls)})

    def __len__(self) -> int:
        return self.support_x.shape[0]

    def slice(self, start: int, stop: int) -> TaskBatch:
        """Tasks `start .. stop-1` as a batch (views, no copy)."""
        task_type = None if self.task_type is None else self.task_type[start:stop]
        sliced = TaskBatch(**{f.name: getattr(self, f.name)[start:stop] for f in fields(self)})
        return sliced.with_types(task_type, self.type_names)

    def __getitem__(self, index: int) -> Task:
        return Task(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def __iter__(self) -> Iterator[Task]:
        return (self[i] for i in range(len(self)))

    @property
    def is_classification(self) -> bool:
        return not torch.is_floating_point(self.query_y)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TaskBatch:
        """Move every field to `device` (dtypes unchanged: labels stay integer)."""
        moved = TaskBatch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})
        task_type = None if self.task_type is None else self.task_type.to(device, non_blocking=non_blocking)
        return moved.with_types(task_type, self.type_names)

    def pin_memory(self) -> TaskBatch:
        """Called by `DataLoader(pin_memory=True)` so host-to-GPU copies can be asynchronous."""
        pinned = TaskBatch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})
        return pinned.with_types(None if self.task_type is None else self.task_type.pin_memory(), self.type_names)
