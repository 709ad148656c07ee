"""What each inner-loop component costs, in one run: ms per meta-step of MAML with each update
rule and each inner loss against plain MAML (SGD on the task's own MSE), all on the same 25
sinusoid tasks (MLP 1-40-40-1, K = 10, 5 inner steps, tasks in a loop by default), timed
round-robin in one process on one thread (min and median of `--repeats`), and each one's peak
memory over one meta-step in a fresh process (resident-set high-water mark above the start,
Linux). `--paths loop vmap` times every component on both paths in the same round-robin (each
row's ratio is to MAML on the same path, and a last column gives vmap against the loop); a
component that may not be vmapped (the loss selectors: `vmap_blocker`) is timed in the loop only.
MeTAL is a classification loss: its cost at the Omniglot shapes is `benchmarks/metal_cost.py`.
(It replaces `update_rule_cost.py`, which timed one learned rule against SGD:
`--components LearnedOptimizer`.) `--out FILE.md` also writes the table, with the command, there
and as JSON beside it.

    python benchmarks/component_cost.py                 # second order (MAML's default)
    python benchmarks/component_cost.py --first-order
    python benchmarks/component_cost.py --first-order --components LearnedOptimizer MetaLSTM --paths loop vmap
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lightning_meta.algorithms import MAML
from lightning_meta.algorithms.task_parallel import memory_mark, memory_peak, vmap_blocker
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


def meta_step(model: MAML, batch: TaskBatch, path: str = "loop") -> None:
    model.zero_grad()
    model.meta_loss(batch, path)[0].backward()
    pop_choices = getattr(model.inner_loss, "pop_choices", None)
    if pop_choices is not None:
        pop_choices()  # as the training step does: the choices of this batch are logged and dropped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--first-order", action="store_true")
    parser.add_argument("--components", nargs="+", choices=list(COMPONENTS), default=list(COMPONENTS))
    parser.add_argument("--paths", nargs="+", choices=["loop", "vmap"], default=["loop"])
    parser.add_argument("--out", type=Path, help="also write the table (and its JSON, same stem) here")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    parser.add_argument("--memory-path", default="loop", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    batch = next(iter(SinusoidDataModule(tasks_per_batch=25).train_dataloader()))
    if args.memory_of:  # the child process: one meta-step from a fresh start
        model = build(args.memory_of, args.first_order)
        start = memory_mark(torch.device("cpu"))
        meta_step(model, batch, args.memory_path)
        print((memory_peak(torch.device("cpu")) - start) / 2**20)
        return
    names = ["MAML", *[n for n in args.components if n != "MAML"]]
    models = {name: build(name, args.first_order) for name in names}
    runs = [(name, path) for name in names for path in args.paths if path == "loop" or not vmap_blocker(models[name])]
    for name, path in runs:
        meta_step(models[name], batch, path)  # warm-up
    times: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
    for _ in range(args.repeats):
        for name, path in runs:
            start = time.perf_counter()
            meta_step(models[name], batch, path)
            times[name, path].append(time.perf_counter() - start)
    order = "first" if args.first_order else "second"
    paths = " and ".join(f"tasks {'in a loop' if p == 'loop' else 'vmapped'}" for p in args.paths)
    command = shlex.join(["python", "benchmarks/component_cost.py", *sys.argv[1:]])
    lines = [
        f"`{command}`: 25 sinusoid tasks, K=10, MLP 1-40-40-1, 5 inner steps, {order} order, {paths}, "
        f"{args.repeats} round-robin meta-steps each, 1 thread",
        "",
    ]
    both = len(args.paths) > 1
    header = (
        "| component | kind | own parameters | ms per meta-step (min) | median | ratio to MAML (min) | peak memory |"
    )
    rule = "|---|---|---:|---:|---:|---:|---:|"
    if both:
        header = header.replace("| component |", "| component | path |").replace(
            "ratio to MAML (min)", "ratio to MAML, same path (min)"
        )
        header, rule = header + " vmap / loop (min) |", "|---" + rule + "---:|"
    lines += [header, rule]
    rows = []
    for name, path in runs:
        child = [sys.executable, __file__, "--memory-of", name, "--memory-path", path]
        child += ["--first-order"] if args.first_order else []
        mib = float(subprocess.run(child, capture_output=True, text=True, check=True).stdout.split()[-1])
        model = models[name]
        own = sum(p.numel() for m in (model.update_rule, model.inner_loss) if m is not None for p in m.parameters())
        fastest = min(times[name, path])
        ratio = fastest / min(times["MAML", path])
        row = {
            "component": name,
            "kind": COMPONENTS[name][0],
            "path": path,
            "own_parameters": own,
            "ms_min": 1000 * fastest,
            "ms_median": 1000 * statistics.median(times[name, path]),
            "ratio_to_maml_same_path": ratio,
            "peak_memory_mib": mib,
            "ms_all": [1000 * t for t in times[name, path]],
        }
        cells = [name, *([path] if both else []), COMPONENTS[name][0], str(own)]
        cells += [f"{row['ms_min']:.0f}", f"{row['ms_median']:.0f}", f"{ratio:.2f}x", f"{mib:.1f} MiB"]
        if both:
            vmap_vs_loop = fastest / min(times[name, "loop"]) if path == "vmap" else None
            row["vmap_over_loop"] = vmap_vs_loop
            cells.append("" if vmap_vs_loop is None else f"{vmap_vs_loop:.2f}x")
        rows.append(row)
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
        meta = {"command": command, "order": order, "repeats": args.repeats, "threads": 1}
        args.out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
