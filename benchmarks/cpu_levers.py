"""What closes the gap to the hardware on CPU: threads, channels-last, torch.compile.

One MAML meta-training step (per-task functional loop, `torch.autograd.grad`, the outer Adam
step) on Conv4-64 at Omniglot 5-way 1-shot shapes (15 queries per class), synthetic images,
second order and first order, with each lever on its own against the plain step:

  plain           1 thread, NCHW, eager
  threads=N       N torch threads (intra-op)
  channels-last   model and images in torch.channels_last
  compile         the backbone's forward through torch.compile (inductor); second order needs
                  double backward through the compiled graph, which AOTAutograd may refuse:
                  the row then says why

Variants run in one process, interleaved over repeats; the table gives the median step time and
the ratio to `plain` measured in the same repeats.

    python benchmarks/cpu_levers.py --tasks 8 --steps 3 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_meta.models import Conv4


def make_step(variant: str, first_order: bool, tasks: int, ways: int = 5, queries: int = 15) -> Callable[[], None]:
    torch.manual_seed(0)
    model = Conv4(out_features=ways)
    g = torch.Generator().manual_seed(0)
    sx = torch.rand(tasks, ways, 1, 28, 28, generator=g)
    qx = torch.rand(tasks, ways * queries, 1, 28, 28, generator=g)
    sy = torch.arange(ways)
    qy = torch.arange(ways).repeat_interleave(queries)
    if variant == "channels-last":
        model = model.to(memory_format=torch.channels_last)
        sx = [x.contiguous(memory_format=torch.channels_last) for x in sx]  # per task: NCHW is 4-d
        qx = [x.contiguous(memory_format=torch.channels_last) for x in qx]
    params = dict(model.named_parameters())
    opt = torch.optim.Adam(params.values(), 1e-3)

    def run(p: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p, (x,))

    forward = torch.compile(run, dynamic=False) if variant == "compile" else run

    def step() -> None:
        opt.zero_grad()
        for t in range(tasks):
            loss = F.cross_entropy(forward(params, sx[t]), sy)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=not first_order)
            adapted = {k: w - 0.4 * gk for (k, w), gk in zip(params.items(), grads, strict=True)}
            (F.cross_entropy(forward(adapted, qx[t]), qy) / tasks).backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant and repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[2], help="thread counts to try beside 1")
    args = parser.parse_args()

    variants = ["plain", *(f"threads={n}" for n in args.threads), "channels-last", "compile"]
    for first_order in (False, True):
        order = "first order" if first_order else "second order"
        steps: dict[str, Callable[[], None]] = {}
        failures: dict[str, str] = {}
        for variant in variants:
            torch.set_num_threads(1)
            try:
                steps[variant] = make_step(variant, first_order, args.tasks)
                steps[variant]()  # warm-up (compiles)
            except Exception as error:  # a lever that does not apply is reported, not fatal
                failures[variant] = f"{type(error).__name__}: {str(error).splitlines()[0][:90]}"
                steps.pop(variant, None)
        times: dict[str, list[float]] = {v: [] for v in steps}
        for _ in range(args.repeats):
            for variant, step in steps.items():  # interleaved
                torch.set_num_threads(int(variant.split("=")[1]) if variant.startswith("threads=") else 1)
                for _ in range(args.steps):
                    start = time.perf_counter()
                    step()
                    times[variant].append(time.perf_counter() - start)
        torch.set_num_threads(1)
        print(
            f"\nMAML {order}, 1 inner step, Conv4-64, 5-way 1-shot shapes, {args.tasks} tasks/step; "
            f"torch {torch.__version__}, CPU; median of {args.repeats} interleaved repeats × {args.steps} steps"
        )
        print("| variant | ms/step | vs plain |")
        print("|---|---:|---:|")
        base = statistics.median(times["plain"]) if "plain" in times else float("nan")
        for variant in variants:
            if variant in failures:
                print(f"| {variant} | failed: {failures[variant]} | |")
                continue
            median = statistics.median(times[variant])
            print(f"| {variant} | {1000 * median:.0f} | {median / base:.2f}× |")


if __name__ == "__main__":
    main()
