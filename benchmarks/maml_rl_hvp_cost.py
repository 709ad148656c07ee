"""What TRPO's metric costs in MAML-RL: CPU ms per conjugate-gradient solve (the set-up plus
`cg_iters` Hessian-vector products of the mean KL taken *through the inner step*), computed two
ways on the same meta-batch:

- third order: differentiate the KL's gradient (built with `create_graph` through the inner VPG
  step) again, per product (the way MAML-RL's TRPO is usually written, e.g. the original rllab
  code and learn2learn's MAML-TRPO example);
- J F J: `MAMLRL.kl_hvp`, Σ_i J_i F_i J_i v (exact at the current parameters: the two agree to
  float64 rounding, tests/test_maml_rl.py): backward passes through each task's second-order
  inner step and a Fisher-vector product on the post-update data, no third derivatives.

Also the whole TRPO meta-iteration (`training_step`: rollouts, inner steps, gradient, CG, line
search) with each, since the rollouts and line search are the same work. The two are timed
alternately in one process, one thread, on the same data; the table gives the median (and min)
of `--repeats` each and their ratio. Sizes: the configs' (`configs/<family>/maml_rl.yaml`) or the
reduced HalfCheetah runs' (10 tasks × 10 trajectories).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/maml_rl_hvp_cost.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from lightning_meta.algorithms import MAMLRL
from lightning_meta.algorithms.maml_rl import average_over_ranks
from lightning_meta.algorithms.policy_gradient import conjugate_gradient
from lightning_meta.data import TaskSpecStream
from lightning_meta.data.sampler import TRAIN
from lightning_meta.envs import Navigation2D


def third_order_hvp(model: MAMLRL, theta: dict, per_task: list, post, old) -> Callable[[Tensor], Tensor]:
    """The reference: the KL's gradient through the inner step, differentiated again per product."""
    params = list(theta.values())
    stacked = {name: torch.stack([a[name] for a in per_task]) for name in theta}
    _, kl = model.surrogate(stacked, post, old)
    kl_grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(kl, params, create_graph=True)])

    def hvp(v: Tensor) -> Tensor:
        hv = torch.autograd.grad(kl_grad @ v, params, retain_graph=True)
        return average_over_ranks(torch.cat([h.reshape(-1) for h in hv]))

    return hvp


def families() -> dict[str, tuple[object, int, int]]:
    """name: (family, tasks, trajectories)."""
    out: dict[str, tuple[object, int, int]] = {"nav2d (config: 20 tasks × 20 traj., H 100)": (Navigation2D(), 20, 20)}
    try:
        from lightning_meta.envs import HalfCheetahVel

        out["HalfCheetah-Vel (reduced run: 10 tasks × 10 traj., H 200)"] = (HalfCheetahVel(), 10, 10)
    except ImportError as error:  # the mujoco extra
        print(f"HalfCheetah skipped: {error}")
    return out


def measure(family: object, tasks: int, trajectories: int, repeats: int, steps: int) -> str:
    """One table row: CG solves and whole meta-iterations, third order against J F J, alternately."""
    torch.manual_seed(0)
    action_clip = None if isinstance(family, Navigation2D) else 1.0
    model = MAMLRL(family, trajectories=trajectories, action_clip=action_clip).train()
    batch = TaskSpecStream(family, 0, TRAIN)[tuple(range(tasks))]
    theta, _, post, per_task = model.meta_batch_tasks(batch)
    stacked = {k: torch.stack([a[k] for a in per_task]) for k in theta}
    old = tuple(t.detach() for t in model.distribution({k: v.detach() for k, v in stacked.items()}, post.obs))
    loss, _ = model.surrogate(stacked, post, old)
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(theta.values()), retain_graph=True)])
    metrics = {
        "third": lambda: third_order_hvp(model, theta, per_task, post, old),
        "jfj": lambda: model.kl_hvp(theta, per_task, post, old),
    }
    solutions = {key: conjugate_gradient(make(), -grad, model.cg_iters) for key, make in metrics.items()}
    agree = ((solutions["third"] - solutions["jfj"]).norm() / solutions["third"].norm()).item()
    solve_ms: dict[str, list[float]] = {key: [] for key in metrics}
    for _ in range(repeats):
        for key, make in metrics.items():
            start = time.process_time()
            conjugate_gradient(make(), -grad, model.cg_iters)
            solve_ms[key].append(1e3 * (time.process_time() - start))

    # Whole meta-iterations: the model's own kl_hvp against it swapped for the third-order one.
    step_ms: dict[str, list[float]] = {key: [] for key in metrics}
    original = model.kl_hvp
    model.optimizers = lambda: torch.optim.SGD(model.parameters(), lr=0.0)  # time the step, leave θ
    model.log = lambda *a, **k: None
    for _ in range(steps):
        for key in step_ms:
            model.kl_hvp = original if key == "jfj" else partial(third_order_hvp, model)
            start = time.process_time()
            model.training_step(batch, 0)
            step_ms[key].append(1e3 * (time.process_time() - start))

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.0f} ms (min {min(values):.0f})"

    def ratio(values: dict[str, list[float]]) -> str:
        return f"{statistics.median(values['third']) / statistics.median(values['jfj']):.2f}×"

    return (
        f"{cell(solve_ms['third'])} | {cell(solve_ms['jfj'])} | {ratio(solve_ms)} | {cell(step_ms['third'])} "
        f"| {cell(step_ms['jfj'])} | {ratio(step_ms)} | {agree:.1e} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="CG solves timed per method")
    parser.add_argument("--steps", type=int, default=3, help="whole TRPO meta-iterations timed per method")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        "CPU ms of this process (one thread), median (min); the two methods alternate on the same meta-batch.\n\n"
        "| meta-batch | CG solve (10 HVPs), third order | J F J | ratio | TRPO meta-iteration, third order "
        "| J F J | ratio | CG solutions' relative difference (float32) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, (family, tasks, trajectories) in families().items():
        print(f"| {name} | {measure(family, tasks, trajectories, args.repeats, args.steps)}", flush=True)


if __name__ == "__main__":
    main()
