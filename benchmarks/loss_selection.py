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

Two more modes (`--mode`), the same protocol:

- `lr`: the second candidate axis. The inner loss stays MSE and the candidates are inner learning
  rates (`configs/sinusoid/maml_lr_selection.yaml`: step multipliers 0.1, 1, 3 of inner lr 0.01);
  a fixed candidate is plain MAML at that learning rate (inner lr 0.001, 0.01, 0.03).
- `product`: both axes at once, (MSE or L1) × (0.001, 0.01, 0.03): six candidates, one selector.
- `autoloss`: AutoLoss's regression task (`configs/linear_regression/maml_autoloss.yaml`: 16-d
  linear regression, 200 support points, noise variance 2), candidates MSE and MSE + 0.2·|w|_1.
  One task type (two, dense / sparse, with `--override=--data.init_args.sparse_fraction=0.5`).

    python benchmarks/loss_selection.py --steps 600                  # the README's loss run
    python benchmarks/loss_selection.py --mode lr --steps 400        # the README's lr run
    python benchmarks/loss_selection.py --mode product --steps 400   # the README's loss × lr run
    python benchmarks/loss_selection.py --mode autoloss --steps 300 --eval-steps 20  # the README's AutoLoss run
    python benchmarks/loss_selection.py --mode autoloss --steps 300 --eval-steps 20 --tag _mixed \\
        --override=--data.init_args.sparse_fraction=0.5    # half the tasks sparse (2 of 16 weights)
    python benchmarks/loss_selection.py --mode autoloss --steps 300 --eval-steps 20 --tag _mixed_k20 \\
        --methods mse mse_l1 mixture policy --override=--data.init_args.sparse_fraction=0.5 \\
        --override=--model.init_args.inner_steps=20        # trained through 20 inner steps, as tested
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
from lightning_meta.data.sampler import TEST, task_rng
from lightning_meta.inner_loop import forward

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "sinusoid" / "maml_robust_loss.yaml"
CANDIDATES = ["mse", "l1", "huber", "cauchy"]
LR_CONFIG = REPO / "configs" / "sinusoid" / "maml_lr_selection.yaml"
LR_SCALES = [0.1, 1.0, 3.0]
LR_BASE = 0.01
AUTOLOSS_CONFIG = REPO / "configs" / "linear_regression" / "maml_autoloss.yaml"
AUTOLOSS_CANDIDATES = ["mse", "mse_l1"]
SELECTORS = {
    "mixture": "lightning_meta.losses.MixtureLoss",
    "policy": "lightning_meta.losses.PolicyLoss",
    "bandit": "lightning_meta.losses.BanditLoss",
}


class Mode:
    """What one benchmark mode runs: its config, its fixed candidates and how a method is set."""

    def __init__(self, name: str) -> None:
        self.name = name
        if name == "loss":
            self.config, self.candidates = CONFIG, CANDIDATES
        elif name in ("lr", "product"):
            self.losses = ["mse"] if name == "lr" else ["mse", "l1"]
            self.config, self.candidates = LR_CONFIG, [f"{loss}@{s:g}" for loss in self.losses for s in LR_SCALES]
        elif name == "autoloss":
            self.config, self.candidates = AUTOLOSS_CONFIG, AUTOLOSS_CANDIDATES
        else:
            raise ValueError(f"--mode {name!r} must be loss, lr, product or autoloss")

    def inner_loss_args(self, method: str) -> list[str]:
        if self.name in ("lr", "product") and method in self.candidates:
            # A fixed (loss, step size): MAML with that inner loss at inner lr base × scale.
            loss, scale = method.split("@")
            return [
                "--model.init_args.inner_loss=lightning_meta.losses.CandidateLoss",
                f"--model.init_args.inner_loss.init_args.name={loss}",
                f"--model.init_args.inner_lr={LR_BASE * float(scale)!r}",
            ]
        if method in self.candidates:
            return [
                "--model.init_args.inner_loss=lightning_meta.losses.CandidateLoss",
                "--model.init_args.inner_loss.init_args.name=" + method,
            ]
        if method == "ML3":
            return ["--model.init_args.inner_loss=lightning_meta.losses.ML3Loss"]
        if method not in SELECTORS:
            raise ValueError(f"method {method!r}: choose among {self.candidates}, {list(SELECTORS)} or ML3")
        if self.name in ("lr", "product"):
            return [
                f"--model.init_args.inner_loss={SELECTORS[method]}",
                f"--model.init_args.inner_loss.init_args.candidates=[{','.join(self.losses)}]",
                f"--model.init_args.inner_loss.init_args.lr_scales=[{','.join(map(str, LR_SCALES))}]",
            ]
        return [
            f"--model.init_args.inner_loss={SELECTORS[method]}",
            f"--model.init_args.inner_loss.init_args.candidates=[{','.join(self.candidates)}]",
        ]

    def build(self, method: str, steps: int, seed: int, overrides: list[str] = ()):
        args = ["--config", str(self.config), "--trainer.logger=false", f"--seed_everything={seed}"]
        args += [f"--data.batches_per_epoch={max(1, steps // 10)}", *overrides, *self.inner_loss_args(method)]
        cli = run_cli(args, run=False)
        cli.model.task_batching = "loop"  # selectors run on the loop; the same path for every method
        return cli.model, cli.datamodule


