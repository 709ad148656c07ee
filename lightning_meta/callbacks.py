"""Callbacks that carry performance settings from the trainer config to the algorithm.

How tasks are batched, and whether the backbone is compiled, are performance choices with no
effect on results (like precision or strategy), so they are set with the trainer, not in the
algorithm's hyperparameters:

    trainer:
      callbacks:
        - class_path: lightning_meta.callbacks.TaskBatching
          init_args: {mode: vmap, chunk_size: 8}
        # or: init_args: {compile: true}
"""

from __future__ import annotations

import time
from typing import Literal

import pytorch_lightning as pl

from lightning_meta.algorithms.base import PROTOCOLS, MetaLearner
from lightning_meta.algorithms.rl_base import MetaRLLearner
from lightning_meta.algorithms.task_parallel import MODES


class TaskBatching(pl.Callback):
    """Run the tasks of each meta-batch in a loop, under vmap, or let the learner choose; and
    run the backbone compiled or eagerly.

    Args:
        mode: "auto" (vmap where proven equal to the loop and timed faster), "loop" or "vmap".
        chunk_size: tasks whose graphs are alive at once while the meta-gradient accumulates
            (None: the learner's default, see `MetaLearner.task_chunk_size`).
        compile: run the backbone through `torch.compile` on the loop path: true, false, or
            "auto" (where the algorithm was measured faster compiled and proven equal, on a CPU,
            in fits of at least 1000 steps: `MetaLearner.compile_backbone`).
    """

    def __init__(
        self, mode: str = "auto", chunk_size: int | None = None, compile: bool | Literal["auto"] = "auto"
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"TaskBatching mode={mode!r} is not one of {MODES}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"TaskBatching chunk_size={chunk_size} must be >= 1")
        if not (isinstance(compile, bool) or compile == "auto"):
            raise ValueError(f"TaskBatching compile={compile!r} is not one of true, false, 'auto'")
        self.mode, self.chunk_size, self.compile = mode, chunk_size, compile

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, MetaLearner):
            raise TypeError(f"TaskBatching works with MetaLearner modules, not {type(pl_module).__name__}")
        pl_module.task_batching, pl_module.task_chunk_size = self.mode, self.chunk_size
        pl_module.compile_backbone = self.compile
        # Refuse now, not at the first training step after a sanity check.
        if self.mode == "vmap" and (reason := pl_module._check_vmap()):
            raise ValueError(f"TaskBatching mode='vmap' cannot be used: {reason}; use mode 'loop' or 'auto'")


class NonFinite(pl.Callback):
    """What a non-finite (NaN or inf) meta-loss or meta-gradient does to training.

    By default (without this callback) training stops with a FloatingPointError naming the
    step, the algorithm and the learning rates to lower, before that step changes any weight,
    so the last checkpoint holds good weights. `action: skip` drops such optimizer steps
    instead, counts them (`train/skipped_steps`) and warns for each. Under DDP the decision is
    taken on the all-reduced meta-gradient, the same on every rank, so all ranks skip (or stop)
    together.

    Args:
        action: "raise" or "skip".
    """

    ACTIONS = ("raise", "skip")

    def __init__(self, action: str = "raise") -> None:
        if action not in self.ACTIONS:
            raise ValueError(f"NonFinite action={action!r} is not one of {self.ACTIONS}")
        self.action = action

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, MetaLearner):
            raise TypeError(f"NonFinite works with MetaLearner modules, not {type(pl_module).__name__}")
        pl_module.nonfinite = self.action


class EvaluationProtocol(pl.Callback):
    """Transductive or per-example BatchNorm statistics, for evaluation and for training.

    "transductive" (the default, and the MAML, Reptile and Relation Networks papers' protocol):
    BatchNorm normalises with the statistics of the whole batch the algorithm forms, the
    support set and every query of the task, so a query's prediction depends on the other
    queries. "per_example": every query is normalised with the support set's statistics alone
    (`lightning_meta.models.norm.support_statistics`), as a model that is shown one query at a
    time would be; adaptation on the support set is unchanged. The lightning-meta CLI always
    has this callback, as `--protocol.evaluation` / `--protocol.training` (YAML: `protocol:`).

    Checkpoints record both settings; resuming training under another training protocol warns.

    Args:
        evaluation: the validation and test protocol.
        training: the meta-training protocol (train as you evaluate: set both alike).
    """

    def __init__(
        self,
        evaluation: Literal["transductive", "per_example"] = "transductive",
        training: Literal["transductive", "per_example"] = "transductive",
    ) -> None:
        for key, value in (("evaluation", evaluation), ("training", training)):
            if value not in PROTOCOLS:
                raise ValueError(f"protocol.{key}={value!r} is not one of {PROTOCOLS}")
        self.evaluation, self.training = evaluation, training
        self._trained_with: str | None = None  # the training protocol of a checkpoint resumed from

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if isinstance(pl_module, MetaRLLearner):
            return  # no BatchNorm over support and query sets: the CLI's default callback is a no-op
        if not isinstance(pl_module, MetaLearner):
            raise TypeError(f"EvaluationProtocol works with MetaLearner modules, not {type(pl_module).__name__}")
        pl_module.eval_protocol, pl_module.train_protocol = self.evaluation, self.training

    def state_dict(self) -> dict[str, str]:
        return {"evaluation": self.evaluation, "training": self.training}

    def load_state_dict(self, state_dict: dict[str, str]) -> None:
        # Evaluating a checkpoint under either protocol is legitimate; changing how it is trained
        # half-way is worth a word.
        self._trained_with = state_dict.get("training")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._trained_with is not None and self._trained_with != self.training:
            pl.utilities.rank_zero_warn(
                f"resuming a checkpoint trained with protocol.training={self._trained_with!r} under "
                f"protocol.training={self.training!r}"
            )


class CPUTimeBudget(pl.Callback):
    """Stops training once this process has used `cpu_seconds` of CPU time since the callback was
    built: a budget that, unlike `trainer.max_time`, does not count the time other jobs on a
    shared machine take (the benchmarks' budgets). `cpu_used()` and `wall_used()` say how much.

    Args:
        cpu_seconds: the budget, in CPU seconds of this process (all its threads).
    """

    def __init__(self, cpu_seconds: float) -> None:
        if cpu_seconds < 0:
            raise ValueError(f"CPUTimeBudget cpu_seconds={cpu_seconds} must be >= 0")
        self.cpu_seconds = cpu_seconds
        self.cpu_start, self.start = time.process_time(), time.perf_counter()

    def cpu_used(self) -> float:
        return time.process_time() - self.cpu_start

    def wall_used(self) -> float:
        return time.perf_counter() - self.start

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if self.cpu_used() >= self.cpu_seconds:
            trainer.should_stop = True
