"""Inner-loss selection on the outlier-corrupted sinusoid family (issue 15): fixed candidate losses,
the oracle, the mixture / policy / bandit selectors and ML3's learned loss, at one training budget.

Every method is MAML from `configs/sinusoid/maml_robust_loss.yaml` (MLP 1-40-40-1, K=10, inner lr
0.01, one inner step in training) with only its `inner_loss` changed, meta-trained for `--steps`
meta-steps of 25 tasks (half of them with Cauchy outliers on 30% of the support targets, queries
clean), one torch thread, the same seed. Each is tested on the same fixed test tasks (the
DataModule's seeded test stream): the clean query MSE after `--eval-steps` inner steps on the
(possibly corrupted) support set, mean ± 95% CI per task type (clean / corrupted) and over all.
The oracle takes, for each test task, the best of the fixed-loss models after the fact. The
selectors' test choices are their argmax (mixture), most probable (policy) or best-mean (bandit)
candidate; the share of each choice per task type is printed.

    python benchmarks/loss_selection.py --steps 2000            # the README's run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")

import pytorch_lightning as pl
import torch
from bench_trainer import bare_trainer

from lightning_meta.algorithms import mean_and_ci95
from lightning_meta.cli import run_cli
from lightning_meta.data import CorruptedSinusoidTasks
from lightning_meta.data.sampler import TEST, task_rng
from lightning_meta.inner_loop import forward

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "sinusoid" / "maml_robust_loss.yaml"
CANDIDATES = ["mse", "l1", "huber", "cauchy"]
SELECTORS = {
    "mixture": "lightning_meta.losses.MixtureLoss",
    "policy": "lightning_meta.losses.PolicyLoss",
    "bandit": "lightning_meta.losses.BanditLoss",
}


def inner_loss_args(method: str) -> list[str]:
    if method in CANDIDATES:
        return ["--model.init_args.inner_loss.init_args.name=" + method]
    if method == "ML3":
        return ["--model.init_args.inner_loss=lightning_meta.losses.ML3Loss"]
    return [
        f"--model.init_args.inner_loss={SELECTORS[method]}",
        f"--model.init_args.inner_loss.init_args.candidates=[{','.join(CANDIDATES)}]",
    ]


def build(method: str, steps: int, seed: int):
    args = ["--config", str(CONFIG), "--trainer.logger=false", f"--seed_everything={seed}"]
    args += [f"--data.batches_per_epoch={max(1, steps // 10)}", *inner_loss_args(method)]
    cli = run_cli(args, run=False)
    cli.model.task_batching = "loop"  # selectors run on the loop; the same path for every method
    return cli.model, cli.datamodule


def test_tasks(data, count: int) -> tuple[list, torch.Tensor]:
    """The fixed test tasks and whether each was corrupted (recomputed from its generator)."""
    family: CorruptedSinusoidTasks = data.family
    tasks, kinds = [], []
    for i in range(count):
        task, corrupted = family.sample_with_type(task_rng(data.eval_seed, TEST, i))
        tasks.append(task)
        kinds.append(corrupted)
    return tasks, torch.tensor(kinds)


def query_mse(model, tasks: list, steps: int) -> tuple[torch.Tensor, list[int] | None]:
    model.eval()
    losses, choices = [], []
    pop = getattr(model.inner_loss, "pop_choices", None)
    for task in tasks:
        adapted = model.adapt(task, steps)[-1]
        with torch.no_grad():
            losses.append(((forward(model.backbone, adapted, task.query_x) - task.query_y) ** 2).mean())
        if pop is not None:
            choices += pop().tolist()
    return torch.stack(losses), (choices or None)


def cell(values: torch.Tensor) -> str:
    """Mean ± 95% CI; where adaptation blew up (non-finite MSE or above 1e3: MSE's gradient on an
    outlier of scale ~1e3 throws the fit away), how many tasks, and the mean over the rest."""
    diverged = ~torch.isfinite(values) | (values > 1e3)
    mean, ci = mean_and_ci95(values[~diverged])
    if diverged.any():
        return f"diverges on {int(diverged.sum())}/{values.numel()} (rest: {mean:.3f} ± {ci:.3f})"
    return f"{mean:.3f} ± {ci:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--test-tasks", type=int, default=600)
    parser.add_argument("--eval-steps", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=[*CANDIDATES, "mixture", "policy", "bandit", "ML3"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)

    results, kinds = {}, None
    for method in args.methods:
        pl.seed_everything(args.seed, verbose=False)
        model, data = build(method, args.steps, args.seed)
        start = time.perf_counter()
        bare_trainer(max_steps=args.steps, accelerator="cpu").fit(model, datamodule=data)
        seconds = time.perf_counter() - start
        tasks, kinds = test_tasks(data, args.test_tasks)
        losses, choices = query_mse(model, tasks, args.eval_steps)
        results[method] = {"losses": losses.tolist(), "choices": choices, "seconds": seconds}
        print(f"{method}: {cell(losses)} ({seconds / 60:.1f} min)", flush=True)

    fixed = [m for m in CANDIDATES if m in results]
    if fixed:
        # A diverged task (non-finite MSE) is the worst choice, not a NaN that poisons the min.
        stacked = torch.tensor([results[m]["losses"] for m in fixed]).nan_to_num(nan=float("inf"))
        results["oracle"] = {
            "losses": stacked.min(0).values.tolist(),
            "choices": [CANDIDATES.index(fixed[i]) for i in stacked.argmin(0).tolist()],
        }

    lines = [
        f"Outlier-corrupted sines (half the tasks: Cauchy outliers × 5 on 30% of the support targets; queries "
        f"clean), MAML 1-40-40-1, {args.steps} meta-steps of 25 tasks per method, query MSE after "
        f"{args.eval_steps} inner steps on {args.test_tasks} fixed test tasks ({int(kinds.sum())} corrupted), "
        "mean ± 95% CI. Oracle: the best fixed-loss model per test task, after the fact.",
        "",
        "| inner loss | clean tasks | corrupted tasks | all | test choices (clean / corrupted) |",
        "|---|---:|---:|---:|---|",
    ]
    names = fixed if "oracle" not in results else [*fixed, "oracle"]
    for method in [*names, *[m for m in results if m not in names]]:
        losses = torch.tensor(results[method]["losses"])
        choices = results[method].get("choices")
        shares = ""
        if choices is not None:
            c = torch.tensor(choices)
            parts = []
            for mask in (~kinds, kinds):
                counts = torch.bincount(c[mask], minlength=len(CANDIDATES))
                parts.append(", ".join(f"{CANDIDATES[i]} {int(n)}" for i, n in enumerate(counts) if n))
            shares = " / ".join(parts)
        lines.append(f"| {method} | {cell(losses[~kinds])} | {cell(losses[kinds])} | {cell(losses)} | {shares} |")
    table = "\n".join(lines)
    print(table)
    (args.out / "loss_selection.md").write_text(table + "\n")
    (args.out / "loss_selection.json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                                             "results": results}) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
