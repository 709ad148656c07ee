"""ML3's sine experiment (Bechtle et al., ICPR 2021): meta-learn a loss, then train new regressors
from scratch with it, on sines outside the meta-training range (issue 15, point 2).

Meta-training: φ of `lightning_meta.losses.ML3Loss` (MLP 50-50, ReLU, softplus output) is learned
so that a freshly initialised regressor (MLP 1-40-40-1, a new random initialisation every task:
ML3 learns a loss, not an initialisation), trained by `--inner-steps` SGD steps on the learned
loss over a task's K support points, has a low true MSE on the task's query points. The gradient
reaches φ through the unrolled SGD steps (`inner_loop.adapt`, second order).

Test: new regressors trained from scratch for `--test-steps` plain SGD steps with the learned loss
and, from the same initialisations, with MSE, on sines whose amplitude lies outside the
meta-training range (default: train A ~ U[0.1, 5], test A ~ U[5, 7]); MSE on 100 query points
against SGD step, mean over `--test-tasks` tasks, for each of `--seeds` seeds (a seed: the
meta-training run and the test regressors' initialisations). Then the same learned loss trains
a different regressor it never saw (MLP 1-100-10-1): does the loss transfer across backbones?

    python benchmarks/ml3_sine.py                      # the README's run
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from lightning_meta.algorithms import mean_and_ci95
from lightning_meta.data import SinusoidTasks
from lightning_meta.inner_loop import adapt, forward, named_params
from lightning_meta.losses import ML3Loss
from lightning_meta.losses.candidates import mse
from lightning_meta.models import MLP
from lightning_meta.task import Task

REPO = Path(__file__).resolve().parents[1]


def fresh(hidden: list[int], seed: int) -> MLP:
    torch.manual_seed(seed)
    return MLP(hidden_sizes=hidden)


def tasks(family: SinusoidTasks, seed: int, count: int) -> list[Task]:
    rng = np.random.default_rng(seed)
    return [family.sample(rng) for _ in range(count)]


def meta_train(args: argparse.Namespace, seed: int) -> ML3Loss:
    torch.manual_seed(seed)
    loss = ML3Loss(outputs=1)
    optimizer = torch.optim.Adam(loss.parameters(), lr=args.meta_lr)
    family = SinusoidTasks(args.shots, args.shots, amplitude=(0.1, 5.0))
    rng = np.random.default_rng(seed)
    for it in range(args.meta_steps):
        total = 0.0
        for b in range(args.tasks_per_batch):
            task = family.sample(rng)
            model = fresh([40, 40], seed * 1_000_003 + it * 997 + b)
            params = named_params(model)

            def support_loss(p, model=model, task=task):
                return loss(p, task, lambda x: forward(model, p, x), 0)

            adapted = adapt(support_loss, params, args.inner_steps, args.inner_lr)[-1]
            total = total + mse(forward(model, adapted, task.query_x), task.query_y)
        optimizer.zero_grad()
        (total / args.tasks_per_batch).backward()
        optimizer.step()
    return loss


def train_curve(model: MLP, task: Task, loss_fn, steps: int, lr: float) -> list[float]:
    """Query MSE after 0..steps SGD steps on `loss_fn` over the support set."""
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    curve = []
    for step in range(steps + 1):
        with torch.no_grad():
            curve.append(float(mse(forward(model, params, task.query_x), task.query_y)))
        if step == steps:
            break
        value = loss_fn(params, task, model)
        grads = torch.autograd.grad(value, list(params.values()))
        params = {n: (p - lr * g).detach().requires_grad_() for (n, p), g in zip(params.items(), grads, strict=True)}
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--meta-steps", type=int, default=300)
    parser.add_argument("--tasks-per-batch", type=int, default=8)
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--inner-lr", type=float, default=0.01)
    parser.add_argument("--meta-lr", type=float, default=1e-3)
    parser.add_argument("--test-steps", type=int, default=100)
    parser.add_argument("--test-tasks", type=int, default=20)
    parser.add_argument("--test-amplitude", type=float, nargs=2, default=[5.0, 7.0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    test_family = SinusoidTasks(args.shots, 100, amplitude=tuple(args.test_amplitude))

    record: dict = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "seeds": []}
    for seed in range(args.seeds):
        start = time.perf_counter()
        learned = meta_train(args, seed)
        meta_s = time.perf_counter() - start
        learned.requires_grad_(False)
        row = {"seed": seed, "meta_train_s": meta_s}

        def learned_loss(p, t, m, learned=learned):
            return learned(p, t, lambda x: forward(m, p, x), 0)

        def mse_loss(p, t, m):
            return mse(forward(m, p, t.support_x), t.support_y)

        for backbone, hidden in (("40-40", [40, 40]), ("100-10", [100, 10])):
            curves = {"ML3": [], "MSE": []}
            for i, task in enumerate(tasks(test_family, 10_000 + seed, args.test_tasks)):
                model = fresh(hidden, 50_000 + 100 * seed + i)
                curves["ML3"].append(train_curve(model, task, learned_loss, args.test_steps, args.inner_lr))
                curves["MSE"].append(train_curve(model, task, mse_loss, args.test_steps, args.inner_lr))
            row[backbone] = {k: torch.tensor(v).mean(0).tolist() for k, v in curves.items()}
            final = {k: v[-1] for k, v in row[backbone].items()}
            print(
                f"seed {seed} ({meta_s:.0f} s meta-training) MLP {backbone}: final query MSE "
                f"ML3 {final['ML3']:.3f}, MSE {final['MSE']:.3f}",
                flush=True,
            )
        record["seeds"].append(row)

    lines = [
        f"ML3 sine protocol: loss meta-trained on A ~ U[0.1, 5] for {args.meta_steps} steps × {args.tasks_per_batch} "
        f"tasks ({args.inner_steps} SGD steps at {args.inner_lr} from a fresh MLP 1-40-40-1 per task); new regressors "
        f"trained {args.test_steps} SGD steps (lr {args.inner_lr}) from scratch on K={args.shots} points of sines with "
        f"A ~ U{args.test_amplitude}, query MSE (100 points) averaged over {args.test_tasks} tasks per seed; "
        f"mean ± 95% CI over {args.seeds} seeds.",
        "",
        "| regressor | MSE loss, final | ML3 loss, final | seeds where ML3 ends below MSE |",
        "|---|---:|---:|---:|",
    ]
    for backbone in ("40-40", "100-10"):
        finals = {k: torch.tensor([r[backbone][k][-1] for r in record["seeds"]]) for k in ("MSE", "ML3")}
        wins = int((finals["ML3"] < finals["MSE"]).sum())
        cells = {k: "{:.3f} ± {:.3f}".format(*mean_and_ci95(v)) for k, v in finals.items()}
        lines.append(f"| MLP 1-{backbone}-1 | {cells['MSE']} | {cells['ML3']} | {wins}/{args.seeds} |")
    table = "\n".join(lines)
    print(table)
    (args.out / "ml3_sine.md").write_text(table + "\n")
    (args.out / "ml3_sine.json").write_text(json.dumps(record) + "\n")

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, backbone in zip(axes, ("40-40", "100-10"), strict=True):
        for name in ("MSE", "ML3"):
            curves = torch.tensor([r[backbone][name] for r in record["seeds"]])
            ax.plot(curves.mean(0), label=f"{name} loss")
        ax.set(title=f"new MLP 1-{backbone}-1, OOD sines", xlabel="SGD steps", ylabel="query MSE", yscale="log")
        ax.legend()
        ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(args.out / "ml3_sine.png", dpi=110)
    print(
        f"wrote {args.out / 'ml3_sine.md'} and the PNG; {math.fsum(r['meta_train_s'] for r in record['seeds']):.0f} s"
    )


if __name__ == "__main__":
    main()
