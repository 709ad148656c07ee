"""Sinusoid regression (MAML §5.1 protocol) for the gradient-based family: the README's table.

Each algorithm is built from its `configs/sinusoid/<name>.yaml` (so the table measures what the
configs run) and meta-trained with the same budget: `--steps` meta-steps of 25 tasks, one torch
thread, the tasks of a batch vmapped where the algorithm and backbone are proven to allow it,
else looped. Then it is scored on 600 held-out tasks (the DataModule's fixed seeded test tasks,
100 query points each): query MSE ± 95% CI after 1 and after 10 inner steps on K support
points. By default one model per algorithm is trained with K=10 and tested at every K of `--ks`;
`--per-k` trains one model per K instead (K support and K query points, as in MAML's code).

Writes, under `--out` (default benchmarks/results/): `sinusoid_table.md` (the table as printed),
`sinusoid_mse_vs_steps.png` (MSE against inner steps 0-10, the analogue of MAML's Figure 3) and
`sinusoid_fits.png` (held-out tasks, their support points and each algorithm's fit).

    python benchmarks/sinusoid_table.py                       # the README's run
    python benchmarks/sinusoid_table.py --steps 70000 --per-k # the papers' budget, one model per K
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytorch_lightning as pl
import torch
from bench_trainer import bare_trainer

from lightning_meta.algorithms import mean_and_ci95, task_parallel
from lightning_meta.cli import run_cli
from lightning_meta.data import SinusoidDataModule
from lightning_meta.inner_loop import forward

REPO = Path(__file__).resolve().parents[1]
ALGORITHMS = {  # table name: config under configs/sinusoid/
    "MAML": "maml",
    "first-order MAML": "fomaml",
    "Meta-SGD": "metasgd",
    "MAML++": "mamlpp",
    "Reptile": "reptile",
    "ANIL": "anil",
    "CAVIA": "cavia",
    "MAML + LearnedOptimizer": "maml_learned_opt",
    "MetaLSTM": "maml_metalstm",
}
PUBLISHED = {  # Meta-SGD paper (Li et al. 2017), Table 1: 5-shot, one inner step
    ("MAML", 5): "1.13 ± 0.18",
    ("Meta-SGD", 5): "0.90 ± 0.16",
}
LOOP_MEASURED_FASTER = {
    # Vmappable (tests/test_update_rule_vmap.py) but not faster vmapped: its cost is the LSTM's
    # arithmetic over all 1,761 coordinates, not per-task overhead, and the vmapped [25, 1761, 80]
    # gate tensors leave the cache. First order, 25 tasks, 1 thread: vmap 1.51x the loop (min of 7,
    # shared CPU; benchmarks/results/component_cost_vmap_first_order.md).
    "maml_learned_opt",
}
"""Configs whose tasks the table runs in a loop although they may be vmapped."""
EVAL_STEPS = 10
QUERY_POINTS = 100


def build(config: str, shots: int, steps: int, seed: int):
    """The configured model and data, with schedules stretched to `steps` meta-steps (10 epochs),
    and the config's gradient clipping."""
    args = ["--config", str(REPO / "configs" / "sinusoid" / f"{config}.yaml"), "--trainer.logger=false"]
    args += [f"--seed_everything={seed}", f"--data.shots={shots}", f"--data.query_shots={shots}"]
    args += [f"--data.batches_per_epoch={max(1, steps // 10)}"]
    if config == "mamlpp":
        args.append(f"--model.init_args.lr_scheduler.init_args.T_max={steps}")
    if config == "reptile":
        args.append(f"--model.init_args.lr_scheduler.init_args.total_iters={steps}")
    cli = run_cli(args, run=False)
    model = cli.model
    # The fastest path each algorithm supports (vmap where proven equal to the loop: the
    # parity tests, unless the loop was measured faster), fixed rather than "auto" so noisy
    # timing on a shared CPU cannot flip it.
    vmappable = model.supports_vmap and task_parallel.vmap_blocker(model) is None
    model.task_batching = "vmap" if vmappable and config not in LOOP_MEASURED_FASTER else "loop"
    return model, cli.datamodule, cli.trainer.gradient_clip_val


def train(model, data, steps: int, gradient_clip_val: float | None) -> tuple[float, str]:
    """Seconds spent, and a note if training stopped early (a non-finite meta-loss)."""
    trainer = bare_trainer(
        max_steps=steps,
        gradient_clip_val=gradient_clip_val,  # the config's: part of the algorithm's recipe
        accelerator="cpu",
    )
    start = time.perf_counter()
    try:
        trainer.fit(model, datamodule=data)
    except FloatingPointError:
        # The weights from before the failing step are still finite: score them, say so.
        return time.perf_counter() - start, f"stopped at step {trainer.global_step}: non-finite meta-loss"
    return time.perf_counter() - start, ""


