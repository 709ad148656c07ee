"""The learned LSTM optimizer on random 10-dimensional quadratics (Andrychowicz et al. 2016, §3.1).

Each problem is f(θ) = ||Wθ − y||² with W (10×10) and y drawn from N(0, 1), θ0 from N(0, 0.01²),
as in the paper's reference code. The `LearnedOptimizer` (2-layer LSTM, 20 hidden units, output
scale 0.01) is meta-trained on fresh batches of problems through 100-step unrolls in windows of
20 (truncated back-propagation, `truncated_unroll`, second derivatives dropped as in the paper),
then run for 100 steps on held-out test problems beside SGD, RMSprop and Adam, each at the rate
of a grid that gave the lowest mean final loss on separate validation problems. Reported: log10
of the mean (over test problems) loss after 100 steps, and a PNG of the mean loss per step.

Problems are batched along a leading dimension and the loss summed over them: each problem's
gradient is then exactly its own, and all the optimizers here act coordinate by coordinate, so a
batch of problems is the same as running them one at a time.

    python benchmarks/learned_optimizer_quadratics.py                      # the default budget
    python benchmarks/learned_optimizer_quadratics.py --iterations 100     # a short run
    python benchmarks/learned_optimizer_quadratics.py --seed 1             # another meta-training seed

`--seed` sets the LSTM's initial weights and the meta-training problems (seed 0 draws the ones
the first published run used); the validation and test problems are the same for every seed, so
two seeds differ only in how the LSTM was meta-trained.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from lightning_meta.update_rules import LearnedOptimizer, truncated_unroll

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
GRID = [10.0**e for e in (-4, -3.5, -3, -2.5, -2, -1.5, -1, -0.5, 0)]
"""Learning rates tried for each hand-designed optimizer (half-decades, 1e-4 to 1)."""


def problems(count: int, seed: int, dim: int = 10) -> tuple[Tensor, Tensor, Tensor]:
    """`count` quadratics: W `[count, dim, dim]`, y `[count, dim]`, θ0 `[count, dim]`."""
    g = torch.Generator().manual_seed(seed)
    w, y = torch.randn(count, dim, dim, generator=g), torch.randn(count, dim, generator=g)
    return w, y, 0.01 * torch.randn(count, dim, generator=g)


def losses_of(w: Tensor, y: Tensor) -> Callable[[Tensor], Tensor]:
    """θ `[count, dim]` -> each problem's loss `[count]`."""
    return lambda theta: ((w @ theta.unsqueeze(-1)).squeeze(-1) - y).pow(2).sum(-1)


def run_torch_optimizer(name: str, lr: float, w: Tensor, y: Tensor, theta0: Tensor, steps: int) -> Tensor:
    """Mean loss over problems at steps 0..`steps` of a torch optimizer (`[steps + 1]`)."""
    losses = losses_of(w, y)
    theta = theta0.clone().requires_grad_()
    optimizer = {"SGD": torch.optim.SGD, "RMSprop": torch.optim.RMSprop, "Adam": torch.optim.Adam}[name]([theta], lr=lr)
    curve = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = losses(theta)
        curve.append(loss.detach().mean())
        loss.sum().backward()
        optimizer.step()
    curve.append(losses(theta).detach().mean())
    return torch.stack(curve)


def run_learned(rule: LearnedOptimizer, w: Tensor, y: Tensor, theta0: Tensor, steps: int) -> Tensor:
    """Mean loss over problems at steps 0..`steps` of the learned optimizer (no meta-gradient)."""
    losses = losses_of(w, y)

    def loss_fn(params: dict[str, Tensor]) -> Tensor:
        return losses(params["theta"]).sum()

    curve = [losses(theta0).mean()]
    for _, params in truncated_unroll(loss_fn, {"theta": theta0}, rule, steps, window=1):
        curve.append(losses(params["theta"]).detach().mean())
    return torch.stack(curve)


def meta_training_seed(seed: int, iteration: int) -> int:
    """The generator seed of meta-training batch `iteration` under `--seed` (seed 0: the first
    published run's problems, 10_000 + iteration)."""
    return 10_000 + iteration + 1_000_000 * seed


