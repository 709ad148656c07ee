"""lightning-meta: meta-learning algorithms as PyTorch Lightning modules."""

from lightning_meta.task import Params, Task, TaskBatch

__all__ = ["Params", "Task", "TaskBatch"]
__version__ = "0.1.0"
