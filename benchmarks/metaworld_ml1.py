"""MAML-RL or PEARL on Meta-World ML1, scored by Meta-World's own protocol (`metaworld.evaluation`).

Meta-trains MAMLRL (`--algorithm maml_rl`, the default) or PEARL (`--algorithm pearl`) through the
real CLI (configs/metaworld_ml1/<algorithm>.yaml, sizes reduced by the flags below) for a CPU-time
budget on ML1's training goals, then scores it by Meta-World's meta-RL protocol (the adaptation
loop of `metaworld.evaluation.metalearning_evaluation`) on ML1's held-out test goals (Meta-World's
own test-split vector env, `lightning_meta.algorithms.metaworld_eval.score`), per goal and by
Meta-World's own statistic (which on ML1 counts the quickest successes: see `score`): the success
rate after adaptation on
`--adaptation-episodes` episodes per goal (MAML-RL: the learner's VPG step on sampled episodes;
PEARL: the mean of q(z | the (s, a, r) context of those episodes)), before it (the same protocol
with 0 adaptation steps: the meta-policy's mean action; PEARL: z = 0, the prior's mean), the same
two for the untrained initial learner, and uniformly random actions. Also measures the cost a
full-scale run needs: CPU ms per simulator step (the batched family) and, for MAML-RL, CPU seconds
per meta-iteration; for PEARL, its validation curve (returns before/after adaptation on held-out
goals) during training.

    OMP_NUM_THREADS=1 python benchmarks/metaworld_ml1.py --minutes 6
    OMP_NUM_THREADS=1 python benchmarks/metaworld_ml1.py --algorithm pearl --minutes 20 --tag pearl

Writes benchmarks/results/metaworld_ml1[_<tag>].{md,json}. The budget of this script's defaults is
far below the paper's: see the written report.

(A new script, not a generalisation of benchmarks/nav2d_maml_rl.py: another session is editing the
nav2d scripts; this one reuses its `Curve` callback, and nav2d_pearl.py's `CPUBudget`, by import.)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's lightning_meta, whatever is installed

from benchmarks.nav2d_maml_rl import Curve  # noqa: E402 (the CPU-budget curve callback, shared)
from benchmarks.nav2d_pearl import CPUBudget  # noqa: E402 (PEARL's: the budget and every validation)
from lightning_meta.algorithms.metaworld_eval import (  # noqa: E402
    MAMLRLAgent,
    PEARLAgent,
    RandomAgent,
    score,
    test_envs,
)
from lightning_meta.cli import run_cli  # noqa: E402


def step_cost(model: Any, tasks: int = 10, steps: int = 100) -> float:
    """CPU milliseconds per simulator step of the batched family (random actions, training goals)."""
    family = model.family
    batch = family.sample_tasks(tasks, np.random.default_rng(0))
    state = family.initial_state(batch)  # builds the simulators: not timed
    gen = torch.Generator().manual_seed(0)
    start = time.process_time()
    for _ in range(steps):
        state, _ = family.step(batch, state, torch.rand(tasks, family.num_actions, generator=gen) * 2 - 1, {})
    return (time.process_time() - start) / (tasks * steps) * 1000


def raw_step_cost(env_name: str, steps: int = 1000) -> float:
    """CPU milliseconds per step of Meta-World's own environment (the Gymnasium twin), for comparison."""
    from lightning_meta.envs.metaworld_gym import MetaWorldML1Env

    env = MetaWorldML1Env(env_name, horizon=500)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (steps, 4)).astype(np.float32)
    start = time.process_time()
    for t in range(steps):
        if t % 500 == 499:
            env.reset()
        env.step(actions[t])
    return (time.process_time() - start) / steps * 1000


