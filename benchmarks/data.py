"""Data pipeline speed: task batches per second from the DataModule, against what training eats.

Draws training meta-batches from `OmniglotDataModule` (real Omniglot, preloaded uint8 tensor,
episodes assembled by indexing) with 0 and 2 loader workers, and times a MAML training step on
the same batches (Conv4-64, second order, 1 inner step, the default backbone). The ratio says
how many times faster the pipeline produces batches than one training process consumes them.

    python benchmarks/data.py --threads 1 --ways 5 --tasks 32 --batches 50
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_meta.algorithms import MAML
from lightning_meta.data import OmniglotDataModule
from lightning_meta.models import Conv4


def batches_per_second(dm: OmniglotDataModule, batches: int) -> float:
    loader = dm.train_dataloader()
    iterator = iter(loader)
    next(iterator)  # worker start-up is paid once per run, not per batch
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches / (time.perf_counter() - start)


def training_steps_per_second(dm: OmniglotDataModule, ways: int, steps: int) -> float:
    model = MAML(Conv4(out_features=ways), inner_lr=0.4, inner_steps=1)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    iterator = iter(dm.train_dataloader())
    batch = next(iterator)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad()
        loss, _ = model.meta_loss(batch)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return 1 / statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--query-shots", type=int, default=15)
    parser.add_argument("--tasks", type=int, default=32, help="tasks per batch")
    parser.add_argument("--batches", type=int, default=50, help="batches timed per pipeline setting")
    parser.add_argument("--train-steps", type=int, default=3, help="training steps timed")
    parser.add_argument("--root", default=None, help="folder holding omniglot/ (default: $LIGHTNING_META_DATA)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    def datamodule(workers: int) -> OmniglotDataModule:
        dm = OmniglotDataModule(
            root=args.root,
            ways=args.ways,
            shots=args.shots,
            query_shots=args.query_shots,
            tasks_per_batch=args.tasks,
            batches_per_epoch=10**6,
            num_workers=workers,
        )
        dm.setup("fit")
        return dm

    print(
        f"torch {torch.__version__}, cpu, threads {args.threads}; Omniglot {args.ways}-way {args.shots}-shot, "
        f"{args.query_shots} queries/class, {args.tasks} tasks/batch"
    )
    train_rate = training_steps_per_second(datamodule(0), args.ways, args.train_steps)
    print(f"{'source':32s} {'batches/s':>10s} {'tasks/s':>10s} {'x training':>11s}")
    print(f"{'MAML training step (consumer)':32s} {train_rate:10.2f} {train_rate * args.tasks:10.1f} {1:11.1f}")
    for workers in (0, 2):
        rate = batches_per_second(datamodule(workers), args.batches)
        label = f"DataModule, {workers} workers"
        print(f"{label:32s} {rate:10.2f} {rate * args.tasks:10.1f} {rate / train_rate:11.1f}")


if __name__ == "__main__":
    main()
