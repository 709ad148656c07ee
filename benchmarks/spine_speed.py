"""Meta-training speed through the real Trainer step: tasks per second for MAML and ProtoNet.

Omniglot 5-way 1-shot shapes (15 queries per class), Conv4-64 with BatchNorm, CPU or GPU.
The algorithms are interleaved (ABAB...) so machine noise hits both alike; the table reports
the median step time over the timed steps and tasks/s = tasks per step / median step time.

    python benchmarks/spine_speed.py --threads 1 --steps 20 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import pytorch_lightning as pl
import torch
from bench_trainer import bare_trainer

from lightning_meta.algorithms import MAML, ProtoNet
from lightning_meta.data import OmniglotDataModule
from lightning_meta.models import Conv4


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.start)


def setups(root: str | None) -> dict:
    return {
        "MAML 2nd order, 1 step, 32 tasks": (
            lambda: MAML(Conv4(out_features=5), inner_lr=0.4, inner_steps=1),
            lambda: OmniglotDataModule(root=root, ways=5, shots=1, query_shots=15, tasks_per_batch=32),
            32,
        ),
        "FOMAML, 1 step, 32 tasks": (
            lambda: MAML(Conv4(out_features=5), inner_lr=0.4, inner_steps=1, first_order=True),
            lambda: OmniglotDataModule(root=root, ways=5, shots=1, query_shots=15, tasks_per_batch=32),
            32,
        ),
        "ProtoNet, 32 tasks": (
            lambda: ProtoNet(Conv4()),
            lambda: OmniglotDataModule(root=root, ways=5, shots=1, query_shots=15, tasks_per_batch=32),
            32,
        ),
    }


def time_once(make_model, make_data, steps: int, warmup: int) -> list[float]:
    timer = StepTimer()
    trainer = bare_trainer(
        max_steps=steps + warmup,
        callbacks=[timer],
    )
    trainer.fit(make_model(), datamodule=make_data())
    return timer.times[warmup:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--root", default=None, help="folder holding omniglot/ (default: $LIGHTNING_META_DATA)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"{args.steps} timed steps x {args.repeats} repeats (interleaved)"
    )
    runs = setups(args.root)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(args.repeats):
        for name, (make_model, make_data, _) in runs.items():
            times[name] += time_once(make_model, make_data, args.steps, args.warmup)
            print(f"  repeat {repeat}: {name}: median {1000 * statistics.median(times[name]):.0f} ms", flush=True)
    print(f"{'setting':40s} {'median step (ms)':>17s} {'tasks/s':>9s}")
    for name, (_, _, tasks) in runs.items():
        median = statistics.median(times[name])
        print(f"{name:40s} {1000 * median:17.1f} {tasks / median:9.1f}")


if __name__ == "__main__":
    main()
