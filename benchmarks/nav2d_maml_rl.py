"""MAML-RL on 2D navigation (Finn et al. 2017 §5.3, Fig. 5) on a CPU budget.

Meta-trains MAMLRL through the real CLI (configs/nav2d/maml_rl.yaml) for a CPU-time budget,
then scores it on 40 held-out goals (the test stream): the mean episode return before and after
one VPG step on 20 trajectories of each goal, ± 95% CI, beside standing still and the oracle
(the largest allowed move towards the known goal) on the same goals. Draws the trajectories
before and after adaptation for a few goals.

    OMP_NUM_THREADS=1 python benchmarks/nav2d_maml_rl.py --minutes 12
    OMP_NUM_THREADS=1 python benchmarks/nav2d_maml_rl.py --minutes 12 --outer optimizer --tag adam

Writes benchmarks/results/nav2d_maml_rl[_<tag>].{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lightning_meta.algorithms import MAMLRL
from lightning_meta.callbacks import CPUTimeBudget
from lightning_meta.cli import run_cli
from lightning_meta.data.rl import TaskSpecStream
from lightning_meta.data.sampler import TEST

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

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        m = trainer.callback_metrics
        if "val/return" in m:
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

    family = model.family
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=12.0, help="meta-training budget in CPU minutes")
    parser.add_argument("--wall-minutes", type=float, default=45.0, help="wall-clock backstop")
    parser.add_argument("--max-steps", type=int, default=500)
    parser.add_argument("--outer", choices=("trpo", "optimizer"), default="trpo")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam's lr when --outer optimizer")
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", default="logs/bench_nav2d_maml_rl")
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
            str(REPO / "configs/nav2d/maml_rl.yaml"),
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_checkpointing=false",
            f"--trainer.max_time={budget}",
            f"--trainer.max_steps={args.max_steps}",
            f"--trainer.default_root_dir={args.out}",
            "--test_after_fit=false",
            *extra,
        ],
        run=False,
    )
    cli.trainer.callbacks.append(curve)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    train_seconds, train_cpu = time.perf_counter() - start, curve.cpu_used()
    (metrics,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    model: MAMLRL = cli.model
    iterations = model.global_step

    def cell(key: str) -> str:
        return f"{metrics[key]:.2f} ± {metrics[key + '_ci95']:.2f}"

    suffix = f"_{args.tag}" if args.tag else ""
    results = REPO / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    png = results / f"nav2d_maml_rl{suffix}.png"
    plot_trajectories(model, png)
    outer = "TRPO (max KL 0.01)" if args.outer == "trpo" else f"Adam (lr {args.lr})"
    lines = [
        f"MAML-RL, 2D navigation, {int(metrics['test/tasks'])} held-out goals (test stream), 20 trajectories "
        f"per goal, mean episode return (H = 100) ± 95% CI; outer step {outer}",
        "",
        "| policy | return |",
        "|---|---|",
        f"| MAML-RL before adaptation (θ) | {cell('test/return_before')} |",
        f"| MAML-RL after one VPG step (θ') | {cell('test/return')} |",
        f"| stand still | {cell('test/baseline/stand_still')} |",
        f"| oracle (max move towards the goal) | {cell('test/baseline/oracle')} |",
        "",
        f"Meta-training: {iterations} meta-iterations × 20 tasks × (20 + 20) trajectories in "
        f"{train_cpu / 60:.1f} CPU minutes (budget {args.minutes:g}; {train_seconds / 60:.1f} min wall on this "
        f"shared, contended CPU), 1 thread; {PAPER}.",
    ]
    text = "\n".join(lines)
    print(text)
    (results / f"nav2d_maml_rl{suffix}.md").write_text(text + "\n")
    payload = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "outer": args.outer,
        "iterations": iterations,
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "train_curve": curve.train,
        "val_curve": curve.val,
    }
    (results / f"nav2d_maml_rl{suffix}.json").write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
