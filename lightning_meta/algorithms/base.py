"""`MetaLearner`: the LightningModule every meta-algorithm derives from.

It owns what all algorithms share: running the tasks of a batch (a loop, or `torch.func.vmap`
where proven equal and faster: `task_parallel.py`), the meta-gradient accumulated chunk by
chunk so only one chunk's graph is alive at a time, logging (with
`batch_size` = number of tasks), the outer optimizer and scheduler (injected, so YAML chooses
them), and the evaluation protocol: every fixed validation/test task scored once, reported
as the mean over tasks ± the 95% confidence interval (the Student-t quantile with n − 1 degrees
of freedom times the standard error: 2.09 at Lake's 20 runs, 1.96 as n grows), gathered across
DDP ranks. A subclass implements one method, `task_loss`: adapt on the support set, return the
query loss and predictions.

Evaluation is transductive by default (BatchNorm on the batch statistics of the support set
and all queries, as in the MAML and Reptile papers); `eval_protocol = "per_example"` scores
each query independently of the others, for every algorithm (`models/norm.py`).
"""

from __future__ import annotations

import math
import random
from abc import abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import NamedTuple

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Timer
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_meta.algorithms import task_parallel
from lightning_meta.algorithms.predictor import Predictor
from lightning_meta.losses.inner import InnerLoss
from lightning_meta.models.norm import support_statistics
from lightning_meta.task import Params, Task, TaskBatch

PROTOCOLS = ("transductive", "per_example")
"""How queries are normalised: "transductive", BatchNorm on the statistics of the batch it is
given (the support set and all queries of the task, as the algorithm batches them);
"per_example", every query normalised with the support set's statistics alone, so no query's
prediction depends on another query (`lightning_meta.models.norm.support_statistics`)."""


class TaskOutput(NamedTuple):
    """What an algorithm returns for one task.

    Attributes:
        loss: the query loss after adaptation (a scalar, differentiable w.r.t. the
            meta-parameters during training).
        predictions: query logits (classification) or outputs (regression).
        loss_before: the query loss before adaptation, where the algorithm has one; reported
            at evaluation to show what adaptation gained.
    """

    loss: Tensor
    predictions: Tensor
    loss_before: Tensor | None = None