def test_tasks(shots: int, count: int) -> list:
    data = SinusoidDataModule(shots=shots, query_shots=QUERY_POINTS, test_tasks=count, eval_tasks_per_batch=count)
    return list(next(iter(data.test_dataloader())))


def mse_by_step(model, tasks: list) -> torch.Tensor:
    """`[tasks, EVAL_STEPS + 1]`: each task's query MSE after 0..EVAL_STEPS inner steps."""
    model.eval()
    rows = []
    for task in tasks:
        trajectory = model.adapt(task, EVAL_STEPS)
        with torch.no_grad():
            rows.append(
                torch.stack(
                    [((forward(model.backbone, p, task.query_x) - task.query_y) ** 2).mean() for p in trajectory]
                )
            )
    return torch.stack(rows)


def fit_curves(model, tasks: list, x: torch.Tensor) -> dict[int, list[torch.Tensor]]:
    """Predictions on `x` after 1 and after EVAL_STEPS inner steps, for each task."""
    model.eval()
    curves: dict[int, list[torch.Tensor]] = {1: [], EVAL_STEPS: []}
    for task in tasks:
        trajectory = model.adapt(task, EVAL_STEPS)
        with torch.no_grad():
            for steps, fits in curves.items():
                fits.append(forward(model.backbone, trajectory[steps], x).squeeze(-1))
    return curves


