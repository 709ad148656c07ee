"""RL² against Duan et al. (2016) Tables 1-2 and in-house baselines, on a CPU budget.

Meta-trains RL² through the real CLI (configs/bandit/rl2.yaml or configs/mdp/rl2.yaml) for a
budget of CPU time of this process (`--minutes`; the machine is shared, so a wall-clock budget
would measure the other jobs as much as this one), with a wall-clock backstop (`--wall-minutes`),
then scores it on the config's 1000 fixed seeded test tasks beside the
baselines rolled out on the same tasks and trial noise. UCB1's constant is tuned on 1000
separate tasks (the validation stream) before it is scored on the test tasks.

    OMP_NUM_THREADS=1 python benchmarks/bandit_rl2.py --family bandit --minutes 12
    OMP_NUM_THREADS=1 python benchmarks/bandit_rl2.py --family bandit --pulls 100 --minutes 12
    OMP_NUM_THREADS=1 python benchmarks/bandit_rl2.py --family mdp --minutes 12
    OMP_NUM_THREADS=1 python benchmarks/bandit_rl2.py --family bandit --pulls 100 --minutes 25 \
        --config configs/bandit/rl2_n100.yaml

(Before the CPU-time budget, `--minutes` set `trainer.max_time`, a wall-clock budget: the README's
RL² tables were measured that way.)

Prints a Markdown table (method, mean trial return ± 95% CI, the paper's number where it gives
one) and writes it to benchmarks/results/rl2_<family>[_n<pulls>].md (and .json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lightning_meta.algorithms import RL2
from lightning_meta.algorithms.base import mean_and_ci95
from lightning_meta.callbacks import CPUTimeBudget
from lightning_meta.cli import run_cli
from lightning_meta.data.rl import TaskSpecStream
from lightning_meta.data.sampler import TEST, VAL
from lightning_meta.envs import BernoulliBandit
from lightning_meta.envs import baselines as B

REPO = Path(__file__).resolve().parents[1]
# Duan et al. 2016, Table 1 (bandits, k = 5) and Table 2 (tabular MDPs, n = 10 episodes); only
# the entries the issue quotes.
PAPER = {
    ("bandit", 10): {"RL²": 6.7, "Gittins": 6.6},
    ("bandit", 100): {"RL²": 78.7, "Gittins": 78.3, "thompson": 74.7},
    ("mdp", 10): {"RL²": 156.2, "random": 100.1},
}
UCB_CONSTANTS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)


def tune_ucb1(family: BernoulliBandit, tasks: int, seed: int) -> float:
    """The UCB1 constant of highest mean return on `tasks` validation-stream tasks."""
    spec = TaskSpecStream(family, seed, VAL)[tuple(range(tasks))]
    scores = {c: B.ucb1(family, spec.tasks, spec.noise, c=c).mean().item() for c in UCB_CONSTANTS}
    return max(scores, key=scores.get)


def per_task_returns(model: RL2) -> dict[str, list[float]]:
    """Each test task's trial return for RL² (`rl2`) and every baseline from the `trainer.test` just
    run (`eval_per_task`: what its metrics average), for paired differences, in which the
    task-to-task spread (how good the best arm is) cancels."""
    stats = model.eval_per_task
    rows = {"rl2": stats["return"].tolist()}
    rows.update({k.removeprefix("baseline/"): v.tolist() for k, v in stats.items() if k.startswith("baseline/")})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("bandit", "mdp"), default="bandit")
    parser.add_argument("--pulls", type=int, default=10, help="bandit pulls per trial (n)")
    parser.add_argument("--minutes", type=float, default=12.0, help="meta-training budget, CPU minutes of this process")
    parser.add_argument("--wall-minutes", type=float, default=None, help="wall-clock backstop (default: 3 × --minutes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default=None, help="the RL² config (default: configs/<family>/rl2.yaml)")
    parser.add_argument("--out", default="logs/bench_rl2")
    parser.add_argument(
        "--results", default=None, help="default: benchmarks/results/rl2_<family>[_n<pulls>] (.md and .json)"
    )
    args = parser.parse_args()

    config = Path(args.config).resolve() if args.config else REPO / "configs" / args.family / "rl2.yaml"
    wall_minutes = args.wall_minutes if args.wall_minutes is not None else 3 * args.minutes
    budget = time.strftime("00:%H:%M:%S", time.gmtime(wall_minutes * 60))
    cli_args = [
        "--config",
        str(config),
        f"--seed_everything={args.seed}",
        f"--trainer.max_time={budget}",
        "--trainer.max_steps=-1",
        "--trainer.logger=[{class_path: pytorch_lightning.loggers.CSVLogger, init_args: {save_dir: " + args.out + "}}]",
        "--trainer.enable_progress_bar=false",
        f"--checkpoint.dirpath={args.out}/checkpoints",
        "--test_after_fit=false",
    ]
    if args.family == "bandit":
        for side in ("model", "data"):
            cli_args.append(f"--{side}.init_args.family.init_args.pulls={args.pulls}")
    torch.set_num_threads(1)
    start = time.perf_counter()
    cpu = CPUTimeBudget(args.minutes * 60)
    cli = run_cli(cli_args, run=False)
    cli.trainer.callbacks.append(cpu)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    train_cpu, train_wall = cpu.cpu_used(), cpu.wall_used()
    # The final weights, as `--test_after_fit` does.
    cli.trainer.test(cli.model, datamodule=cli.datamodule)
    wall = time.perf_counter() - start
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    model, data = cli.model, cli.datamodule
    rollouts, steps = cli.trainer.fit_loop.total_batch_idx + 1, cli.trainer.global_step

    per_task = per_task_returns(model)
    rows = [("RL² (this run)", metrics["test/return"], metrics["test/return_ci95"])]
    names = [k.split("/")[-1] for k in metrics if k.startswith("test/baseline/") and not k.endswith("_ci95")]
    rows += [(name, metrics[f"test/baseline/{name}"], metrics[f"test/baseline/{name}_ci95"]) for name in names]
    if isinstance(model.family, BernoulliBandit):
        c = tune_ucb1(model.family, 1000, data.eval_seed)
        test = TaskSpecStream(model.family, data.eval_seed, TEST)[tuple(range(data.test_tasks))]
        tuned = B.ucb1(model.family, test.tasks, test.noise, c=c)
        per_task["ucb1_tuned"] = tuned.tolist()
        mean, ci = mean_and_ci95(tuned)
        rows.append((f"ucb1 (c = {c} tuned on 1000 val tasks)", mean.item(), ci.item()))
    key = (args.family, args.pulls if args.family == "bandit" else 10)
    paper = PAPER.get(key, {})
    lines = [
        f"{model.family!r} ({config.relative_to(REPO) if config.is_relative_to(REPO) else config}): RL² meta-trained "
        f"{train_cpu / 60:.1f} CPU min (budget {args.minutes:g} CPU min, backstop {wall_minutes:g} min wall) in "
        f"{train_wall / 60:.1f} min wall; {time.process_time() / 60:.1f} CPU min in all (incl. test), one process, "
        f"on a shared CPU, "
        f"{rollouts} rollouts × {data.tasks_per_batch} trials, {steps} PPO optimizer steps; "
        f"{data.test_tasks} test tasks",
        "",
        "| method | mean trial return ± 95% CI | Duan et al. 2016 |",
        "|---|---|---|",
    ]
    for name, mean, ci in rows:
        ref = paper.get("RL²" if name.startswith("RL²") else name, "")
        lines.append(f"| {name} | {mean:.2f} ± {ci:.2f} | {ref} |")
    for name, value in paper.items():
        if name not in ("RL²", *names):
            lines.append(f"| {name} (not run here) | | {value} |")
    lines += ["", f"RL² first episode {metrics['test/return_first']:.2f}, last {metrics['test/return_last']:.2f}"]
    rl2 = torch.tensor(per_task["rl2"])
    lines += [
        "",
        "Paired on the same test tasks and noise (RL² − method, per-task trial returns, mean ± 95% CI):",
        "",
        "| difference | trial return |",
        "|---|---|",
    ]
    for name, values in per_task.items():
        if name != "rl2":
            mean, ci = mean_and_ci95(rl2 - torch.tensor(values))
            lines.append(f"| RL² − {name} | {mean.item():+.2f} ± {ci.item():.2f} |")
    print("\n" + "\n".join(lines))
    suffix = f"_n{args.pulls}" if args.family == "bandit" else ""
    default = REPO / "benchmarks" / "results" / f"rl2_{args.family}{suffix}"
    out = Path(args.results or default).with_suffix(".md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + f"\n\n`{' '.join(['python benchmarks/bandit_rl2.py', *sys.argv[1:]])}`\n")
    record = {
        "family": repr(model.family),
        "config": str(config),
        "budget_cpu_minutes": args.minutes,
        "backstop_wall_minutes": wall_minutes,
        "train_cpu_minutes": train_cpu / 60,
        "train_wall_minutes": train_wall / 60,
        "wall_minutes": wall / 60,
        "cpu_minutes": time.process_time() / 60,
        "rollouts": rollouts,
        "optimizer_steps": steps,
        "rows": [{"method": name, "mean": mean, "ci95": ci} for name, mean, ci in rows],
        "paper": paper,
        "per_task": per_task,
        "command": " ".join(["python benchmarks/bandit_rl2.py", *sys.argv[1:]]),
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out} and its .json")


if __name__ == "__main__":
    main()
