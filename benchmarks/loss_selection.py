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
- `omniglot`: the classification family. MAML on Omniglot 5-way 5-shot
  (`configs/omniglot_5w5s/maml_label_noise.yaml`: Conv4 with 16 channels, 8 tasks per meta-step),
  half the tasks with 40% of their support labels flipped to another class (queries clean; test
  tasks from held-out characters). Candidates: cross-entropy, label-smoothed CE, focal,
  generalised CE, MSE on one-hot logits. The metric is query accuracy (%, higher is better) after
  `--eval-steps` inner steps; the oracle takes each task's most accurate fixed-loss model (ties
  broken by the lower query cross-entropy). Methods also include MeTAL (`MeTALLoss`).
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
    PYTHONPATH=. python benchmarks/loss_selection.py --mode omniglot --steps 250 --eval-steps 3
    PYTHONPATH=. python benchmarks/loss_selection.py --mode omniglot --steps 250 --eval-steps 3 \\
        --methods mixture policy --selector-arg=label_consistency=true --selector-arg=probe_lr=0.1 \\
        --selector-arg='candidates=[cross_entropy]' --selector-arg='lr_scales=[0.25,0.5,1.0,2.0]' --tag _lr
        # the step-size axis on Omniglot: the selector args replace the five losses (they follow them)
    PYTHONPATH=. python benchmarks/loss_selection.py --mode omniglot --steps 250 --eval-steps 3 \\
        --methods cross_entropy consistency_filtered_cross_entropy mixture policy \\
        --selector-arg=label_consistency=true --selector-arg=probe_lr=0.1 \\
        --selector-arg='candidates=[cross_entropy,consistency_filtered_cross_entropy]' --tag _filtered
        # a candidate outside the default five (EXTRA_CANDIDATES) runs when named in --methods

Paired differences between such runs on the same test tasks: `benchmarks/loss_selection_paired.py`.
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
from lightning_meta.losses.candidates import EXTRA_CANDIDATES

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "sinusoid" / "maml_robust_loss.yaml"
CANDIDATES = ["mse", "l1", "huber", "cauchy"]
LR_CONFIG = REPO / "configs" / "sinusoid" / "maml_lr_selection.yaml"
LR_SCALES = [0.1, 1.0, 3.0]
LR_BASE = 0.01
AUTOLOSS_CONFIG = REPO / "configs" / "linear_regression" / "maml_autoloss.yaml"
AUTOLOSS_CANDIDATES = ["mse", "mse_l1"]
OMNIGLOT_CONFIG = REPO / "configs" / "omniglot_5w5s" / "maml_label_noise.yaml"
OMNIGLOT_CANDIDATES = [
    "cross_entropy",
    "label_smoothed_cross_entropy",
    "focal",
    "generalised_cross_entropy",
    "mse_one_hot",
]
OMNIGLOT_WAYS = 5
SELECTORS = {
    "mixture": "lightning_meta.losses.MixtureLoss",
    "policy": "lightning_meta.losses.PolicyLoss",
    "bandit": "lightning_meta.losses.BanditLoss",
}