def cell(values: torch.Tensor) -> str:
    """Mean ± 95% CI over tasks; where adaptation blew up on some tasks (MSE non-finite or
    above 1e3: rates learned for fewer steps than applied can overshoot), how many, and the
    mean over the rest."""
    diverged = ~torch.isfinite(values) | (values > 1e3)
    mean, ci = mean_and_ci95(values[~diverged])
    if diverged.any():
        return f"diverges on {int(diverged.sum())}/{values.numel()} (rest: {mean:.2f} ± {ci:.2f})"
    return f"{mean:.2f} ± {ci:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000, help="meta-steps per trained model")
    parser.add_argument("--ks", type=int, nargs="+", default=[5, 10, 20], help="support points K to test")
    parser.add_argument("--per-k", action="store_true", help="train one model per K (default: one, on K=10)")
    parser.add_argument("--tasks", type=int, default=600, help="held-out test tasks")
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--nonfinite",
        choices=["raise", "skip"],
        default="raise",
        help="a non-finite meta-loss stops training (raise; the table scores the weights from before it) "
        "or drops that step and goes on (skip; the table counts the dropped steps)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)  # no per-fit device banners
    args.out.mkdir(parents=True, exist_ok=True)
    tasks = {k: test_tasks(k, args.tasks) for k in args.ks}
    train_ks = args.ks if args.per_k else [10]

    mse: dict[tuple[str, int], torch.Tensor] = {}
    seconds: dict[str, float] = {}
    paths: dict[str, str] = {}  # how the tasks were run, and any early stop
    config_eval_steps: dict[str, int] = {}  # the config's own test setting (`eval_inner_steps`)
    fit_x = torch.linspace(-5, 5, 200).unsqueeze(-1)
    fit_k = 10 if 10 in args.ks else args.ks[0]
    fits: dict[str, dict[int, list[torch.Tensor]]] = {}
    for name in args.algorithms:
        seconds[name] = 0.0
        for train_k in train_ks:
            pl.seed_everything(args.seed, verbose=False)
            model, data, clip = build(ALGORITHMS[name], train_k, args.steps, args.seed)
            config_eval_steps[name] = model.eval_inner_steps
            model.nonfinite = args.nonfinite
            spent, note = train(model, data, args.steps, clip)
            if model.skipped_steps:
                note = f"{note}; " * bool(note) + f"{model.skipped_steps} steps skipped: non-finite meta-loss"
            seconds[name] += spent
            paths[name] = model.task_batching + (f"; K={train_k} {note}" if note else "")
            for k in args.ks if not args.per_k else [train_k]:
                mse[name, k] = mse_by_step(model, tasks[k])
                if k == fit_k:
                    fits[name] = fit_curves(model, tasks[k][:3], fit_x)
            print(f"{name}: trained on K={train_k} in {seconds[name]:.0f} s", flush=True)

    trained = "one model per K" if args.per_k else "one model per algorithm, trained on K=10"
    lines = [
        f"Sinusoid regression: query MSE on {args.tasks} held-out tasks ± 95% CI, after 1 and {EVAL_STEPS} "
        f"inner steps on K support points. {trained}; {args.steps} meta-steps of 25 tasks each; "
        f"torch threads: {torch.get_num_threads()}; train time on this machine.",
        "",
        "| algorithm | train time (tasks run by) | "
        + " | ".join(f"K={k}, 1 step | K={k}, {EVAL_STEPS} steps" for k in args.ks)
        + " |",
        "|---|---:|" + "---:|---:|" * len(args.ks),
    ]
    for name in args.algorithms:
        cells = [f"{cell(mse[name, k][:, 1])} | {cell(mse[name, k][:, EVAL_STEPS])}" for k in args.ks]
        time_cell = f"{seconds[name] / 60:.1f} min ({paths[name]})"
        lines.append(f"| {name} | {time_cell} | " + " | ".join(cells) + " |")
    for name in ("MAML", "Meta-SGD"):
        cells = [f"{PUBLISHED.get((name, k), '')} | " for k in args.ks]
        lines.append(f"| {name}, published (Meta-SGD paper, Table 1) | | " + " | ".join(cells) + " |")
    for name in args.algorithms:
        own = config_eval_steps[name]
        if own < EVAL_STEPS:  # Meta-SGD: rates learned for its training steps
            lines.append(
                f"\n{name}'s config tests after {own} inner step(s) (`eval_inner_steps`), the "
                f"steps it learns for; its {EVAL_STEPS}-step columns apply its update beyond that, for comparison."
            )
            if own != 1:
                at_own = ", ".join(f"K={k}: {cell(mse[name, k][:, own])}" for k in args.ks if (name, k) in mse)
                lines.append(f"After its {own} steps: {at_own}.")
    table = "\n".join(lines)
    print(table)
    (args.out / "sinusoid_table.md").write_text(table + "\n")
    # Every step's mean ± CI, for rows read at a step the table has no column for.
    per_step = {
        f"{name} | K={k}": [[float(m), float(c)] for m, c in (mean_and_ci95(v) for v in values.T)]
        for (name, k), values in mse.items()
    }
    record = {"steps": args.steps, "seed": args.seed, "train_seconds": seconds, "paths": paths}
    (args.out / "sinusoid_table.json").write_text(json.dumps({**record, "mse_mean_ci_by_step": per_step}, indent=1))

    figure, axes = plt.subplots(1, len(args.ks), figsize=(4.5 * len(args.ks), 3.6), squeeze=False)
    for ax, k in zip(axes[0], args.ks, strict=True):
        for name in args.algorithms:
            mean, ci = (torch.stack(c) for c in zip(*(mean_and_ci95(v) for v in mse[name, k].T), strict=True))
            steps = range(EVAL_STEPS + 1)
            ax.plot(steps, mean, marker="o", markersize=3, label=name)
            ax.fill_between(steps, mean - ci, mean + ci, alpha=0.2)
        # Curves that leave the top of the plot diverged (see the table).
        ax.set(title=f"K = {k}", xlabel="inner steps", ylabel="mean query MSE", yscale="log", ylim=(0.05, 20))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(args.out / "sinusoid_mse_vs_steps.png", dpi=110)

    figure, axes = plt.subplots(2, 3, figsize=(13.5, 7.2), sharex=True)
    for row, steps in enumerate((1, EVAL_STEPS)):
        for i, (ax, task) in enumerate(zip(axes[row], tasks[fit_k][:3], strict=True)):
            order = task.query_x.squeeze(-1).argsort()
            ax.plot(task.query_x[order], task.query_y[order], color="black", linewidth=2, label="true")
            for name in args.algorithms:
                ax.plot(fit_x, fits[name][steps][i], linewidth=1, label=name)
            ax.scatter(task.support_x, task.support_y, color="red", zorder=5, label=f"{fit_k} support points")
            low, high = task.query_y.min().item(), task.query_y.max().item()
            margin = 0.5 * (high - low) + 0.5
            ax.set(
                title=f"held-out task {i}, after {steps} step{'s' if steps > 1 else ''}",
                ylim=(low - margin, high + margin),
            )
            if row == 1:
                ax.set_xlabel("x")
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(args.out / "sinusoid_fits.png", dpi=110)
    print(f"wrote {args.out / 'sinusoid_table.md'}, sinusoid_mse_vs_steps.png, sinusoid_fits.png")


if __name__ == "__main__":
    main()
