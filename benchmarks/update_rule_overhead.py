"""What making the inner update pluggable (issue 14: `UpdateRule`) cost the existing algorithms,
in one run: the inner loop as it was before that change (`lightning_meta/inner_loop.py` at
commit `BEFORE`, read from git and loaded into this process beside today's module) against
today's, on the same 25 sinusoid tasks (MLP 1-40-40-1, K = 10), with the step sizes of MAML (one
float), Meta-SGD (a learned tensor per parameter) and MAML++ (one learned rate per step), first
and second order, timed round-robin on one thread (min and median of `--repeats` meta-steps).
Each variant's meta-step is the algorithms' core: adapt every task, average the query MSE,
differentiate it with respect to θ0 and the rates. Before timing, the script checks in float64
that both inner loops give the same query loss and meta-gradients (the parity tests' claim, here
on the benchmark's own tasks) and refuses to time them otherwise.

    python benchmarks/update_rule_overhead.py [--repeats 30] [--out FILE.md]

Needs the git history (a clone, not an sdist).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from lightning_meta import inner_loop
from lightning_meta.data import SinusoidDataModule
from lightning_meta.models import MLP

REPO = Path(__file__).resolve().parents[1]
BEFORE = "58853b7^1"
"""The main-line commit before the merge that made the inner update an `UpdateRule`."""


def load_before() -> ModuleType:
    """`lightning_meta/inner_loop.py` as it was at `BEFORE`, as a module of its own."""
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{BEFORE}:lightning_meta/inner_loop.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    spec = importlib.util.spec_from_loader("inner_loop_before", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    exec(compile(source, f"{BEFORE}:lightning_meta/inner_loop.py", "exec"), module.__dict__)
    return module


def step_sizes(kind: str, model: torch.nn.Module, steps: int, dtype: torch.dtype) -> tuple[object, list[torch.Tensor]]:
    """The step size argument of each algorithm, and its learned tensors."""
    if kind == "MAML":
        return 0.01, []
    if kind == "Meta-SGD":
        rates = {n: torch.full_like(p, 0.01, dtype=dtype, requires_grad=True) for n, p in model.named_parameters()}
        return rates, list(rates.values())
    rates_per_step = [torch.tensor(0.01, dtype=dtype, requires_grad=True) for _ in range(steps)]  # MAML++
    return rates_per_step, rates_per_step


def make_step(
    module: ModuleType,
    model: torch.nn.Module,
    batch,
    steps: int,
    step_size: object,
    learned: list[torch.Tensor],
    first_order: bool,
) -> Callable:
    """One meta-step through `module`'s inner loop: the meta-loss and its gradients in θ0 and in
    the step size's `learned` tensors."""

    def meta_step() -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        params = module.named_params(model)
        total = 0.0
        for i in range(len(batch.support_x)):
            x, y = batch.support_x[i], batch.support_y[i]

            def loss_fn(p, x=x, y=y):
                return F.mse_loss(module.forward(model, p, x), y)

            adapted = module.adapt(loss_fn, params, steps, step_size, first_order)[-1]
            total = total + F.mse_loss(module.forward(model, adapted, batch.query_x[i]), batch.query_y[i])
        loss = total / len(batch.support_x)
        return loss, torch.autograd.grad(loss, [*params.values(), *learned])

    return meta_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--steps", type=int, default=5, help="inner steps")
    parser.add_argument("--out", type=Path, help="also write the table (and its JSON, same stem) here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    before = load_before()
    batch32 = next(iter(SinusoidDataModule(tasks_per_batch=25).train_dataloader()))
    variants = [(kind, fo) for kind in ("MAML", "Meta-SGD", "MAML++") for fo in (False, True)]

    # Parity first, in float64: the same numbers or no timing.
    batch64 = type(batch32)(
        *(t.double() for t in (batch32.support_x, batch32.support_y, batch32.query_x, batch32.query_y))
    )
    for kind, first_order in variants:
        torch.manual_seed(0)
        model = MLP().double()
        size, learned = step_sizes(kind, model, args.steps, torch.float64)
        old = make_step(before, model, batch64, args.steps, size, learned, first_order)()
        new = make_step(inner_loop, model, batch64, args.steps, size, learned, first_order)()
        worst = max((a - b).abs().max().item() for a, b in zip((old[0], *old[1]), (new[0], *new[1]), strict=True))
        if worst > 1e-12:
            raise SystemExit(f"{kind} (first_order={first_order}): before and after differ by {worst:.3g} in float64")
        print(f"parity {kind}, first_order={first_order}: largest difference {worst:.1e} (float64)", flush=True)

    runs: dict[tuple[str, bool, str], Callable] = {}
    for kind, first_order in variants:
        torch.manual_seed(0)
        model = MLP()
        size, learned = step_sizes(kind, model, args.steps, torch.float32)
        for label, module in (("before", before), ("after", inner_loop)):
            runs[kind, first_order, label] = make_step(module, model, batch32, args.steps, size, learned, first_order)
    for run in runs.values():
        run()  # warm-up
    times: dict[tuple[str, bool, str], list[float]] = {key: [] for key in runs}
    for _ in range(args.repeats):
        for key, run in runs.items():
            start = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - start)

    command = shlex.join(["python", "benchmarks/update_rule_overhead.py", *sys.argv[1:]])
    lines = [
        f"`{command}`: 25 sinusoid tasks, K=10, MLP 1-40-40-1, {args.steps} inner steps, tasks in a loop, "
        f"{args.repeats} round-robin meta-steps each, 1 thread; before = `inner_loop.py` at `{BEFORE}` "
        "(hard-wired SGD step), after = today's (`UpdateRule`)",
        "",
        "| algorithm's step size | order | before, ms (min) | after, ms (min) | after / before (min) "
        "| before, ms (median) | after, ms (median) | after / before (median) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    rows = []
    for kind, first_order in variants:
        b, a = times[kind, first_order, "before"], times[kind, first_order, "after"]
        row = {
            "algorithm": kind,
            "order": "first" if first_order else "second",
            "before_min_ms": 1e3 * min(b),
            "after_min_ms": 1e3 * min(a),
            "before_median_ms": 1e3 * statistics.median(b),
            "after_median_ms": 1e3 * statistics.median(a),
        }
        rows.append(row)
        lines.append(
            f"| {kind} | {row['order']} | {row['before_min_ms']:.1f} | {row['after_min_ms']:.1f} | "
            f"{min(a) / min(b):.3f} | {row['before_median_ms']:.1f} | {row['after_median_ms']:.1f} | "
            f"{statistics.median(a) / statistics.median(b):.3f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")
        record = {"command": command, "before": BEFORE, "repeats": args.repeats, "steps": args.steps, "rows": rows}
        args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