def meta_train(args: argparse.Namespace) -> tuple[LearnedOptimizer, list[float]]:
    """The LSTM optimizer meta-trained on `args.iterations` batches of fresh problems."""
    torch.manual_seed(args.seed)
    rule = LearnedOptimizer(hidden_size=20, layers=2, preprocess_p=10.0, output_scale=0.01)
    optimizer = torch.optim.Adam(rule.parameters(), lr=args.meta_lr)
    history = []
    for iteration in range(args.iterations):
        w, y, theta0 = problems(args.batch, seed=meta_training_seed(args.seed, iteration))
        losses = losses_of(w, y)

        def loss_fn(params: dict[str, Tensor], losses: Callable[[Tensor], Tensor] = losses) -> Tensor:
            return losses(params["theta"]).sum()

        for window_loss, params in truncated_unroll(loss_fn, {"theta": theta0}, rule, args.steps, args.window):
            optimizer.zero_grad()
            (window_loss / args.batch).backward()  # the mean over problems of the window's mean loss
            optimizer.step()
            end = params["theta"].detach()
        final = float(losses(end).mean())
        history.append(final)
        if (iteration + 1) % max(1, args.iterations // 10) == 0:
            print(f"meta-iteration {iteration + 1}: mean final loss {final:.4f} on its training problems")
    return rule, history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=300, help="meta-training batches of problems")
    parser.add_argument("--batch", type=int, default=128, help="problems per meta-training batch")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per problem")
    parser.add_argument("--window", type=int, default=20, help="truncation window (steps)")
    parser.add_argument("--meta-lr", type=float, default=0.003, help="Adam's rate for the LSTM's weights")
    parser.add_argument("--val-problems", type=int, default=100, help="problems that choose each baseline's rate")
    parser.add_argument("--test-problems", type=int, default=100, help="held-out problems reported on (>= 20)")
    parser.add_argument("--seed", type=int, default=0, help="the LSTM's initial weights and meta-training problems")
    parser.add_argument("--name", default=None, help="results file stem (default: by seed)")
    args = parser.parse_args()
    if args.name is None:
        args.name = "learned_optimizer_quadratics" + (f"_seed{args.seed}" if args.seed else "")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if args.test_problems < 20:
        parser.error("--test-problems must be at least 20 (issue 14)")
    torch.set_num_threads(1)
    val, test = problems(args.val_problems, seed=1), problems(args.test_problems, seed=2)

    start = time.perf_counter()
    rule, history = meta_train(args)
    train_seconds = time.perf_counter() - start
    curves: dict[str, Tensor] = {"LSTM (learned)": run_learned(rule, *test, args.steps)}
    rates: dict[str, float | None] = {"LSTM (learned)": None}
    for name in ("SGD", "RMSprop", "Adam"):
        final = {lr: float(run_torch_optimizer(name, lr, *val, args.steps)[-1]) for lr in GRID}
        best = min((lr for lr in GRID if math.isfinite(final[lr])), key=final.get)
        rates[name] = best
        curves[name] = run_torch_optimizer(name, best, *test, args.steps)

    rows = {name: math.log10(float(curve[-1])) for name, curve in curves.items()}
    print(
        f"\n{args.test_problems} held-out 10-d quadratics, {args.steps} steps; LSTM meta-trained on "
        f"{args.iterations} x {args.batch} problems ({train_seconds:.0f} s, CPU, 1 thread); baselines "
        f"at the best rate of {GRID[0]:g}..{GRID[-1]:g} on {args.val_problems} validation problems"
    )
    print("| optimizer | rate | log10 mean final loss |\n|---|---|---|")
    for name, value in rows.items():
        rate = "learned" if rates[name] is None else f"{rates[name]:g}"
        print(f"| {name} | {rate} | {value:.3f} |")

    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "args": vars(args),
        "train_seconds": train_seconds,
        "rates": rates,
        "log10_mean_final_loss": rows,
        "curves": {name: curve.tolist() for name, curve in curves.items()},
        "meta_training_final_losses": history,
    }
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        label = name if rates[name] is None else f"{name} (lr {rates[name]:g})"
        ax.plot(range(len(curve)), curve.numpy(), label=label)
    ax.set(yscale="log", xlabel="step", ylabel=f"mean loss over {args.test_problems} test problems")
    ax.set_title("10-d random quadratics (Andrychowicz et al. 2016)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{args.name}.png", dpi=120)
    print(f"wrote {RESULTS / args.name}.json and .png")


if __name__ == "__main__":
    main()