class Mode:
    """What one benchmark mode runs: its config, its fixed candidates and how a method is set."""

    def __init__(self, name: str, selector_args: list[str] = ()) -> None:
        self.name = name
        # `key=value` init args of the per-task selectors (mixture, policy), e.g. `probe_lr=0.1`.
        self.selector_args = [f"--model.init_args.inner_loss.init_args.{a}" for a in selector_args]
        if name == "loss":
            self.config, self.candidates = CONFIG, CANDIDATES
        elif name in ("lr", "product"):
            self.losses = ["mse"] if name == "lr" else ["mse", "l1"]
            self.config, self.candidates = LR_CONFIG, [f"{loss}@{s:g}" for loss in self.losses for s in LR_SCALES]
        elif name == "autoloss":
            self.config, self.candidates = AUTOLOSS_CONFIG, AUTOLOSS_CANDIDATES
        elif name == "omniglot":
            self.config, self.candidates = OMNIGLOT_CONFIG, OMNIGLOT_CANDIDATES
        else:
            raise ValueError(f"--mode {name!r} must be loss, lr, product, autoloss or omniglot")
        self.classification = name == "omniglot"
        # Candidates run only when named in --methods (never by default, never in the selectors'
        # default candidates): e.g. consistency_filtered_cross_entropy on Omniglot.
        kind = "classification" if self.classification else "regression"
        self.extra = list(EXTRA_CANDIDATES[kind]) if name in ("loss", "autoloss", "omniglot") else []

    def fixed(self, methods) -> list[str]:
        """The fixed-loss methods among `methods` (the oracle's pool), the default candidates first."""
        return [m for m in [*self.candidates, *self.extra] if m in methods]

    def inner_loss_args(self, method: str) -> list[str]:
        if self.name in ("lr", "product") and method in self.candidates:
            # A fixed (loss, step size): MAML with that inner loss at inner lr base × scale.
            loss, scale = method.split("@")
            return [
                "--model.init_args.inner_loss=lightning_meta.losses.CandidateLoss",
                f"--model.init_args.inner_loss.init_args.name={loss}",
                f"--model.init_args.inner_lr={LR_BASE * float(scale)!r}",
            ]
        if method in self.candidates or method in self.extra:
            return [
                "--model.init_args.inner_loss=lightning_meta.losses.CandidateLoss",
                "--model.init_args.inner_loss.init_args.name=" + method,
            ]
        if method == "ML3":
            outputs = [f"--model.init_args.inner_loss.init_args.outputs={OMNIGLOT_WAYS}"] if self.classification else []
            return ["--model.init_args.inner_loss=lightning_meta.losses.ML3Loss", *outputs]
        if method == "MeTAL" and self.classification:
            # As configs/omniglot_5w5s/maml_metal.yaml: 18 adapted tensors on Conv4, one training step.
            return [
                "--model.init_args.inner_loss=lightning_meta.losses.MeTALLoss",
                f"--model.init_args.inner_loss.init_args.ways={OMNIGLOT_WAYS}",
                "--model.init_args.inner_loss.init_args.parameter_tensors=18",
                "--model.init_args.inner_loss.init_args.steps=1",
            ]
        if method not in SELECTORS:
            raise ValueError(
                f"method {method!r}: choose among {[*self.candidates, *self.extra]}, {list(SELECTORS)}, ML3 or MeTAL"
            )
        extra = self.selector_args if method != "bandit" else []
        if self.name in ("lr", "product"):
            return [
                f"--model.init_args.inner_loss={SELECTORS[method]}",
                f"--model.init_args.inner_loss.init_args.candidates=[{','.join(self.losses)}]",
                f"--model.init_args.inner_loss.init_args.lr_scales=[{','.join(map(str, LR_SCALES))}]",
                *extra,
            ]
        kind = ["--model.init_args.inner_loss.init_args.kind=classification"] if self.classification else []
        return [
            f"--model.init_args.inner_loss={SELECTORS[method]}",
            f"--model.init_args.inner_loss.init_args.candidates=[{','.join(self.candidates)}]",
            *kind,
            *extra,
        ]

    def build(self, method: str, steps: int, seed: int, overrides: list[str] = ()):
        args = ["--config", str(self.config), "--trainer.logger=false", f"--seed_everything={seed}"]
        args += [f"--data.batches_per_epoch={max(1, steps // 10)}", *overrides, *self.inner_loss_args(method)]
        cli = run_cli(args, run=False)
        cli.model.task_batching = "loop"  # selectors run on the loop; the same path for every method
        return cli.model, cli.datamodule


def test_tasks(data, count: int) -> tuple[list, torch.Tensor, tuple[str, ...]]:
    """The fixed test tasks, each one's type (recomputed from its generator) and the type names."""
    # The regression modules have one `family`; the episodic ones (Omniglot) a source per split.
    family = data.family if hasattr(data, "family") else (data.setup(), data.sources["test"])[1]
    typed = getattr(family, "sample_with_type", None)
    tasks, kinds = [], []
    for i in range(count):
        rng = task_rng(data.eval_seed, TEST, i)
        task, kind = typed(rng) if typed is not None else (family.sample(rng), 0)
        tasks.append(task)
        kinds.append(int(kind))
    return tasks, torch.tensor(kinds), getattr(family, "task_types", None) or ("all",)