ALGORITHMS = {"maml_rl": "MAML-RL", "pearl": "PEARL"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithm", choices=tuple(ALGORITHMS), default="maml_rl", help="configs/metaworld_ml1/")
    parser.add_argument("--env", default="reach-v3", help="the Meta-World v3 environment")
    parser.add_argument("--minutes", type=float, default=6.0, help="meta-training budget in CPU minutes")
    parser.add_argument("--wall-minutes", type=float, default=30.0, help="wall-clock backstop")
    parser.add_argument("--max-steps", type=int, default=None, help="MAML-RL: 300 meta-iterations; PEARL: none")
    parser.add_argument("--horizon", type=int, default=100, help="episode length (Meta-World: 500)")
    parser.add_argument(
        "--tasks-per-batch", type=int, default=None, help="goals per iteration (MAML-RL: 10 of 20; PEARL: 5 of 15)"
    )
    parser.add_argument("--trajectories", type=int, default=10, help="MAML-RL: episodes per goal for the inner step")
    parser.add_argument("--eval-envs", type=int, default=10, help="environments of the test vector env (20)")
    parser.add_argument("--num-evals", type=int, default=2, help="metalearning_evaluation rounds (10)")
    parser.add_argument("--adaptation-episodes", type=int, default=10, help="(10)")
    parser.add_argument("--evaluation-episodes", type=int, default=3, help="(3)")
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", default="logs/bench_metaworld_ml1")
    parser.add_argument(
        "overrides", nargs="*", help="extra CLI options after --, e.g. -- --trainer.val_check_interval=5"
    )
    args = parser.parse_args()
    pearl = args.algorithm == "pearl"
    if args.max_steps is None:
        args.max_steps = -1 if pearl else 300  # PEARL: the CPU budget ends it
    if args.tasks_per_batch is None:
        args.tasks_per_batch = 5 if pearl else 10
    return args


def build(args: argparse.Namespace) -> Any:
    """The CLI (not run) of configs/metaworld_ml1/<algorithm>.yaml at this script's sizes."""
    budget = time.strftime("00:%H:%M:%S", time.gmtime(args.wall_minutes * 60))
    family_args = [f"env_name={args.env}", f"horizon={args.horizon}"]
    parts = ("model.init_args", "data.init_args")
    overrides = [f"--{part}.family.init_args.{a}" for part in parts for a in family_args]
    if args.algorithm == "maml_rl":
        specific = [
            "--trainer.limit_val_batches=0",  # scored by Meta-World's protocol below instead
            f"--model.init_args.trajectories={args.trajectories}",
        ]
    else:  # PEARL validates (returns before/after adaptation on held-out goals): the training curve
        specific = []
    return run_cli(
        [
            "--config",
            str(REPO / f"configs/metaworld_ml1/{args.algorithm}.yaml"),
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_checkpointing=false",
            f"--trainer.max_time={budget}",
            f"--trainer.max_steps={args.max_steps}",
            f"--trainer.default_root_dir={args.out}",
            "--test_after_fit=false",
            f"--data.init_args.tasks_per_batch={args.tasks_per_batch}",
            *specific,
            *overrides,
            *args.overrides,
        ],
        run=False,
    )


def agents(args: argparse.Namespace, untrained: Any, model: Any) -> list[tuple[str, Any, int]]:
    """(row name, agent, adaptation steps) of each scored policy."""
    random = ("random actions", RandomAgent(args.eval_envs, seed=0), 0)
    if args.algorithm == "maml_rl":
        return [
            random,
            ("MAML-RL untrained, before adaptation", MAMLRLAgent(untrained, args.eval_envs, seed=0), 0),
            ("MAML-RL untrained, after 1 VPG step", MAMLRLAgent(untrained, args.eval_envs, seed=0), 1),
            ("MAML-RL trained, before adaptation (θ)", MAMLRLAgent(model, args.eval_envs, seed=0), 0),
            ("MAML-RL trained, after 1 VPG step (θ')", MAMLRLAgent(model, args.eval_envs, seed=0), 1),
        ]
    before, after = "before adaptation (z = 0, the prior's mean)", "after adaptation (z = the posterior mean)"
    return [
        random,
        (f"PEARL untrained, {before}", PEARLAgent(untrained, args.eval_envs, seed=0), 0),
        (f"PEARL untrained, {after}", PEARLAgent(untrained, args.eval_envs, seed=0), 1),
        (f"PEARL trained, {before}", PEARLAgent(model, args.eval_envs, seed=0), 0),
        (f"PEARL trained, {after}", PEARLAgent(model, args.eval_envs, seed=0), 1),
    ]


def pearl_lines(args: argparse.Namespace, cli: Any, curve: CPUBudget, train_cpu: float, wall: float) -> list[str]:
    """PEARL's training budget, its validation curve, and what differs from garage's settings."""
    model, data = cli.model, cli.datamodule
    steps = model.global_step // len(model.optimizers())
    collections = cli.trainer.fit_loop.epoch_loop._batches_that_stepped
    val = [
        f"| {v['gradient_steps']} | {v['cpu_seconds'] / 60:.1f} | {v['return_first']:.1f} | {v['return_last']:.1f} |"
        for v in curve.val
    ]
    return [
        f"Meta-training: {steps} gradient steps (meta-batch {model.meta_batch} goals × {model.batch_size} "
        f"transitions, context {model.context_batch}), {model.collected_steps} environment steps collected "
        f"({collections} training steps of {data.tasks_per_batch} goals × ({model.prior_episodes} prior + "
        f"{model.posterior_episodes} posterior) episodes of {args.horizon} steps, after {model.initial_episodes} "
        f"initial episodes on each of a pool of {data.train_pool} training goals), in {train_cpu / 60:.1f} CPU "
        f"minutes (budget {args.minutes:g}; {wall / 60:.1f} min wall on this shared, contended 2-core CPU), "
        "1 thread.",
        "",
        f"Validation during training ({data.val_tasks} fixed held-out goals, mean episode return of episode 1 "
        f"(z ~ N(0, I)) and episode {model.family.episodes} (z ~ q(z | the episodes before)), mean actions):",
        "",
        "| gradient steps | CPU min | return, episode 1 | return, last episode |",
        "|---|---|---|---|",
        *val,
    ]


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    name = ALGORITHMS[args.algorithm]
    pearl = args.algorithm == "pearl"
    curve = CPUBudget(args.minutes * 60) if pearl else Curve(args.minutes * 60)
    cli = build(args)
    model = cli.model
    untrained = copy.deepcopy(model)
    ms_per_step, raw_ms_per_step = step_cost(model), raw_step_cost(args.env)
    start = time.perf_counter()
    cli.trainer.callbacks.append(curve)
    cli.trainer.fit(model, datamodule=cli.datamodule)
    train_seconds, train_cpu = time.perf_counter() - start, curve.cpu_used()
    # MAML-RL: meta-iterations; PEARL: training steps (collections), not its 3 optimizer steps per gradient step
    iterations = cli.trainer.fit_loop.epoch_loop._batches_that_stepped if pearl else model.global_step
    per_iteration = train_cpu / max(iterations, 1)

    protocol = {
        "num_evals": args.num_evals,
        "adaptation_episodes": args.adaptation_episodes,
        "evaluation_episodes": args.evaluation_episodes,
    }
    rows: dict[str, dict[str, float]] = {}
    eval_start = time.process_time()
    model.eval()
    untrained.eval()
    for row, agent, steps in agents(args, untrained, model):
        envs = test_envs(args.env, args.eval_envs, args.horizon, seed=model.family.benchmark_seed)  # same goals
        rows[row] = score(agent, envs, adaptation_steps=steps, **protocol)
        envs.close()
        print(row, rows[row], flush=True)
    eval_cpu = time.process_time() - eval_start

    steps_per_iteration = args.tasks_per_batch * 2 * args.trajectories * args.horizon
    full_steps = 20 * 2 * 10 * 500
    lines = [
        f"{name} on Meta-World ML1 `{args.env}`, scored by Meta-World's meta-RL protocol (`metaworld_eval.score`) on "
        f"ML1's held-out test goals: {args.num_evals} round(s) × {args.eval_envs} environments, "
        f"{args.adaptation_episodes} adaptation episodes, {args.evaluation_episodes} evaluation episodes "
        f"(ending on success), episodes of {args.horizon} steps",
        "",
        "| policy | success rate, per goal | success rate, Meta-World's `evaluation` | mean episode return |",
        "|---|---|---|---|",
        *(
            f"| {row} | {r['success_rate']:.3f} | {r['metaworld_success_rate']:.3f} | {r['return']:.1f} |"
            for row, r in rows.items()
        ),
        "",
        "Per goal: each environment's first evaluation episodes, averaged over environments, then rounds. "
        "Meta-World's `evaluation` counts the first episodes to end per task name, and on ML1 every "
        "environment has the same one: the quickest successes (lightning_meta.algorithms.metaworld_eval).",
        "",
    ]
    if pearl:
        lines += [
            *pearl_lines(args, cli, curve, train_cpu, train_seconds),
            "",
            f"Evaluation {eval_cpu / 60:.1f} CPU minutes. Cost: {ms_per_step:.3f} CPU ms per simulator step "
            f"(batched family, 10 goals; Meta-World's own environment stepped directly: {raw_ms_per_step:.3f}).",
        ]
    else:
        lines += [
            f"Meta-training: {iterations} meta-iterations × {args.tasks_per_batch} goals × ({args.trajectories} + "
            f"{args.trajectories}) episodes × {args.horizon} steps in {train_cpu / 60:.1f} CPU minutes (budget "
            f"{args.minutes:g}; {train_seconds / 60:.1f} min wall on this shared, contended CPU), 1 thread; "
            f"evaluation {eval_cpu / 60:.1f} CPU minutes.",
            f"Cost: {ms_per_step:.3f} CPU ms per simulator step (batched family, 10 goals; Meta-World's own "
            f"environment stepped directly: {raw_ms_per_step:.3f}); "
            f"{per_iteration:.1f} CPU s per meta-iteration here ({steps_per_iteration} steps). The reference "
            f"settings (20 goals × (10 + 10) episodes × 500 steps = {full_steps} steps per iteration) need "
            f"≈ {full_steps * ms_per_step / 1000 / 60:.1f} CPU minutes of stepping per iteration, "
            f"≈ {300 * full_steps * ms_per_step / 1000 / 3600:.1f} CPU hours for garage's 300 iterations.",
        ]
    command = " ".join(["OMP_NUM_THREADS=1", "python", *sys.argv])
    protocol_text = (
        f"{args.num_evals} evaluation round(s) of {args.eval_envs} environments "
        "(`metalearning_evaluation`'s defaults: 10 rounds, and Meta-World's test env has 20)"
    )
    if pearl:
        differs = (
            "What differs from the paper's protocol, on purpose (a pipeline check, not a reproduction): the budget "
            "is minutes of one shared CPU core where garage's PEARL ML1 example runs 1000 epochs of 4000 gradient "
            f"steps; episodes are {args.horizon} steps (Meta-World: 500) in training and evaluation; {protocol_text}; "
            "the network, batch and collection sizes are reduced as configs/metaworld_ml1/pearl.yaml's header "
            "lists. `reach-v3` is the easiest ML1 environment."
        )
    else:
        differs = (
            "What differs from the paper's protocol, on purpose (a pipeline check, not a reproduction): the budget "
            "is minutes of one shared CPU core where the paper-scale run is the hours above; episodes are "
            f"{args.horizon} steps (Meta-World: 500) in training and evaluation; {args.tasks_per_batch} goals per "
            f"meta-iteration (reference 20); {protocol_text}. The policy is "
            "MAMLRL's ReLU MLP (garage's example: tanh) with the linear feature baseline."
        )
    lines = [
        f"# {name} on Meta-World ML1: a pipeline check on a small CPU budget",
        "",
        f"    {command}",
        "",
        *lines,
        "",
        differs,
        "",
        "The return column is the mean episode return (per goal) over evaluation episodes that end on success, "
        "so a policy that succeeds sooner collects less: compare the success rates.",
    ]
    text = "\n".join(lines)
    print(text)
    suffix = f"_{args.tag}" if args.tag else ""
    results = REPO / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": command,
        "args": vars(args),
        "iterations": iterations,
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu,
        "eval_cpu_seconds": eval_cpu,
        "cpu_ms_per_env_step": ms_per_step,
        "cpu_ms_per_raw_metaworld_step": raw_ms_per_step,
        "cpu_seconds_per_iteration": per_iteration,
        "scores": rows,
    }
    if pearl:
        payload |= {
            "gradient_steps": model.global_step // len(model.optimizers()),
            "env_steps": model.collected_steps,
            "validation": curve.val,
        }
    else:
        payload["train_curve"] = curve.train
    (results / f"metaworld_ml1{suffix}.json").write_text(json.dumps(payload, indent=1) + "\n")
    (results / f"metaworld_ml1{suffix}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
