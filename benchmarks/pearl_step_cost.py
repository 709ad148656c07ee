"""Cost of one PEARL gradient step at oyster's full scale (HalfCheetah-Vel shapes) and at the
reduced nav2d config's scale, measured in the same process, to size a full-scale run.

Full scale: actor and critics 300 × 3, encoder 200 × 3, latent 5, meta-batch 16 tasks × 256
transitions, context 100 per task, observation 17 and action 6 (HalfCheetah-v5's sizes; the
dynamics are not stepped: replay buffers are filled with random transitions, so this needs no
MuJoCo). Reduced: configs/nav2d/pearl.yaml's sizes.

    OMP_NUM_THREADS=1 python benchmarks/pearl_step_cost.py [--device cuda] [--steps 20]

Prints wall and CPU milliseconds per gradient step and what 1M steps (oyster's 500 iterations ×
2000) cost at that rate (CPU time on a CPU, wall time on a GPU).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from lightning_meta.algorithms import PEARL
from lightning_meta.envs.families import Noise, TaskFamily, Tasks


class ShapeOnly(TaskFamily):
    """A continuous family with the given sizes; never stepped here."""

    discrete = False

    def __init__(self, obs_dim: int, actions: int) -> None:
        super().__init__(episodes=1, horizon=1)
        self.obs_dim, self.num_actions = obs_dim, actions

    def sample_tasks(self, n: int, rng: np.random.Generator) -> Tasks:
        return {"x": torch.zeros(n)}

    def sample_noise(self, n: int, rng: np.random.Generator) -> Noise:
        return {}

    def observe(self, tasks: Tasks, state: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step(
        self, tasks: Tasks, state: torch.Tensor, action: torch.Tensor, noise: Noise
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


SCALES = {
    "oyster full (HalfCheetah-Vel)": (
        ShapeOnly(17, 6),
        {"hidden_size": 300, "layers": 3, "encoder_hidden_size": 200, "encoder_layers": 3}
        | {"meta_batch": 16, "batch_size": 256, "context_batch": 100, "learn_alpha": False},
    ),
    "reduced (configs/nav2d/pearl.yaml)": (
        ShapeOnly(2, 2),
        {"hidden_size": 64, "layers": 2, "encoder_hidden_size": 64, "encoder_layers": 2}
        | {"meta_batch": 8, "batch_size": 64, "context_batch": 64},
    ),
}


def ms_per_step(family: ShapeOnly, sizes: dict, device: str, steps: int) -> tuple[float, float]:
    torch.manual_seed(0)
    model = PEARL(family, **sizes).to(device)
    gen = torch.Generator().manual_seed(0)
    for slot in range(sizes["meta_batch"]):
        n = 2000
        data = {
            "obs": torch.randn(n, family.obs_dim, generator=gen),
            "action": torch.rand(n, family.num_actions, generator=gen) * 2 - 1,
            "reward": torch.randn(n, generator=gen),
            "next_obs": torch.randn(n, family.obs_dim, generator=gen),
        }
        model.replay[slot] = {k: v.to(device) for k, v in data.items()}
        model.context[slot] = {k: v.to(device) for k, v in data.items()}
    optimizers = [torch.optim.Adam(g, lr=3e-4) for g in (p.parameters() for p in (model.encoder, model.policy))]
    optimizers.append(torch.optim.Adam([*model.q1.parameters(), *model.q2.parameters()], lr=3e-4))
    slots = list(range(sizes["meta_batch"]))

    def step() -> None:
        loss, _ = model.sac_loss(*model.gradient_batch(slots))
        for opt in optimizers:
            opt.zero_grad()
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.update_targets()

    for _ in range(3):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3, (time.process_time() - cpu_start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    # On a shared CPU the wall time measures the other jobs too: the CPU time of this process is
    # the cost; on a GPU the wall time is.
    print(
        f"| scale | ms per gradient step, wall ({args.device}) | CPU ms of this process "
        "| 1M gradient steps at that cost |"
    )
    print("|---|---|---|---|")
    for name, (family, sizes) in SCALES.items():
        wall, cpu = ms_per_step(family, sizes, args.device, args.steps)
        cost = wall if args.device != "cpu" else cpu
        print(f"| {name} | {wall:.1f} | {cpu:.1f} | {cost * 1e6 / 1e3 / 3600:.0f} h |")


if __name__ == "__main__":
    main()
