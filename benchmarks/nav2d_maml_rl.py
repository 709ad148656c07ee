"""MAML-RL on 2D navigation, HalfCheetah-Vel/Dir or Ant-Dir (Finn et al. 2017 §5.3, Fig. 5) on a CPU budget.

Meta-trains MAMLRL through the real CLI (configs/<family>/maml_rl.yaml) for a CPU-time budget,
then scores it on the config's 40 held-out tasks (the test stream): the mean episode return
before and after one VPG step on the config's trajectories of each task, ± 95% CI, beside the
family's baselines on the same tasks (2D navigation: standing still and the oracle, the largest
allowed move towards the known goal; MuJoCo families: zero and uniformly random actions). For
2D navigation, draws the trajectories before and after adaptation for a few goals.

    OMP_NUM_THREADS=1 python benchmarks/nav2d_maml_rl.py --minutes 12
    OMP_NUM_THREADS=1 python benchmarks/nav2d_maml_rl.py --minutes 12 --outer optimizer --tag adam
    OMP_NUM_THREADS=1 python benchmarks/nav2d_maml_rl.py --family cheetah_vel --minutes 30 -- \
        --data.init_args.tasks_per_batch=10 --model.init_args.trajectories=10
    OMP_NUM_THREADS=1 python benchmarks/nav2d_maml_rl.py --family cheetah_dir --minutes 40 -- \
        --data.init_args.tasks_per_batch=10 --model.init_args.trajectories=10

Options after `--` go to the CLI (reduced settings; the md and json record them). Writes
benchmarks/results/<family>_maml_rl[_<tag>].{md,json} (and .png for nav2d).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lightning_meta.algorithms import MAMLRL, mean_and_ci95
from lightning_meta.callbacks import CPUTimeBudget
from lightning_meta.cli import run_cli
from lightning_meta.data.rl import TaskSpecStream
from lightning_meta.data.sampler import TEST
from lightning_meta.envs.baselines import LABELS

REPO = Path(__file__).resolve().parents[1]
PAPER = "paper: Fig. 5 only (a plot, no number to set beside these)"


class Curve(CPUTimeBudget):
    """Every meta-iteration's training returns and every validation, with the elapsed time; stops
    training once this process has used `cpu_seconds` of CPU time (the machine is shared, so a
    wall-clock budget would measure the other jobs as much as this one)."""

    def __init__(self, cpu_seconds: float) -> None:
        super().__init__(cpu_seconds)
        self.train: list[dict[str, float]] = []
        self.val: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        m = trainer.callback_metrics
        keys = ("train/return_before", "train/return", "train/trpo_kl")
        self.train.append(
            {
                "step": trainer.global_step,
                "seconds": self.wall_used(),
                "cpu_seconds": self.cpu_used(),
                **{k: float(m[k]) for k in keys if k in m},
            }
        )
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer, pl_module) -> None:
        # Not on_validation_epoch_end: Lightning calls the callbacks' epoch-end hook before the
        # module's, which logs the metrics, so it would read the previous validation's.
        m = trainer.callback_metrics
        if not trainer.sanity_checking and "val/return" in m:
            self.val.append(
                {
                    "step": trainer.global_step,
                    "seconds": self.wall_used(),
                    "return_before": float(m["val/return_before"]),
                    "return": float(m["val/return"]),
                }
            )


def plot_trajectories(model: MAMLRL, path: Path, goals: int = 4, shown: int = 5) -> None:
    """Pre- and post-update trajectories (`shown` of the 20 per goal) for the first test goals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    family, shown = model.family, min(shown, model.trajectories)
    batch = TaskSpecStream(family, 0, TEST)[tuple(range(goals))]
    model.eval()
    with torch.enable_grad():
        _, pre, post, _ = model.meta_batch(batch)
    fig, axes = plt.subplots(1, goals, figsize=(3.2 * goals, 3.4))
    for i, ax in enumerate(axes):
        for data, color, label in ((pre, "tab:gray", "before"), (post, "tab:blue", "after 1 step")):
            actions = (model.action_scale * data.actions[i, :shown]).clamp(-family.max_move, family.max_move)
            path_xy = torch.cat([torch.zeros(shown, 1, 2), actions.cumsum(1)], 1)
            for j in range(shown):
                ax.plot(
                    path_xy[j, :, 0], path_xy[j, :, 1], color=color, lw=0.8, alpha=0.7, label=label if j == 0 else None
                )
        goal = batch.tasks["goal"][i]
        ax.plot(*goal.tolist(), marker="*", color="tab:red", ms=14, label="goal")
        ax.plot(0, 0, marker="o", color="k", ms=4)
        ax.set_xlim(-0.8, 0.8)
        ax.set_ylim(-0.8, 0.8)
        ax.set_aspect("equal")
        ax.set_title(
            f"goal {i}: {pre.rewards[i].sum(-1).mean():.1f} → {post.rewards[i].sum(-1).mean():.1f}", fontsize=9
        )
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("MAML-RL, 2D navigation: 5 of the 20 sampled trajectories before and after one VPG step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def per_task_returns(model: MAMLRL) -> dict[str, list[float]]:
    """Each test task's mean episode return before and after the VPG step and of each baseline from
    the `trainer.test` just run (`eval_per_task`: what its metrics average), for paired
    differences: the baselines' task-to-task spread (e.g. the target velocity) cancels."""
    stats = model.eval_per_task
    rows = {"before": stats["return_before"].tolist(), "after": stats["return"].tolist()}
    rows.update({k.removeprefix("baseline/"): v.tolist() for k, v in stats.items() if k.startswith("baseline/")})
    return rows


def paired_rows(per_task: dict[str, list[float]]) -> list[tuple[str, str]]:
    """(after, before), then (after, baseline) and (before, baseline) for every baseline."""
    baselines = [k for k in per_task if k not in ("before", "after")]
    return [("after", "before"), *[(a, b) for b in baselines for a in ("after", "before")]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--family",
        choices=("nav2d", "cheetah_vel", "cheetah_dir", "ant_dir"),
        default="nav2d",
        help="configs/<family>/",
    )
    parser.add_argument("--minutes", type=float, default=12.0, help="meta-training budget in CPU minutes")
    parser.add_argument("--wall-minutes", type=float, default=45.0, help="wall-clock backstop")
    parser.add_argument("--max-steps", type=int, default=500)
    parser.add_argument("--outer", choices=("trpo", "optimizer"), default="trpo")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam's lr when --outer optimizer")
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", default=None, help="default: logs/bench_<family>_maml_rl")
    parser.add_argument("overrides", nargs="*", help="extra CLI options after --")
    args = parser.parse_args()
    torch.set_num_threads(1)

    budget = time.strftime("00:%H:%M:%S", time.gmtime(args.wall_minutes * 60))
    curve = Curve(args.minutes * 60)
    extra = [f"--model.init_args.outer={args.outer}"]
    if args.outer == "optimizer":
        extra += ["--model.init_args.optimizer=torch.optim.Adam", f"--model.init_args.optimizer.lr={args.lr}"]
    start = time.perf_counter()
    cli = run_cli(
        [
            "--config",
            str(REPO / f"configs/{args.family}/maml_rl.yaml"),
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_checkpointing=false",
            f"--trainer.max_time={budget}",
            f"--trainer.max_steps={args.max_steps}",
            f"--trainer.default_root_dir={args.out or f'logs/bench_{args.family}_maml_rl'}",
            "--test_after_fit=false",
            *extra,
            *args.overrides,
        ],
        run=False,
    )
    cli.trainer.callbacks.append(curve)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    train_seconds, train_cpu = time.perf_counter() - start, curve.cpu_used()
    (metrics,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    model: MAMLRL = cli.model
    per_task = per_task_returns(model)
    iterations = model.global_step

    def cell(key: str) -> str:
        return f"{metrics[key]:.2f} ± {metrics[key + '_ci95']:.2f}"

    suffix = f"_{args.tag}" if args.tag else ""
    results = REPO / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    name = f"{args.family}_maml_rl{suffix}"
    if args.family == "nav2d":
        plot_trajectories(model, results / f"{name}.png")
    family, n, tasks = model.family, model.trajectories, cli.datamodule.tasks_per_batch
    baselines = sorted(
        k.removeprefix("test/baseline/") for k in metrics if k.startswith("test/baseline/") and "ci95" not in k
    )
    outer = "TRPO (max KL 0.01)" if args.outer == "trpo" else f"Adam (lr {args.lr})"
    lines = [
        f"MAML-RL, {type(family).__name__}, {int(metrics['test/tasks'])} held-out tasks (test stream), {n} "
        f"trajectories per task, mean episode return (H = {family.horizon}) ± 95% CI; outer step {outer}",
        "",
        "| policy | return |",
        "|---|---|",
        f"| MAML-RL before adaptation (θ) | {cell('test/return_before')} |",
        f"| MAML-RL after one VPG step (θ') | {cell('test/return')} |",
        *(f"| {LABELS[b]} | {cell('test/baseline/' + b)} |" for b in baselines),
        "",
        f"Meta-training: {iterations} meta-iterations × {tasks} tasks × ({n} + {n}) trajectories in "
        f"{train_cpu / 60:.1f} CPU minutes (budget {args.minutes:g}; {train_seconds / 60:.1f} min wall on this "
        f"shared, contended CPU), 1 thread; {PAPER}.",
    ]
    if args.overrides:
        lines.append(f"CLI overrides of configs/{args.family}/maml_rl.yaml: `{' '.join(args.overrides)}`.")
    lines += ["", "Paired on the same test tasks and noise (per-task differences, mean ± 95% CI):", ""]
    lines += ["| difference | return |", "|---|---|"]
    for a, b in paired_rows(per_task):
        mean, ci = mean_and_ci95(torch.tensor(per_task[a]) - torch.tensor(per_task[b]))
        lines.append(f"| {a} − {b} | {float(mean):+.2f} ± {float(ci):.2f} |")
    text = "\n".join(lines)
    print(text)
    (results / f"{name}.md").write_text(text + "\n")
    payload = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "family": args.family,
        "overrides": args.overrides,
        "outer": args.outer,
        "iterations": iterations,
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "train_curve": curve.train,
        "val_curve": curve.val,
        "per_task": per_task,
    }
    (results / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
