"""What MeTAL's task-adaptive inner loss costs: ms per meta-step of MAML + `MeTALLoss` against
plain MAML at the Omniglot configs' shapes (Conv4, 64 channels, 28x28 inputs, 5-way, 15 queries
per class, second order, 1 inner step, `--tasks` tasks in a loop), on random inputs of those
shapes (the cost does not depend on the pixels). The two are timed alternately in one process,
one thread; the table gives the minimum and the median of `--repeats` meta-steps each.

    python benchmarks/metal_cost.py                 # 5-way 1-shot
    python benchmarks/metal_cost.py --shots 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_meta.algorithms import MAML
from lightning_meta.losses import MeTALLoss
from lightning_meta.models import Conv4
from lightning_meta.task import TaskBatch

WAYS = 5


def build(metal: bool) -> MAML:
    torch.manual_seed(0)
    backbone = Conv4(in_channels=1, hidden_channels=64, out_features=WAYS, downsample="max_pool")
    inner_loss = MeTALLoss(ways=WAYS, parameter_tensors=18, steps=1) if metal else None
    return MAML(backbone, inner_lr=0.1, inner_steps=1, inner_loss=inner_loss).train()


def episodes(tasks: int, shots: int, queries: int) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    support_y = torch.arange(WAYS).repeat_interleave(shots).repeat(tasks, 1)
    query_y = torch.arange(WAYS).repeat_interleave(queries).repeat(tasks, 1)
    support_x = torch.randn(tasks, WAYS * shots, 1, 28, 28, generator=g)
    return TaskBatch(support_x, support_y, torch.randn(tasks, WAYS * queries, 1, 28, 28, generator=g), query_y)


def meta_step(model: MAML, batch: TaskBatch) -> None:
    model.zero_grad()
    model.meta_loss(batch, "loop")[0].backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=32, help="tasks per meta-batch (the configs': 32)")
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    batch = episodes(args.tasks, args.shots, args.queries)
    models = {"MAML": build(False), "MAML + MeTAL": build(True)}
    for model in models.values():
        meta_step(model, batch)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            start = time.perf_counter()
            meta_step(model, batch)
            times[name].append(time.perf_counter() - start)
    extra = sum(p.numel() for p in models["MAML + MeTAL"].inner_loss.parameters())
    print(
        f"5-way {args.shots}-shot, {args.queries} queries per class, {args.tasks} tasks, second order, 1 inner step, "
        f"{args.repeats} meta-steps each, 1 thread; MeTAL adds {extra} parameters"
    )
    print("| method | ms per meta-step (min) | median | ratio to MAML (min) |")
    print("|---|---:|---:|---:|")
    for name in models:
        ratio = min(times[name]) / min(times["MAML"])
        print(
            f"| {name} | {1000 * min(times[name]):.0f} | {1000 * statistics.median(times[name]):.0f} | {ratio:.2f}x |"
        )


if __name__ == "__main__":
    main()
