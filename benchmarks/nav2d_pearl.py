"""PEARL on 2D navigation, HalfCheetah-Vel/Dir or Ant-Dir, reduced budget: return before and after adaptation.

Meta-trains PEARL through the real CLI (configs/<family>/pearl.yaml) for a CPU-time budget, then
rolls out the config's 40 fixed seeded test tasks (held out: the test stream, disjoint from the
pool of training tasks) for 3 episodes each: episode 1 with z ~ N(0, I) (before adaptation),
episode 2 with z ~ q(z | episode 1), episode 3 with z ~ q(z | episodes 1-2). Beside it, on the
same tasks, the family's baselines per episode (2D navigation: standing still and the
straight-to-goal oracle; MuJoCo families: zero and uniformly random actions).

    OMP_NUM_THREADS=1 python benchmarks/nav2d_pearl.py --minutes 15
    OMP_NUM_THREADS=1 python benchmarks/nav2d_pearl.py --family cheetah_vel --minutes 30
    OMP_NUM_THREADS=1 python benchmarks/nav2d_pearl.py --family cheetah_dir --minutes 20
    OMP_NUM_THREADS=1 python benchmarks/nav2d_pearl.py --family ant_dir --minutes 25

The budget is CPU time of this process (the machine is shared, so a wall-clock budget would
measure the other jobs as much as this one), with a wall-clock backstop (`--wall-minutes`).

Prints a Markdown table (mean episode return ± 95% CI) and writes
benchmarks/results/<family>_pearl.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lightning_meta.algorithms.base import mean_and_ci95
from lightning_meta.callbacks import CPUTimeBudget
from lightning_meta.cli import run_cli
from lightning_meta.data.rl import TaskSpecStream
from lightning_meta.data.sampler import TEST
from lightning_meta.envs import baselines as B

REPO = Path(__file__).resolve().parents[1]


class CPUBudget(CPUTimeBudget):
    """The CPU-time budget, recording each validation."""

    def __init__(self, cpu_seconds: float) -> None:
        super().__init__(cpu_seconds)
        self.val: list[dict[str, float]] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        # Not on_validation_epoch_end: Lightning calls the callbacks' epoch-end hook before the
        # module's, which logs the metrics, so it would read the previous validation's.
        m = trainer.callback_metrics
        if not trainer.sanity_checking and "val/return_first" in m:
            self.val.append(
                {
                    "gradient_steps": trainer.global_step // len(pl_module.optimizers()),
                    "cpu_seconds": self.cpu_used(),
                    "wall_seconds": self.wall_used(),
                    "return_first": float(m["val/return_first"]),
                    "return_last": float(m["val/return_last"]),
                }
            )


def fmt(values: torch.Tensor) -> tuple[str, float, float]:
    mean, ci = mean_and_ci95(values.double())
    return f"{mean.item():.2f} ± {ci.item():.2f}", mean.item(), ci.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--family",
        choices=("nav2d", "cheetah_vel", "cheetah_dir", "ant_dir"),
        default="nav2d",
        help="configs/<family>/",
    )
    parser.add_argument("--minutes", type=float, default=15.0, help="meta-training budget, CPU minutes of this process")
    parser.add_argument("--wall-minutes", type=float, default=35.0, help="wall-clock backstop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="default: logs/bench_<family>_pearl")
    parser.add_argument("--results", default=None, help="default: benchmarks/results/<family>_pearl")
    parser.add_argument(
        "overrides", nargs="*", help="extra CLI options after --, e.g. -- --model.init_args.gradient_steps=100"
    )
    args = parser.parse_args()
    out = args.out or f"logs/bench_{args.family}_pearl"
    results_path = args.results or str(REPO / f"benchmarks/results/{args.family}_pearl")
    budget = time.strftime("00:%H:%M:%S", time.gmtime(args.wall_minutes * 60))
    torch.set_num_threads(1)
    start = time.perf_counter()
    cpu = CPUBudget(args.minutes * 60)
    cli = run_cli(
        [
            "--config",
            str(REPO / f"configs/{args.family}/pearl.yaml"),
            f"--seed_everything={args.seed}",
            f"--trainer.max_time={budget}",
            "--trainer.max_steps=-1",
            "--trainer.logger=[{class_path: pytorch_lightning.loggers.CSVLogger, init_args: {save_dir: " + out + "}}]",
            "--trainer.enable_progress_bar=false",
            f"--checkpoint.dirpath={out}/checkpoints",
            "--test_after_fit=false",
            *args.overrides,
        ],
        run=False,
    )
    cli.trainer.callbacks.append(cpu)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    wall, train_cpu = time.perf_counter() - start, cpu.cpu_used()
    model, data = cli.model, cli.datamodule
    family = model.family
    spec = TaskSpecStream(family, data.eval_seed, TEST)[tuple(range(data.test_tasks))]
    model.eval()
    episodes = model.episode_returns(spec).cpu()  # [tasks, episodes]
    rows = [
        ("PEARL, episode 1: z ~ prior (before adaptation)", episodes[:, 0]),
        ("PEARL, episode 2: z ~ q(z \\| 1 episode)", episodes[:, 1]),
        ("PEARL, episode 3: z ~ q(z \\| 2 episodes)", episodes[:, 2]),
    ]
    for name, run in B.baselines(family).items():  # trial returns: per episode, as PEARL's rows
        rows.append((B.LABELS[name], run(spec.tasks, spec.noise) / family.episodes))
    steps = model.global_step // len(model.optimizers())
    header = (
        f"PEARL on {type(family).__name__} (H = {family.horizon}), {data.test_tasks} held-out tasks, "
        "mean episode return ± 95% CI; "
        f"training {train_cpu / 60:.1f} CPU minutes (budget {args.minutes:g}; {wall / 60:.1f} min wall on a shared "
        "2-core CPU, one process, OMP_NUM_THREADS=1), "
        f"{steps} gradient steps, {model.collected_steps} environment steps collected, "
        f"{cli.trainer.fit_loop.epoch_loop._batches_that_stepped} training steps of {data.tasks_per_batch} tasks "
        f"from a pool of {data.train_pool}"
    )
    if args.overrides:
        header += "; overrides: " + " ".join(args.overrides)
    lines = [header, "", "| method | mean episode return ± 95% CI |", "|---|---|"]
    results = {
        "overrides": args.overrides,
        "train_cpu_minutes": train_cpu / 60,
        "wall_minutes": wall / 60,
        "gradient_steps": steps,
        "env_steps": model.collected_steps,
        "validation": cpu.val,
        "rows": {},
    }
    for name, values in rows:
        text, mean, ci = fmt(values)
        lines.append(f"| {name} | {text} |")
        results["rows"][name] = {"mean": mean, "ci95": ci}
    table = "\n".join(lines)
    print(table)
    Path(results_path).parent.mkdir(parents=True, exist_ok=True)
    Path(results_path + ".md").write_text(table + "\n")
    Path(results_path + ".json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
