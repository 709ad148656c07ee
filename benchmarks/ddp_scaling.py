"""DDP scaling on CPU: meta-training tasks per second with 1 process against 2 (gloo).

MAML (second order, 1 inner step) or ProtoNet on Conv4-64 at Omniglot 5-way 1-shot shapes with
synthetic images, through the real Trainer step. The global meta-batch is the same in every
layout (`--tasks` tasks per step, split evenly over the processes), so tasks/s compare directly.
Each process gets `cores ÷ processes` torch threads, as STACK.md advises; a 1-process run with
all the cores is included so the gain from DDP is told apart from the gain from threads.

Layouts run in fresh subprocesses, interleaved over `--repeats`; the table gives the median step
time of rank 0 (DDP steps are synchronous, so rank 0's is the job's), tasks/s in all and per
process, and the speed-up over 1 process with 1 thread.

    python benchmarks/ddp_scaling.py --tasks 16 --steps 5 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def worker(args: argparse.Namespace) -> None:
    import pytorch_lightning as pl
    import torch
    from bench_trainer import bare_trainer

    from lightning_meta.algorithms import MAML, ProtoNet
    from lightning_meta.data import EpisodicDataModule, TaskSource
    from lightning_meta.models import Conv4
    from lightning_meta.task import Task

    torch.set_num_threads(args.threads)
    ways, queries = 5, 15
    g = torch.Generator().manual_seed(0)
    pool = [
        Task(
            torch.rand(ways, 1, 28, 28, generator=g),
            torch.arange(ways),
            torch.rand(ways * queries, 1, 28, 28, generator=g),
            torch.arange(ways).repeat_interleave(queries),
        )
        for _ in range(8)
    ]

    class SyntheticTasks(TaskSource):
        def sample(self, rng) -> Task:
            return pool[int(rng.integers(len(pool)))]

    class SyntheticData(EpisodicDataModule):
        def build_sources(self) -> dict:
            return {"train": SyntheticTasks(), "val": SyntheticTasks(), "test": SyntheticTasks()}

    torch.manual_seed(0)
    if args.algorithm == "protonet":
        model = ProtoNet(Conv4())
    else:
        model = MAML(Conv4(out_features=ways), inner_lr=0.4, inner_steps=1)
        model.task_batching = "loop"  # the CPU's faster path for Conv4 (benchmarks/throughput.py)
    times: list[float] = []

    class Timer(pl.Callback):
        def on_train_batch_start(self, *_: object) -> None:
            self.start = time.perf_counter()

        def on_train_batch_end(self, *_: object) -> None:
            times.append(time.perf_counter() - self.start)

    trainer = bare_trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_steps=args.warmup + args.steps,
        callbacks=[Timer()],
    )
    per_rank = args.tasks // args.devices
    trainer.fit(model, datamodule=SyntheticData(tasks_per_batch=per_rank, batches_per_epoch=10**6))
    if trainer.global_rank == 0:
        print("RESULT " + json.dumps({"times": times[args.warmup :]}), flush=True)


LAYOUTS = {  # name: (processes, threads per process)
    "1 process × 1 thread": (1, 1),
    "1 process × {cores} threads": (1, None),
    "{cores} processes × 1 thread (DDP, gloo)": (None, 1),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithm", choices=["maml", "protonet"], default="maml")
    parser.add_argument("--tasks", type=int, default=16, help="global tasks per meta-batch")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.cores < 2:
        sys.exit("ddp_scaling.py needs at least 2 cores (--cores) to compare 1 process with 2")
    if args.tasks % args.cores:
        sys.exit(f"--tasks {args.tasks} does not split evenly over {args.cores} processes")
    layouts = {
        name.format(cores=args.cores): (procs or args.cores, threads or args.cores)
        for name, (procs, threads) in LAYOUTS.items()
    }
    medians: dict[str, list[float]] = {name: [] for name in layouts}
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for repeat in range(args.repeats):
        for name, (procs, threads) in layouts.items():  # interleaved: noise hits all alike
            cmd = [sys.executable, __file__, "--worker", "--algorithm", args.algorithm, "--tasks", str(args.tasks)]
            cmd += ["--devices", str(procs), "--threads", str(threads)]
            cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode or not lines:
                sys.exit(f"{name} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
            median = statistics.median(json.loads(lines[-1][len("RESULT ") :])["times"])
            medians[name].append(median)
            print(f"repeat {repeat + 1}/{args.repeats}  {name}: {median:.3f} s/step", file=sys.stderr, flush=True)

    import torch

    print(
        f"\nDDP scaling, {args.algorithm}, Conv4-64, Omniglot 5-way 1-shot shapes (15 queries/class), "
        f"{args.tasks} tasks per global meta-batch; torch {torch.__version__}, {args.cores} cores, CPU; "
        f"median of {args.repeats} interleaved runs × {args.steps} steps\n"
    )
    print("| layout | s/step | tasks/s | tasks/s per process | speed-up vs 1 process × 1 thread |")
    print("|---|---:|---:|---:|---:|")
    base = statistics.median(next(iter(medians.values())))
    for name, (procs, _) in layouts.items():
        step = statistics.median(medians[name])
        rate = args.tasks / step
        print(f"| {name} | {step:.3f} | {rate:.2f} | {rate / procs:.2f} | {base / step:.2f}× |")


if __name__ == "__main__":
    main()
