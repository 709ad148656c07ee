"""What each inner-loop component costs, in one run: ms per meta-step of MAML with each update
rule and each inner loss against plain MAML (SGD on the task's own MSE), all on the same 25
sinusoid tasks (MLP 1-40-40-1, K = 10, 5 inner steps, tasks in a loop: the learned rules and the
selectors are not vmapped), timed round-robin in one process on one thread (min and median of
`--repeats`), and each one's peak memory over one meta-step in a fresh process (resident-set
high-water mark above the start, Linux). MeTAL is a classification loss: its cost at the Omniglot
shapes is `benchmarks/metal_cost.py`. (It replaces `update_rule_cost.py`, which timed one learned
rule against SGD: `--components LearnedOptimizer`.)

    python benchmarks/component_cost.py                 # second order (MAML's default)
    python benchmarks/component_cost.py --first-order
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from lightning_meta.algorithms import MAML
from lightning_meta.algorithms.task_parallel import memory_mark, memory_peak
from lightning_meta.data import SinusoidDataModule
from lightning_meta.losses import BanditLoss, MixtureLoss, ML3Loss, PolicyLoss
from lightning_meta.models import MLP
from lightning_meta.task import TaskBatch
from lightning_meta.update_rules import LearnedOptimizer, MetaLSTM

# name: (what it is, builds (update_rule, inner_loss))
COMPONENTS: dict[str, tuple[str, Callable[[], tuple[nn.Module | None, nn.Module | None]]]] = {
    "MAML": ("update rule + loss", lambda: (None, None)),
    "LearnedOptimizer": ("update rule", lambda: (LearnedOptimizer(), None)),
    "MetaLSTM": ("update rule", lambda: (MetaLSTM(), None)),
    "ML3Loss": ("inner loss", lambda: (None, ML3Loss())),
    "MixtureLoss": ("loss selection", lambda: (None, MixtureLoss())),
    "PolicyLoss": ("loss selection", lambda: (None, PolicyLoss())),
    "BanditLoss": ("loss selection", lambda: (None, BanditLoss())),
    "MixtureLoss, 3 lr_scales": ("loss × step-size selection", lambda: (None, MixtureLoss(lr_scales=[0.3, 1.0, 3.0]))),
}


def build(name: str, first_order: bool) -> MAML:
    torch.manual_seed(0)
    update_rule, inner_loss = COMPONENTS[name][1]()
    model = MAML(
        MLP(), inner_lr=0.01, inner_steps=5, first_order=first_order, update_rule=update_rule, inner_loss=inner_loss
    )
    return model.train()


def meta_step(model: MAML, batch: TaskBatch) -> None:
    model.zero_grad()
    model.meta_loss(batch, "loop")[0].backward()
    pop_choices = getattr(model.inner_loss, "pop_choices", None)
    if pop_choices is not None:
        pop_choices()  # as the training step does: the choices of this batch are logged and dropped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--first-order", action="store_true")
    parser.add_argument("--components", nargs="+", choices=list(COMPONENTS), default=list(COMPONENTS))
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    batch = next(iter(SinusoidDataModule(tasks_per_batch=25).train_dataloader()))
    if args.memory_of:  # the child process: one meta-step from a fresh start
        model = build(args.memory_of, args.first_order)
        start = memory_mark(torch.device("cpu"))
        meta_step(model, batch)
        print((memory_peak(torch.device("cpu")) - start) / 2**20)
        return
    names = ["MAML", *[n for n in args.components if n != "MAML"]]
    models = {name: build(name, args.first_order) for name in names}
    for model in models.values():
        meta_step(model, batch)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.repeats):
        for name, model in models.items():
            start = time.perf_counter()
            meta_step(model, batch)
            times[name].append(time.perf_counter() - start)
    order = "first" if args.first_order else "second"
    print(
        f"25 sinusoid tasks, K=10, MLP 1-40-40-1, 5 inner steps, {order} order, tasks in a loop, "
        f"{args.repeats} round-robin meta-steps each, 1 thread"
    )
    print("| component | kind | own parameters | ms per meta-step (min) | median | ratio to MAML (min) | peak memory |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in names:
        child = [sys.executable, __file__, "--memory-of", name] + (["--first-order"] if args.first_order else [])
        mib = float(subprocess.run(child, capture_output=True, text=True, check=True).stdout.split()[-1])
        model = models[name]
        own = sum(p.numel() for m in (model.update_rule, model.inner_loss) if m is not None for p in m.parameters())
        ratio = min(times[name]) / min(times["MAML"])
        print(
            f"| {name} | {COMPONENTS[name][0]} | {own} | {1000 * min(times[name]):.0f} | "
            f"{1000 * statistics.median(times[name]):.0f} | {ratio:.2f}x | {mib:.1f} MiB |"
        )


if __name__ == "__main__":
    main()
