"""MAML and first-order MAML at Omniglot 5-way 1-shot: validation accuracy against meta-steps for
several inner learning rates, each run through the real CLI from its config.

Why: the papers' inner lr 0.4 is in the units of Finn et al.'s code (per-example losses summed
and divided by K: N times the mean cross-entropy used here) on their own network; on this
Conv4 with mean cross-entropy it overshoots. This script measures the curves that say so, and
draws them (README, "MAML's inner learning rate at 5-way").

    python benchmarks/maml_inner_lr.py --runs fomaml:0.1 fomaml:0.4 maml:0.1 --steps 600
    python benchmarks/maml_inner_lr.py --plot-only     # redraw from benchmarks/results/maml_inner_lr.json

Each run: `--data.tasks_per_batch 8` (not the paper's 32, to fit a CPU budget), validation on 100
fixed tasks every `--val-every` steps with the config's 3 inner steps, one torch thread, W&B off,
no checkpoints. Runs are independent processes; `--parallel 2` runs two at a time (one per core).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
LABELS = {"maml": "MAML", "fomaml": "first-order MAML", "anil": "ANIL"}


def read_curve(metrics_csv: Path) -> list[tuple[int, float]]:
    """(step, validation accuracy %) rows of a CSVLogger `metrics.csv`."""
    points = []
    with metrics_csv.open() as f:
        for row in csv.DictReader(f):
            if row.get("val/acc"):
                points.append((int(row["step"]), 100 * float(row["val/acc"])))
    return points


def command(config: str, inner_lr: float, args: argparse.Namespace) -> list[str]:
    return [
        sys.executable, "-m", "lightning_meta", "fit",
        "--config", str(REPO / "configs" / "omniglot_5w1s" / f"{config}.yaml"),
        "--model.init_args.inner_lr", str(inner_lr),
        "--data.tasks_per_batch", str(args.tasks),
        "--trainer.max_steps", str(args.steps),
        "--trainer.val_check_interval", str(args.val_every),
        "--data.val_tasks", str(args.val_tasks),
        "--test_after_fit", "false",
        "--trainer.enable_checkpointing", "false",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger", "pytorch_lightning.loggers.CSVLogger",
        "--trainer.logger.save_dir", "logs",
    ]  # fmt: skip


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, run in results["runs"].items():
        steps, accs = zip(*run["curve"], strict=True)
        ax.plot(steps, accs, marker="o", label=name)
    ax.set_xlabel(f"meta-steps ({results['tasks']} tasks each)")
    ax.set_ylabel("validation accuracy % (100 tasks, 3 inner steps)")
    ax.set_title("Omniglot 5-way 1-shot, Conv4 (max-pool), mean cross-entropy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["fomaml:0.1", "fomaml:0.4", "maml:0.1"], help="config:inner_lr")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--val-every", type=int, default=100)
    parser.add_argument("--val-tasks", type=int, default=100)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--name", default="maml_inner_lr", help="results file stem under --out")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out / f"{args.name}.json", args.out / f"{args.name}.png"
    if args.plot_only:
        plot(json.loads(json_path.read_text()), png_path)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    env.setdefault("LIGHTNING_META_DATA", str(REPO.parent / "shared" / "data"))
    results = {"tasks": args.tasks, "steps": args.steps, "val_tasks": args.val_tasks, "runs": {}}
    pending = [run.split(":") for run in args.runs]
    with tempfile.TemporaryDirectory() as tmp:
        while pending:
            batch, pending = pending[: args.parallel], pending[args.parallel :]
            procs = []
            for config, lr in batch:
                workdir = Path(tmp) / f"{config}_{lr}"
                workdir.mkdir()
                log = (workdir / "run.log").open("w")
                cmd = command(config, float(lr), args)
                procs.append((config, lr, workdir, subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=log)))
            for config, lr, workdir, proc in procs:
                if proc.wait() != 0:
                    sys.exit(f"{config} at inner lr {lr} failed:\n{(workdir / 'run.log').read_text()[-3000:]}")
                curve = read_curve(next(workdir.glob("logs/**/metrics.csv")))
                name = f"{LABELS.get(config, config)}, inner lr {lr}"
                results["runs"][name] = {
                    "config": f"configs/omniglot_5w1s/{config}.yaml",
                    "inner_lr": float(lr),
                    "curve": curve,
                }
                print(name, " ".join(f"{s}:{a:.1f}" for s, a in curve), flush=True)
    json_path.write_text(json.dumps(results, indent=1))
    plot(results, png_path)


if __name__ == "__main__":
    main()