def test_tasks(data, count: int) -> tuple[list, torch.Tensor, tuple[str, ...]]:
    """The fixed test tasks, each one's type (recomputed from its generator) and the type names."""
    family = data.family
    typed = getattr(family, "sample_with_type", None)
    tasks, kinds = [], []
    for i in range(count):
        rng = task_rng(data.eval_seed, TEST, i)
        task, kind = typed(rng) if typed is not None else (family.sample(rng), 0)
        tasks.append(task)
        kinds.append(int(kind))
    return tasks, torch.tensor(kinds), getattr(family, "task_types", None) or ("all",)


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
    model.train()
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
    parser.add_argument("--mode", default="loss", choices=["loss", "lr", "product", "autoloss"])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--test-tasks", type=int, default=600)
    parser.add_argument("--eval-steps", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=None, help="default: the candidates, the selectors, ML3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--override", action="append", default=[], help="a CLI override for every method, e.g. "
                        "--override=--data.init_args.sparse_fraction=0.5 (repeat for more)")  # fmt: skip
    parser.add_argument("--tag", default="", help="suffix of the results files")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)

    mode = Mode(args.mode)
    if args.methods is None:
        args.methods = [*mode.candidates, *SELECTORS, *(["ML3"] if args.mode == "loss" else [])]
    results, kinds, type_names = {}, None, ()
    for method in args.methods:
        pl.seed_everything(args.seed, verbose=False)
        model, data = mode.build(method, args.steps, args.seed, args.override)
        start = time.perf_counter()
        bare_trainer(max_steps=args.steps, accelerator="cpu").fit(model, datamodule=data)
        seconds = time.perf_counter() - start
        tasks, kinds, type_names = test_tasks(data, args.test_tasks)
        losses, choices = query_mse(model, tasks, args.eval_steps)
        names = getattr(model.inner_loss, "candidates", None) if method in SELECTORS else None
        results[method] = {"losses": losses.tolist(), "choices": choices, "names": names, "seconds": seconds}
        print(f"{method}: {cell(losses)} ({seconds / 60:.1f} min)", flush=True)

    fixed = [m for m in mode.candidates if m in results]
    if fixed:
        # A diverged task (non-finite MSE) is the worst choice, not a NaN that poisons the min.
        stacked = torch.tensor([results[m]["losses"] for m in fixed]).nan_to_num(nan=float("inf"))
        results["oracle"] = {
            "losses": stacked.min(0).values.tolist(),
            "choices": stacked.argmin(0).tolist(),
            "names": fixed,
        }

    overrides = f" Overrides: {' '.join(args.override)}." if args.override else ""
    lines = [caption(args, kinds, type_names) + overrides, ""]
    columns = [*(f"{t} tasks" for t in type_names), "all"] if len(type_names) > 1 else ["all tasks"]
    axis = {"lr": "learning rate", "product": "loss @ lr scale"}.get(args.mode, "loss")
    lines += [
        f"| inner {axis} | {' | '.join(columns)} | test choices ({' / '.join(type_names)}) | train min |",
        "|---|" + "---:|" * len(columns) + "---|---:|",
    ]
    names = fixed if "oracle" not in results else [*fixed, "oracle"]
    for method in [*names, *[m for m in results if m not in names]]:
        losses = torch.tensor(results[method]["losses"])
        choices, candidates = results[method].get("choices"), results[method].get("names")
        shares = ""
        if choices is not None and candidates is not None:
            c = torch.tensor(choices)
            parts = []
            for t in range(len(type_names)):
                counts = torch.bincount(c[kinds == t], minlength=len(candidates))
                parts.append(", ".join(f"{candidates[i]} {int(n)}" for i, n in enumerate(counts) if n))
            shares = " / ".join(parts)
        cells = [cell(losses[kinds == t]) for t in range(len(type_names))]
        if len(type_names) > 1:
            cells.append(cell(losses))
        seconds = results[method].get("seconds")
        minutes = f"{seconds / 60:.1f}" if seconds is not None else ""
        lines.append(f"| {method} | {' | '.join(cells)} | {shares} | {minutes} |")
    table = "\n".join(lines)
    print(table)
    stem = ("loss_selection" if args.mode == "loss" else f"loss_selection_{args.mode}") + args.tag
    (args.out / f"{stem}.md").write_text(table + "\n")
    (args.out / f"{stem}.json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                                      "results": results}) + "\n")  # fmt: skip


def caption(args: argparse.Namespace, kinds: torch.Tensor, type_names: tuple[str, ...]) -> str:
    budget = (
        f"{args.steps} meta-steps of 25 tasks per method (seed {args.seed}), query MSE after {args.eval_steps} inner "
        f"steps on {args.test_tasks} fixed test tasks"
    )
    oracle = "Oracle: the best fixed-candidate model per test task, after the fact."
    if args.mode == "autoloss":
        return (
            f"AutoLoss's regression tasks (16-d linear, 200 support points, noise variance 2), MAML with a linear "
            f"model, {budget}, mean ± 95% CI. {oracle}"
        )
    counts = ", ".join(f"{int((kinds == t).sum())} {name}" for t, name in enumerate(type_names))
    what = {
        "lr": "inner learning rate chosen among 0.001 / 0.01 / 0.03 (MSE inner loss)",
        "product": "(inner loss, inner learning rate) chosen among {MSE, L1} × {0.001, 0.01, 0.03}",
    }.get(args.mode, "inner loss chosen among fixed candidates")
    return (
        f"Outlier-corrupted sines (half the tasks: Cauchy outliers × 5 on 30% of the support targets; queries "
        f"clean), MAML 1-40-40-1, {what}, {budget} ({counts}), mean ± 95% CI. {oracle}"
    )


if __name__ == "__main__":
    main()
