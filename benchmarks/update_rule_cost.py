"""What a learned update rule costs: ms per meta-step of MAML + `LearnedOptimizer` (or, with
`--learned MetaLSTM`, the Meta-Learner LSTM) against plain MAML (SGD) on the same 25 sinusoid
tasks (MLP 1-40-40-1, 5 inner steps, tasks in a loop: the learned rules are not vmapped), first
and second order, the two timed alternately in one process (min of `--repeats`), and each one's
peak memory over one meta-step in a fresh process (resident-set high-water mark above the start,
Linux).

    python benchmarks/update_rule_cost.py
    python benchmarks/update_rule_cost.py --learned MetaLSTM
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch

from lightning_meta.algorithms import MAML
from lightning_meta.algorithms.task_parallel import memory_mark, memory_peak
from lightning_meta.data import SinusoidDataModule
from lightning_meta.models import MLP
from lightning_meta.task import TaskBatch
from lightning_meta.update_rules import LearnedOptimizer, MetaLSTM

LEARNED = {"LearnedOptimizer": LearnedOptimizer, "MetaLSTM": MetaLSTM}


def build(rule: str, first_order: bool) -> MAML:
    torch.manual_seed(0)
    update_rule = LEARNED[rule]() if rule in LEARNED else None
    model = MAML(MLP(), inner_lr=0.01, inner_steps=5, first_order=first_order, update_rule=update_rule)
    return model.train()


def meta_step(model: MAML, batch: TaskBatch) -> None:
    model.zero_grad()
    model.meta_loss(batch, "loop")[0].backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--learned", choices=sorted(LEARNED), default="LearnedOptimizer", help="the learned rule")
    parser.add_argument("--memory-of", nargs=2, metavar=("RULE", "ORDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    rules = ("SGD", args.learned)
    torch.set_num_threads(1)
    batch = next(iter(SinusoidDataModule(tasks_per_batch=25).train_dataloader()))
    if args.memory_of:  # the child process: one meta-step from a fresh start
        model = build(args.memory_of[0], args.memory_of[1] == "first")
        start = memory_mark(torch.device("cpu"))
        meta_step(model, batch)
        print((memory_peak(torch.device("cpu")) - start) / 2**20)
        return
    print("| order | update rule | ms per meta-step | ratio to SGD | peak memory of one meta-step |")
    print("|---|---|---:|---:|---:|")
    for order in ("first", "second"):
        models = {rule: build(rule, order == "first") for rule in rules}
        for model in models.values():
            meta_step(model, batch)  # warm-up
        times: dict[str, list[float]] = {rule: [] for rule in rules}
        for _ in range(args.repeats):
            for rule, model in models.items():
                start = time.perf_counter()
                meta_step(model, batch)
                times[rule].append(time.perf_counter() - start)
        for rule in rules:
            child = [sys.executable, __file__, "--memory-of", rule, order]
            mib = float(subprocess.run(child, capture_output=True, text=True, check=True).stdout.split()[-1])
            ratio = min(times[rule]) / min(times["SGD"])
            print(f"| {order} | {rule} | {1000 * min(times[rule]):.0f} | {ratio:.1f}x | {mib:.1f} MiB |")


if __name__ == "__main__":
    main()
