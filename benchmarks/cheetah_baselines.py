"""Zero-action and random-action returns on the MuJoCo locomotion families (the `mujoco` extra).

The floor any meta-RL agent's HalfCheetah-Vel / HalfCheetah-Dir / Ant-Dir return is compared
against: each baseline rolled out on the same fixed seeded tasks as the configs' test tasks
(`RLTaskDataModule`'s TEST stream, seed 0: task i is the same here and in every fit), one
episode of H = 200 steps each (the papers' horizon; a trial of several episodes scores the sum).

    OMP_NUM_THREADS=1 python benchmarks/cheetah_baselines.py --tasks 40

Prints a Markdown table (family, baseline, mean episode return ± 95% CI over tasks, wall time)
and writes it to benchmarks/results/cheetah_baselines.md.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import gymnasium
import mujoco
import torch

from lightning_meta.algorithms.base import mean_and_ci95
from lightning_meta.data.rl import TaskSpecStream
from lightning_meta.data.sampler import TEST
from lightning_meta.envs import AntDir, HalfCheetahDir, HalfCheetahVel
from lightning_meta.envs import baselines as B

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--horizon", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="the task stream's seed (the configs' eval_seed)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cheetah_baselines.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    rows, start = [], time.perf_counter()
    for family in (HalfCheetahVel(args.horizon), HalfCheetahDir(args.horizon), AntDir(args.horizon)):
        spec = TaskSpecStream(family, args.seed, TEST)[tuple(range(args.tasks))]
        for name, run in B.baselines(family).items():
            t0 = time.perf_counter()
            returns = run(spec.tasks, spec.noise).double()
            seconds = time.perf_counter() - t0
            mean, ci = mean_and_ci95(returns)
            per_step = seconds / (args.tasks * args.horizon) * 1e6
            rows.append(
                f"| {type(family).__name__} | {name} | {mean:.2f} ± {ci:.2f}"
                f" | {returns.min():.2f} … {returns.max():.2f} | {seconds:.1f} s ({per_step:.0f} µs/step) |"
            )
            print(rows[-1], flush=True)
    total = time.perf_counter() - start
    table = "\n".join(
        [
            f"Zero- and random-action baselines, {args.tasks} fixed test tasks (stream seed {args.seed}), "
            f"one episode of H = {args.horizon} steps each; mean episode return ± 95% CI over tasks.",
            "",
            "| family | baseline | return ± 95% CI | min … max over tasks | wall time |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"Command: `OMP_NUM_THREADS=1 python benchmarks/cheetah_baselines.py --tasks {args.tasks}"
            f" --horizon {args.horizon} --seed {args.seed}`; total wall time {total:.1f} s, one process, one"
            f" thread, on this project's shared 2-core CPU (contended: times are indicative only).",
            f"MuJoCo {mujoco.__version__}, Gymnasium {gymnasium.__version__}, torch {torch.__version__},"
            f" Python {platform.python_version()}.",
            "",
        ]
    )
    print()
    print(table)
    Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