def query_scores(model, tasks: list, steps: int) -> tuple[torch.Tensor, torch.Tensor, list[int] | None]:
    """Per test task, after `steps` inner steps: the metric (query MSE for regression, query
    accuracy in % for classification), the query cross-entropy (classification; else the MSE
    again: the oracle's tie-break) and the selector's choices."""
    model.eval()
    metric, losses, choices = [], [], []
    pop = getattr(model.inner_loss, "pop_choices", None)
    pop_probabilities = getattr(model.inner_loss, "pop_probabilities", None)
    if pop_probabilities is not None:
        pop_probabilities()  # the validation tasks' (kept in eval mode only)
    for task in tasks:
        adapted = model.adapt(task, steps)[-1]
        with torch.no_grad():
            predictions = forward(model.backbone, adapted, task.query_x)
            if task.query_y.is_floating_point():
                metric.append(((predictions - task.query_y) ** 2).mean())
                losses.append(metric[-1])
            else:
                metric.append(100.0 * (predictions.argmax(-1) == task.query_y).float().mean())
                losses.append(torch.nn.functional.cross_entropy(predictions, task.query_y))
        if pop is not None:
            choices += pop().tolist()
    model.train()
    return torch.stack(metric), torch.stack(losses), (choices or None)


def oracle(metric: torch.Tensor, losses: torch.Tensor, higher_is_better: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The best fixed candidate per task after the fact, from `[candidates, tasks]` metrics: its
    metric and its index. Ties (accuracy is discrete) go to the lower query loss, then the first
    candidate. A non-finite metric or loss (a diverged task) is the worst choice, not a NaN."""
    worst = float("-inf") if higher_is_better else float("inf")
    metric = metric.nan_to_num(nan=worst)
    best = metric.max(0).values if higher_is_better else metric.min(0).values
    tied = losses.nan_to_num(nan=float("inf")).masked_fill(metric != best, float("inf"))
    choice = torch.where(torch.isinf(tied).all(0), 0, tied.argmin(0))
    return best, choice


def cell(values: torch.Tensor, accuracy: bool = False) -> str:
    """Mean ± 95% CI (accuracy in %: one decimal); where adaptation blew up (non-finite MSE or above
    1e3: MSE's gradient on an outlier of scale ~1e3 throws the fit away), how many tasks, and the
    mean over the rest."""
    if accuracy:
        mean, ci = mean_and_ci95(values)
        return f"{mean:.1f} ± {ci:.1f}"
    diverged = ~torch.isfinite(values) | (values > 1e3)
    mean, ci = mean_and_ci95(values[~diverged])
    if diverged.any():
        return f"diverges on {int(diverged.sum())}/{values.numel()} (rest: {mean:.3f} ± {ci:.3f})"
    return f"{mean:.3f} ± {ci:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="loss", choices=["loss", "lr", "product", "autoloss", "omniglot"])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--test-tasks", type=int, default=600)
    parser.add_argument("--eval-steps", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=None, help="default: the candidates, the selectors, ML3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--override", action="append", default=[], help="a CLI override for every method, e.g. "
                        "--override=--data.init_args.sparse_fraction=0.5 (repeat for more)")  # fmt: skip
    parser.add_argument("--selector-arg", action="append", default=[], help="an init arg of the mixture and "
                        "policy selectors, key=value, e.g. --selector-arg=probe_lr=0.1 (repeat for more)")  # fmt: skip
    parser.add_argument("--tag", default="", help="suffix of the results files")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)

    mode = Mode(args.mode, args.selector_arg)
    if args.methods is None:
        learned = {"loss": ["ML3"], "omniglot": ["ML3", "MeTAL"]}.get(args.mode, [])
        args.methods = [*mode.candidates, *SELECTORS, *learned]
    results, kinds, type_names = {}, None, ()
    for method in args.methods:
        pl.seed_everything(args.seed, verbose=False)
        model, data = mode.build(method, args.steps, args.seed, args.override)
        start, cpu = time.perf_counter(), time.process_time()
        bare_trainer(max_steps=args.steps, accelerator="cpu").fit(model, datamodule=data)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
        tasks, kinds, type_names = test_tasks(data, args.test_tasks)
        losses, query_loss, choices = query_scores(model, tasks, args.eval_steps)
        names = getattr(model.inner_loss, "candidates", None) if method in SELECTORS else None
        results[method] = {"losses": losses.tolist(), "choices": choices, "names": names, "seconds": seconds,
                           "cpu_seconds": cpu_seconds, "query_loss": query_loss.tolist()}  # fmt: skip
        pop_probabilities = getattr(model.inner_loss, "pop_probabilities", None)
        probabilities = pop_probabilities() if pop_probabilities is not None else None
        if probabilities is not None:  # the test tasks' softmax over the candidates
            results[method]["probabilities"] = probabilities.tolist()
        print(f"{method}: {cell(losses, mode.classification)} ({seconds / 60:.1f} min)", flush=True)
        # Written after every method, so a run cut short keeps what it measured.
        report(args, mode, dict(results), kinds, type_names, show=method == args.methods[-1])


def report(
    args: argparse.Namespace, mode: Mode, results: dict, kinds: torch.Tensor, type_names: tuple, show: bool = True
) -> None:
    """The table (md, printed) and the raw per-task numbers (json) of the methods run so far."""
    fixed = mode.fixed(results)
    if fixed:
        # "losses" holds the metric: MSE (lower is better) or accuracy (higher is better).
        best, choice = oracle(
            torch.tensor([results[m]["losses"] for m in fixed]),
            torch.tensor([results[m]["query_loss"] for m in fixed]),
            higher_is_better=mode.classification,
        )
        results["oracle"] = {"losses": best.tolist(), "choices": choice.tolist(), "names": fixed}

    overrides = f" Overrides: {' '.join(args.override)}." if args.override else ""
    if args.selector_arg:
        overrides += f" Selector (mixture, policy) init args: {', '.join(args.selector_arg)}."
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
        cells = [cell(losses[kinds == t], mode.classification) for t in range(len(type_names))]
        if len(type_names) > 1:
            cells.append(cell(losses, mode.classification))
        seconds = results[method].get("seconds")
        minutes = f"{seconds / 60:.1f}" if seconds is not None else ""
        lines.append(f"| {method} | {' | '.join(cells)} | {shares} | {minutes} |")
    cpu = [f"{m} {results[m]['cpu_seconds'] / 60:.1f}" for m in results if "cpu_seconds" in results[m]]
    lines += ["", "Process CPU minutes of training (one thread): " + ", ".join(cpu) + "."]
    soft = [m for m in results if "probabilities" in results[m]]
    if soft and len(type_names) > 1:
        lines += ["", "The selectors' mean softmax over the candidates on the test tasks, per task type (before any "
                  "argmax; uniform is " + f"{1 / len(results[soft[0]]['names']):.2f}):", ""]  # fmt: skip
        for method in soft:
            p = torch.tensor(results[method]["probabilities"])
            parts = []
            for t, name in enumerate(type_names):
                mean = p[kinds == t].mean(0)
                parts.append(f"{name}: " + ", ".join(f"{c} {float(v):.3f}" for c, v in
                                                     zip(results[method]["names"], mean, strict=True)))  # fmt: skip
            lines.append(f"- {method}: " + "; ".join(parts))
    table = "\n".join(lines)
    if show:
        print(table, flush=True)
    stem = ("loss_selection" if args.mode == "loss" else f"loss_selection_{args.mode}") + args.tag
    (args.out / f"{stem}.md").write_text(table + "\n")
    (args.out / f"{stem}.json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                                      "results": results}) + "\n")  # fmt: skip


def caption(args: argparse.Namespace, kinds: torch.Tensor, type_names: tuple[str, ...]) -> str:
    counts = ", ".join(f"{int((kinds == t).sum())} {name}" for t, name in enumerate(type_names))
    if args.mode == "omniglot":
        # The config trains through 1 inner step; an --override may change it (the last one wins).
        prefix = "--model.init_args.inner_steps="
        train_steps = ([o.removeprefix(prefix) for o in args.override if o.startswith(prefix)] or ["1"])[-1]
        return (
            f"Omniglot 5-way 5-shot, half the tasks with 40% of the support labels flipped to another class (queries "
            f"clean, held-out test characters), MAML (Conv4, 16 channels, second order, inner lr 0.1, {train_steps} "
            f"inner step{'' if train_steps == '1' else 's'} in training), inner loss chosen among fixed candidates, "
            f"{args.steps} meta-steps of 8 tasks per method "
            f"(seed {args.seed}), query accuracy (%) after {args.eval_steps} inner steps on {args.test_tasks} fixed "
            f"test tasks ({counts}), mean ± 95% CI. Oracle: the most accurate fixed-candidate model per test task, "
            f"after the fact (ties: the lower query cross-entropy). train min: wall minutes, shared CPU, one thread."
        )
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