def supervised_loss(predictions: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy for integer class labels, mean squared error for float targets."""
    if torch.is_floating_point(targets):
        return F.mse_loss(predictions, targets)
    return F.cross_entropy(predictions, targets)


def check_inner_loop_args(inner_lr: float | None, inner_steps: int, eval_inner_steps: int | None) -> int:
    """Refuse a non-positive inner learning rate or step count, naming the config key; returns
    `eval_inner_steps` with its default (= `inner_steps`) filled in. `inner_lr=None` skips the
    rate check for algorithms whose rates are learned."""
    if inner_lr is not None and not inner_lr > 0:
        raise ValueError(f"model.init_args.inner_lr={inner_lr} must be > 0 (MAML uses 0.01-0.1 here)")
    eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
    for key, value in (("inner_steps", inner_steps), ("eval_inner_steps", eval_inner_steps)):
        if value < 1:
            raise ValueError(f"model.init_args.{key}={value} must be at least 1")
    return eval_inner_steps


def embedding_size(backbone: nn.Module, embedding_dim: int | None, needed_by: str, part: str) -> int:
    """`embedding_dim`, else the backbone's `embedding_size`; the error names the config key when
    neither is known. `needed_by` and `part` say which option needs it, for what."""
    size = embedding_dim if embedding_dim is not None else getattr(backbone, "embedding_size", None)
    if size is None:
        raise ValueError(
            f"{needed_by} needs the embedding size for its {part}: set model.init_args.embedding_dim "
            "(the backbone has no `embedding_size`)"
        )
    return size


def scores_by_class(scores: Tensor, support_y: Tensor, ways: int) -> Tensor:
    """`[Q, S]` query-to-support scores spread to `[Q, ways, S]`, −inf outside each class, so a
    reduction over the last axis (max, logsumexp) scores each class from its own examples."""
    in_class = F.one_hot(support_y, ways).bool().T  # [ways, S]
    return scores.unsqueeze(1).masked_fill(~in_class.unsqueeze(0), float("-inf"))


def _nan_poison(module: nn.Module) -> Tensor:
    """A scalar NaN whose gradient is NaN for every trainable parameter."""
    params = [p for p in module.parameters() if p.requires_grad]
    return sum(p.sum() for p in params) * float("nan")


def rng_states() -> dict:
    """The global random states a training step could draw from: torch (CPU and CUDA), numpy, random."""
    # Tensors and plain Python values only, so `torch.load(weights_only=True)` reads them.
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    states = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    """Restore what `rng_states` returned."""
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _student_t_two_sided(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer `df`: the finite series of Abramowitz & Stegun
    26.7.3-4, exact up to rounding (no scipy needed)."""
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 1:  # 2/π · (θ + sinθ cosθ · (1 + 2/3 cos²θ + 2·4/(3·5) cos⁴θ + ... up to cos^(df-3)θ))
        total, term = 0.0, 1.0
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        return 2 / math.pi * (theta + s * math.sqrt(c2) * total) if df > 1 else 2 * theta / math.pi
    total, term = 0.0, 1.0  # sinθ · (1 + 1/2 cos²θ + 1·3/(2·4) cos⁴θ + ... up to cos^(df-2)θ)
    for k in range(1, df // 2 + 1):
        total += term
        term *= c2 * (2 * k - 1) / (2 * k)
    return s * total


def _solve_increasing(f: Callable[[float], float], target: float) -> float:
    """The x >= 0 where the increasing `f` reaches `target` (f(0) <= target < sup f), by bisection
    to the last bit."""
    low, high = 0.0, 1.0
    while f(high) < target:
        low, high = high, 2 * high
    while (mid := (low + high) / 2) not in (low, high):
        low, high = (mid, high) if f(mid) < target else (low, mid)
    return mid


# Every quantile asked for is kept: bisection on the series takes ~1 ms at df = 600.
_T_QUANTILES: dict[tuple[float, int], float] = {}


def student_t_quantile(p: float, df: int) -> float:
    """The `p` quantile (0.5 < p < 1) of Student's t distribution with `df` degrees of freedom.

    Bisection on the exact CDF up to 1000 degrees of freedom; beyond, Fisher's expansion in 1/df
    around the normal quantile (error below 1e-12 there).
    """
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"student_t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    if (p, df) not in _T_QUANTILES:
        coverage = 2 * p - 1  # P(|T| <= t) at the quantile
        if df <= 1000:
            quantile = _solve_increasing(lambda t: _student_t_two_sided(t, df), coverage)
        else:
            z = _solve_increasing(lambda x: math.erf(x / math.sqrt(2)), coverage)  # the normal's
            g = [
                (z**3 + z) / 4,
                (5 * z**5 + 16 * z**3 + 3 * z) / 96,
                (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
                (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160,
            ]
            quantile = z + sum(gi / df ** (i + 1) for i, gi in enumerate(g))
        _T_QUANTILES[p, df] = quantile
    return _T_QUANTILES[p, df]


def mean_and_ci95(values: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and half-width of its 95% confidence interval: t · standard error, t the 0.975
    quantile of Student's t with n − 1 degrees of freedom (12.71 at n = 2, 2.09 at Lake's 20
    runs, 1.96 as n grows), so few tasks give an honest, wider interval."""
    n = values.numel()
    if n < 2:
        return values.mean(), torch.zeros((), dtype=values.dtype, device=values.device)
    return values.mean(), student_t_quantile(0.975, n - 1) * values.std(unbiased=True) / math.sqrt(n)


def refuse_inference_mode(module: pl.LightningModule, stage: str) -> None:
    """A learner that adapts with gradients cannot run under inference mode: say so and how to fix it."""
    if getattr(module, "adapts_with_gradients", False) and torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{type(module).__name__} adapts with gradients during {stage}, which inference mode "
            "forbids: use Trainer(inference_mode=False) (`--trainer.inference_mode=false`; the "
            "lightning-meta CLI sets it by default)"
        )


def gather_per_task(module: pl.LightningModule, values: Tensor) -> Tensor:
    """All ranks' per-task values `[n]`, concatenated in rank order. Ranks may hold different
    numbers of evaluation tasks (dealt round-robin), so each pads to the largest count with NaN
    for `all_gather` and the padding is dropped after."""
    if module.trainer.world_size == 1:
        return values
    counts = module.all_gather(torch.tensor([values.numel()], device=values.device)).flatten()
    padded = torch.full((int(counts.max()),), float("nan"), dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    gathered = module.all_gather(padded)
    return torch.cat([gathered[r, : int(n)] for r, n in enumerate(counts)])


class MetaLearner(pl.LightningModule):
    """Shared train/validation/test steps of a meta-learner over `TaskBatch`es.

    Args:
        backbone: the network (a plain `nn.Module`), chosen in YAML.
        optimizer: builds the outer (meta) optimizer from the parameters; default Adam(1e-3).
        lr_scheduler: builds an optional learning-rate scheduler; it steps every training
            step (every meta-batch), as meta-learning schedules count meta-iterations.
    """

    adapts_with_gradients: bool = True
    """Whether evaluation takes gradients (so needs `Trainer(inference_mode=False)`)."""

    uses_output_head: bool = False
    """Whether the backbone's output size must equal the number of ways (the CLI links them)."""

    supports_vmap: bool = False
    """Whether `task_loss` is a pure tensor function of the task (no data-dependent Python
    control flow, no `.item()`), so the tasks of a batch can be run under `torch.func.vmap`."""

    nonfinite: str = "raise"
    """What a non-finite meta-loss or meta-gradient does: "raise" stops training with a
    FloatingPointError before the step changes any weight; "skip" drops that optimizer step
    (counted in `skipped_steps`, logged as `train/skipped_steps`). Set it on the instance, or
    from the CLI with the `lightning_meta.callbacks.NonFinite` callback."""

    eval_protocol: str = "transductive"
    """Validation and test protocol, one of `PROTOCOLS` ("transductive" by default). Changes the
    numbers, not the weights: set it on the instance, or from the CLI (`--protocol.evaluation
    per_example`, the `lightning_meta.callbacks.EvaluationProtocol` callback)."""

    train_protocol: str = "transductive"
    """The same choice for meta-training (`--protocol.training`), to train a model as it will
    be evaluated."""

    compile_by_default: bool = False
    """Whether `compile_backbone="auto"` compiles this learner's backbone: only where a compiled
    step was measured faster (`benchmarks/throughput.py`) and proven to give the eager losses and
    meta-gradients (float64, `tests/test_compile.py`)."""

    def __init__(
        self,
        backbone: nn.Module,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        # A learner's update rule is a module: its weights are in the state_dict, its choice in the config.
        # So is its inner loss.
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler", "update_rule", "inner_loss"])
        self.backbone = backbone
        # The inner loop's support loss (`lightning_meta.losses.inner`; None: the task's own), set
        # by the learners that take one. An instance attribute, not a class one: a class
        # attribute would shadow the submodule nn.Module keeps in `_modules`.
        self.inner_loss: InnerLoss | None = None
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self._eval_outputs: list[dict[str, Tensor]] = []
        self._type_names: tuple[str, ...] | None = None
        self.task_batcher = task_parallel.TaskBatching()
        self._nonfinite_loss: float | None = None
        self._rng_to_restore: dict | None = None
        self.skipped_steps = 0

    def support_loss_fn(
        self, task: Task, predict_with: Callable[[Params, Tensor], Tensor], step: int | None = None
    ) -> Callable[[Params], Tensor]:
        """The support loss the inner loop descends, as a function of the parameters being adapted.

        `predict_with(params, x)` runs the network under `params`. Without an `inner_loss` this is
        the task's own loss on the support set, computed exactly as before inner losses existed.
        With one, it is called with the inner step: `step` if given (a learner that runs its own
        step loop, MAML++), else counted by the calls, as the inner loop evaluates the support loss
        once per step (`inner_loop.adapt`).
        """
        inner_loss = self.inner_loss
        if inner_loss is None:
            return lambda params: supervised_loss(predict_with(params, task.support_x), task.support_y)
        calls = [0]
        # The query labels never reach an inner loss (the query inputs may: unlabelled terms).
        unlabelled = Task(task.support_x, task.support_y, task.query_x, task.query_y[:0])

        def loss(params: Params) -> Tensor:
            k = calls[0] if step is None else step
            calls[0] += 1
            return inner_loss(params, unlabelled, lambda x: predict_with(params, x), k)

        return loss

    @abstractmethod
    def task_loss(self, task: Task) -> TaskOutput:
        """Adapt to `task`'s support set and score its query set (`self.training` tells the phase)."""

    def forward(self, batch: TaskBatch, batching: str = "loop") -> TaskOutput:
        """Every task's output, stacked: `loss` `[tasks]`, `predictions` `[tasks, ...]`."""
        run = task_parallel.run_vmap if batching == "vmap" else task_parallel.run_loop
        out = run(self._task_loss_under_protocol(), batch)
        return TaskOutput(out["loss"], out["predictions"], out.get("loss_before"))

    def meta_loss(self, batch: TaskBatch, batching: str = "loop") -> tuple[Tensor, dict[str, Tensor]]:
        """The meta-loss (mean query loss over tasks) and per-task statistics (`[tasks]` each)."""
        pop_choices = getattr(self.inner_loss, "pop_choices", None)
        if pop_choices is not None:
            pop_choices()  # choices of tasks run outside this call (e.g. `adapt_to`) are not this batch's
        out = self(batch, batching)
        stats = {"loss": out.loss.detach()}
        if batch.is_classification:
            stats["acc"] = (out.predictions.detach().argmax(-1) == batch.query_y).float().mean(-1)
        if out.loss_before is not None:
            stats["loss_before"] = out.loss_before.detach()
        choices = pop_choices() if pop_choices is not None else None
        if choices is not None and len(choices) == len(out.loss):
            # The share of tasks whose inner loss was each candidate (a loss selector's choices).
            for i, name in enumerate(self.inner_loss.candidates):
                stats[f"choice/{name}"] = (choices == i).to(out.loss.dtype)
        return out.loss.mean(), stats

    def _check_vmap(self) -> str | None:
        if not self.supports_vmap:
            return f"{type(self).__name__}.task_loss is not written to be vmapped (supports_vmap = False)"
        return task_parallel.vmap_blocker(self)

    @property
    def task_batching(self) -> str:
        """How the tasks of a batch run: "loop", "vmap", or "auto" (the default): vmap when
        `supports_vmap`, every layer of the model is proven equal to the loop under vmap, and vmap
        timed faster on the first training steps; else loop. A performance setting (results are
        the same): set it on the instance, or from the CLI with the
        `lightning_meta.callbacks.TaskBatching` callback. Held, with the auto mode's timings and
        choice, by `task_batcher` (`task_parallel.TaskBatching`)."""
        return self.task_batcher.mode

    @task_batching.setter
    def task_batching(self, mode: str) -> None:
        self.task_batcher.mode = mode

    @property
    def task_chunk_size(self) -> int | None:
        """Tasks whose graphs are alive at once while the meta-gradient accumulates. None (the
        default): 1 for the loop; for vmap, as many as fit in `task_parallel.MEMORY_FRACTION` of
        the free memory (80% of free device memory on CUDA, 50% of the host's MemAvailable on
        CPU), from the peak measured on the first vmapped step, which runs whole; all the tasks
        where memory cannot be measured. Set it to trade speed for memory: peak memory grows
        about linearly with it."""
        return self.task_batcher.chunk_size

    @task_chunk_size.setter
    def task_chunk_size(self, size: int | None) -> None:
        self.task_batcher.chunk_size = size

    @property
    def compile_backbone(self) -> str | bool:
        """Whether the loop path runs the backbone through `torch.compile`: True, False, or "auto"
        (the default): `compile_by_default`, on a CPU, for the training steps of fits of at least
        `task_parallel.COMPILE_AUTO_MIN_STEPS` steps and, under a `max_time`, at least
        `task_parallel.COMPILE_AUTO_MIN_SECONDS` (evaluation stays eager: its other shapes and
        grad mode would recompile the backbone, for few steps). A performance setting (results are the same
        up to floating-point rounding); second-order inner gradients run their support forward
        eagerly (`inner_loop.compiled_backbone`). Set it on the instance, or from the CLI with the
        `lightning_meta.callbacks.TaskBatching` callback (`compile`)."""
        return self.task_batcher.compile

    @compile_backbone.setter
    def compile_backbone(self, value: str | bool) -> None:
        self.task_batcher.compile = value

    def _compiled(self, path: str, training: bool = True) -> AbstractContextManager[bool]:
        """The backbone compiled or eager for a step on `path` (`TaskBatching.compiled`); "auto"
        leaves evaluation steps (`training=False`) eager."""
        owner = type(self).__name__
        by_default = self.compile_by_default
        planned = self._planned_steps if training else _no_fit
        return self.task_batcher.compiled(self.backbone, path, by_default, planned, self.device, owner)

    def _planned_steps(self) -> float | None:
        """Training steps of the fit in progress, once its training data is loaded (the sanity
        check runs before); None outside `Trainer.fit`; 0 when a `max_time` shorter than
        `task_parallel.COMPILE_AUTO_MIN_SECONDS` bounds the fit (its steps are not known ahead,
        and too few to pay a compilation back)."""
        if self._trainer is None or self.trainer.state.fn != "fit" or self.trainer.train_dataloader is None:
            return None
        # The whole limit (elapsed + remaining), so that the choice does not flip late in a fit.
        limits = [
            t.time_elapsed() + remaining
            for t in self.trainer.callbacks
            if isinstance(t, Timer) and (remaining := t.time_remaining()) is not None
        ]
        if min(limits, default=math.inf) < task_parallel.COMPILE_AUTO_MIN_SECONDS:
            return 0.0
        return self.trainer.estimated_stepping_batches

    def _broadcast(self, value: str) -> str:
        """Rank 0's `value` on every rank (itself outside DDP)."""
        if self._trainer is not None and self.trainer.world_size > 1:
            return self.trainer.strategy.broadcast(value, src=0)
        return value

    def _grad_scaler(self) -> torch.amp.GradScaler | None:
        """The trainer's active loss scaler (`precision="16-mixed"`), if any."""
        scaler = getattr(self._trainer.precision_plugin, "scaler", None) if self._trainer is not None else None
        return scaler if scaler is not None and scaler.is_enabled() else None

    def training_step(self, batch: TaskBatch, batch_idx: int) -> Tensor:
        scaler = self._grad_scaler()
        # The scale Lightning will multiply the returned loss by, for the chunks' own backwards.
        loss_scale = scaler.scale(torch.ones((), device=self.device)) if scaler is not None else None
        params = [p for p in self.parameters() if p.requires_grad]
        owner = type(self).__name__
        with (
            self.task_batcher.step(len(batch), self.device, self._check_vmap, self._broadcast, owner) as plan,
            self._compiled(plan.path),
        ):
            loss, stats, objective = task_parallel.meta_objective(self.meta_loss, batch, plan, params, loss_scale)
        if not torch.isfinite(loss):
            # Under DDP the decision must be the same on every rank, so it is taken on the
            # all-reduced gradient (`on_before_optimizer_step`), identical on all ranks. A NaN
            # in every gradient entry makes this rank's non-finite loss reach that gradient
            # whatever the graph: NaN survives the sum over ranks.
            self._nonfinite_loss = float(loss.detach())
            objective = objective + _nan_poison(self)
        for key, value in stats.items():
            self.log(f"train/{key}", value.mean(), prog_bar=key in ("loss", "acc"), batch_size=len(batch))
        return objective

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Stop, or skip the step, when the meta-gradient is not finite (see `nonfinite`); under a
        float16 loss scaler, an overflow with a finite meta-loss is left to the scaler.

        One host sync per step (`bool()` of a flag): measured on CPU at 0.08 ms for the sinusoid
        MLP (a MAML step of 25 tasks takes ~90 ms) and 0.9 ms for Conv4-64; on a GPU the sync
        waits for the backward to finish, which the optimizer step would wait for anyway.
        """
        local_loss, self._nonfinite_loss = self._nonfinite_loss, None
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        # The largest |entry| of each gradient is finite exactly when all its entries are (NaN
        # propagates through the max); one fused kernel over all tensors where foreach has one.
        finite = not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads, float("inf")))).all())
        if finite:
            return
        if self._grad_scaler() is not None and not self.trainer.strategy.reduce_boolean_decision(
            local_loss is not None, all=False
        ):
            # float16 with a loss scaler, every rank's meta-loss finite: the scaled gradient ran
            # past float16's range, which GradScaler expects while it searches its scale. It skips
            # this step itself and lowers the scale. (Every rank gets here together: the gradient
            # is all-reduced, so the collective above is safe.)
            return
        if local_loss is not None:
            what = f"meta-loss is {local_loss}"
        else:
            what = "meta-gradient is not finite (NaN or inf; on this rank the meta-loss was finite)"
        where = f"{type(self).__name__}: {what} at global step {self.global_step}"
        if self.nonfinite == "raise":
            raise FloatingPointError(
                f"{where}; the usual cause is an inner or outer learning rate too high: lower "
                f"{self._lr_keys()}. Training stopped before this step changed any weight, so the "
                "last checkpoint holds the weights before it (resume with --ckpt_path). To skip such "
                "steps instead, add the callback lightning_meta.callbacks.NonFinite with action: skip"
            )
        # Skip: with no gradients the optimizer leaves every parameter and its own state alone.
        for p in self.parameters():
            p.grad = None
        self.skipped_steps += 1
        pl.utilities.rank_zero_warn(f"{where}: skipped this optimizer step ({self.skipped_steps} skipped so far)")
        self.log("train/skipped_steps", float(self.skipped_steps), rank_zero_only=True)

    def _lr_keys(self) -> str:
        keys = "model.init_args.inner_lr or " if "inner_lr" in self.hparams else ""
        return keys + "the outer rate model.init_args.optimizer.init_args.lr"

    def _task_loss_under_protocol(self) -> Callable[[Task], TaskOutput]:
        """`task_loss`, run under this phase's protocol (`eval_protocol` or `train_protocol`)."""
        key, protocol = ("training", self.train_protocol) if self.training else ("evaluation", self.eval_protocol)
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol.{key}={protocol!r} is not one of {PROTOCOLS}")
        task_loss = self.task_loss
        if protocol == "per_example":

            def task_loss(task: Task) -> TaskOutput:
                with support_statistics(self, self.backbone, task.support_x):
                    return self.task_loss(task)

        after_task = getattr(self.inner_loss, "after_task", None)
        if after_task is None:
            return task_loss

        # A loss selector learns from each task's query loss (its reward); what it returns (a
        # REINFORCE surrogate: zero in value) joins that task's loss.
        def with_feedback(task: Task) -> TaskOutput:
            out = task_loss(task)
            extra = after_task(out.loss, self.training)
            return out if extra is None else out._replace(loss=out.loss + extra)

        return with_feedback

    def _eval_step(self, batch: TaskBatch, stage: str) -> None:
        refuse_inference_mode(self, stage)
        plan = self.task_batcher.eval_plan(len(batch))
        with self._compiled(plan.path, training=False):
            for chunk in task_parallel.split(batch, plan.chunk_size):
                _, stats = self.meta_loss(chunk, plan.path)
                if chunk.task_type is not None:
                    # Each task's type (clean / corrupted), for the per-type logs of the epoch's end.
                    stats["task_type"] = chunk.task_type.to(stats["loss"].dtype)
                    self._type_names = chunk.type_names
                self._eval_outputs.append(stats)

    def validation_step(self, batch: TaskBatch, batch_idx: int) -> None:
        self._eval_step(batch, "validation")

    def test_step(self, batch: TaskBatch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def adapt_to(self, support_x: Tensor, support_y: Tensor) -> Predictor:
        """Adapt to a support set of one's own and return a predictor for queries without labels
        (`lightning_meta.algorithms.predictor`): `predictor(query_x)` gives what evaluation gives
        on the same task, `predictor.probabilities(query_x)` class probabilities. Usable outside
        any Trainer; runs in eval mode under `eval_protocol`.

        Args:
            support_x: support inputs `[S, ...]`, as the training tasks' (dtype, device, size).
            support_y: class indices 0..ways-1 `[S]` (each class with an example), or regression
                targets.
        """
        raise NotImplementedError(f"{type(self).__name__} has no adapt_to yet")

    def predict_step(self, batch: TaskBatch, batch_idx: int) -> Tensor:
        """Each task's query predictions `[tasks, Q, ...]`, adapted on its support set (`adapt_to`);
        the batch's `query_y` is not read."""
        refuse_inference_mode(self, "predict")
        return torch.stack([self.adapt_to(task.support_x, task.support_y)(task.query_x) for task in batch])

    def _eval_epoch_end(self, stage: str) -> None:
        outputs, self._eval_outputs = self._eval_outputs, []
        if not outputs:
            return
        gathered = {key: gather_per_task(self, torch.cat([o[key] for o in outputs])) for key in outputs[0]}
        task_type = gathered.pop("task_type", None)
        for key, values in gathered.items():
            mean, ci95 = mean_and_ci95(values)
            # Values are already gathered from every rank, so every rank logs the same number.
            self.log(f"{stage}/{key}", mean, prog_bar=key in ("loss", "acc"))
            self.log(f"{stage}/{key}_ci95", ci95)
            if key == "acc" and getattr(self.trainer.datamodule, "reports_error", False):
                # Benchmarks quoted as error rates (Lake's one-shot runs): percent misclassified.
                self.log(f"{stage}/error", 100 * (1 - mean))
                self.log(f"{stage}/error_ci95", 100 * ci95)
        if task_type is not None:
            self._log_per_type(stage, gathered, task_type)
        self.log(f"{stage}/tasks", float(values.numel()))
        # Which protocol these numbers used, beside them in every log and results table.
        self.log(f"{stage}/per_example", float(self.eval_protocol == "per_example"))

    def _log_per_type(self, stage: str, gathered: dict[str, Tensor], task_type: Tensor) -> None:
        """Per task type (the family's `task_types`, e.g. clean / corrupted): the loss and accuracy as
        `<stage>/loss/<type>`, and a loss selector's choices as `<stage>/choice/<type>/<candidate>`,
        the share of that type's tasks that chose the candidate (a histogram per evaluation)."""
        names = self._type_names or ()
        for index, name in enumerate(names):
            mask = task_type == index
            if not mask.any():
                continue
            for key, values in gathered.items():
                if key.startswith("choice/"):
                    self.log(f"{stage}/choice/{name}/{key.removeprefix('choice/')}", values[mask].mean())
                elif key in ("loss", "acc"):
                    self.log(f"{stage}/{key}/{name}", values[mask].mean())
            self.log(f"{stage}/tasks/{name}", mask.sum().to(gathered["loss"].dtype))

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # What Lightning does not save and an exactly resumed run needs: the global random
        # states (this rank's; tasks are drawn from their own seeded generators, not from
        # these), the task-batching path chosen (loop and vmap round differently), and the
        # count of skipped steps.
        checkpoint["lightning_meta"] = {
            "rng": rng_states(),
            **self.task_batcher.state_dict(),  # chosen_batching, batching_times
            "skipped_steps": self.skipped_steps,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("lightning_meta")
        if state is None:  # a checkpoint from before these were saved
            return
        self.task_batcher.load_state_dict(state)
        self.skipped_steps = state["skipped_steps"]
        self._rng_to_restore = state["rng"]

    def on_train_start(self) -> None:
        # After the sanity-check validation, which the uninterrupted run ran before training too.
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    def configure_optimizers(self):  # noqa: ANN201 - Lightning's union of return types
        key = "model.init_args.optimizer.init_args.lr"
        try:
            optimizer = self.optimizer(self.parameters())
        except ValueError as e:  # torch's own "Invalid learning rate: -0.001" names no config key
            raise ValueError(f"{type(self).__name__}'s outer optimizer: {e}; check {key} (> 0)") from e
        for group in optimizer.param_groups:
            lr = group.get("lr")
            if isinstance(lr, (int, float)) and not lr > 0:
                raise ValueError(
                    f"{key}={lr}: the outer learning rate must be > 0, or training changes nothing (Adam's usual 1e-3)"
                )
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _no_fit() -> None:
    """`planned_steps` for steps that "auto" never compiles (evaluation)."""
    return None
