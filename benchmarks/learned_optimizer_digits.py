"""The learned LSTM optimizer trained on small MLPs, tested on new ones: Andrychowicz et al. 2016,
§3.2, with scikit-learn's bundled 8×8 digits (1,797 images, 10 classes) in place of MNIST.

The `LearnedOptimizer` (2-layer LSTM, 20 hidden units, output scale 0.01, the paper's gradient
preprocessing) is meta-trained as in the paper's MNIST experiment: the optimizee is an MLP with
one hidden layer of 20 sigmoid units, cross-entropy, minibatches of 128, 100 steps per
meta-iteration in truncated windows of 20 (`truncated_unroll`, second derivatives dropped), a
fresh random initialisation (the reference code's N(0, 0.01²) for weights and biases) and fresh
random minibatches every meta-iteration, Adam on the LSTM's weights at the rate of `--meta-lrs`
whose short run (`--tune-iterations`) left the lowest final loss on the validation split; that
run then continues to `--iterations`.

The digits are split once (fixed permutation) into three disjoint sets of images of all ten
classes: meta-train (half), validation (a quarter), test (a quarter). The LSTM only ever sees
minibatches of meta-train images. Each baseline (SGD, RMSprop, Adam) takes, per setting, the rate
with the lowest mean final training loss of nets trained on the validation images (as the paper
picks by final training loss), searched on half-decades 1e-4 … 10, then on eighth-decades within
half a decade of the best of those. The test is the paper's: train a
*new* net (new initialisation, new minibatches) with each optimizer, here on the held-out test
images, and report its training loss (the full test split's cross-entropy, after every step):
the 20-unit sigmoid net for the 100 steps the LSTM was trained on, then settings it never saw
(200 steps; 40 hidden units; two hidden layers of 20; ReLU). Every optimizer runs the same nets
(same initialisations and minibatch sequences), so differences between them are paired.

Nets are batched along a leading dimension and their losses summed: each net's gradient is then
exactly its own, and every optimizer here acts coordinate by coordinate, so a batch of nets is
the same as running them one at a time.

    python benchmarks/learned_optimizer_digits.py                         # the default budget
    python benchmarks/learned_optimizer_digits.py --iterations 60 --tune-iterations 20   # a smoke run
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_meta.update_rules import LearnedOptimizer, truncated_unroll

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
GRID = [10.0**e for e in (-4, -3.5, -3, -2.5, -2, -1.5, -1, -0.5, 0, 0.5, 1)]
"""Learning rates tried first for each hand-designed optimizer (half-decades, 1e-4 to 10)."""
REFINE = [10.0 ** (e / 8) for e in (-3, -2, -1, 1, 2, 3)]
"""Then the best of `GRID` times these (eighth-decades within a half-decade either side)."""
BASELINES = ("SGD", "RMSprop", "Adam")
LSTM = "LSTM (learned)"
Nets = dict[str, Tensor]
"""A batch of MLPs: w{i} `[nets, fan_in, fan_out]`, b{i} `[nets, 1, fan_out]`."""


@dataclass(frozen=True)
class Setting:
    """One optimizee: the MLP's hidden layers, their activation, and the steps it is trained for."""

    name: str
    hidden: tuple[int, ...]
    activation: str
    steps: int


TRAINED = Setting("20 sigmoid, 100 steps (as meta-trained)", (20,), "sigmoid", 100)
SETTINGS = (
    TRAINED,
    Setting("20 sigmoid, 200 steps", (20,), "sigmoid", 200),
    Setting("40 sigmoid, 100 steps", (40,), "sigmoid", 100),
    Setting("20-20 sigmoid, 100 steps", (20, 20), "sigmoid", 100),
    Setting("20 ReLU, 100 steps", (20,), "relu", 100),
)


def digits_splits(seed: int = 0) -> dict[str, tuple[Tensor, Tensor]]:
    """scikit-learn's bundled digits (pixels scaled to [0, 1]) split at random into disjoint
    meta-train (1/2), validation (1/4) and test (1/4) images."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - the bench extra brings it
        raise SystemExit("this benchmark needs scikit-learn: pip install -e '.[bench]'") from error
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    half, three_quarters = len(y) // 2, 3 * len(y) // 4
    parts = {"meta-train": order[:half], "validation": order[half:three_quarters], "test": order[three_quarters:]}
    return {name: (x[index], y[index]) for name, index in parts.items()}


def init_nets(setting: Setting, count: int, generator: torch.Generator) -> Nets:
    """`count` MLPs 64 → hidden → 10, weights and biases from N(0, 0.01²) (the reference code)."""
    sizes = [64, *setting.hidden, 10]
    nets: Nets = {}
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        nets[f"w{i}"] = 0.01 * torch.randn(count, fan_in, fan_out, generator=generator)
        nets[f"b{i}"] = 0.01 * torch.randn(count, 1, fan_out, generator=generator)
    return nets


def net_losses(nets: Nets, x: Tensor, y: Tensor, activation: str) -> Tensor:
    """Each net's mean cross-entropy `[nets]` on its own inputs x `[nets, n, 64]`, labels `[nets, n]`."""
    layers = len(nets) // 2
    h = x
    for i in range(layers):
        h = torch.baddbmm(nets[f"b{i}"], h, nets[f"w{i}"])
        if i < layers - 1:
            h = torch.sigmoid(h) if activation == "sigmoid" else torch.relu(h)
    return F.cross_entropy(h.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(-1)


@dataclass
class Runs:
    """`count` nets of one setting on one split: their initialisations and minibatch sequences."""

    setting: Setting
    x: Tensor
    y: Tensor
    nets: Nets
    batches: Tensor  # [steps + 1, count, batch] indices into the split

    @classmethod
    def draw(cls, setting: Setting, split: tuple[Tensor, Tensor], count: int, batch: int, seed: int) -> Runs:
        g = torch.Generator().manual_seed(seed)
        nets = init_nets(setting, count, g)
        batches = torch.randint(len(split[1]), (setting.steps + 1, count, batch), generator=g)
        return cls(setting, *split, nets, batches)

    def minibatch_loss(self, step: int) -> Callable[[Nets], Tensor]:
        """The nets' summed loss on their minibatches of `step` (each net's gradient is its own)."""
        index = self.batches[step]
        return lambda nets: net_losses(nets, self.x[index], self.y[index], self.setting.activation).sum()

    def split_loss(self, nets: Nets) -> Tensor:
        """Each net's cross-entropy on the whole split `[count]` (the curves' training loss)."""
        count = self.batches.shape[1]
        with torch.no_grad():
            x = self.x.expand(count, *self.x.shape)
            return net_losses(nets, x, self.y.expand(count, -1), self.setting.activation)


def run_baseline(name: str, lr: float, runs: Runs) -> Tensor:
    """Every net's split loss at steps 0..K `[K + 1, count]` under a torch optimizer."""
    names = list(runs.nets)
    leaves = [runs.nets[n].clone().requires_grad_() for n in names]
    optimizer = {"SGD": torch.optim.SGD, "RMSprop": torch.optim.RMSprop, "Adam": torch.optim.Adam}[name](leaves, lr=lr)
    curve = []
    for step in range(runs.setting.steps):
        nets = dict(zip(names, leaves, strict=True))
        curve.append(runs.split_loss(nets))
        optimizer.zero_grad()
        runs.minibatch_loss(step)(nets).backward()
        optimizer.step()
    curve.append(runs.split_loss(dict(zip(names, leaves, strict=True))))
    return torch.stack(curve)


def run_learned(rule: LearnedOptimizer, runs: Runs) -> Tensor:
    """Every net's split loss at steps 0..K `[K + 1, count]` under the learned optimizer."""
    steps = runs.setting.steps
    losses = [runs.minibatch_loss(k) for k in range(steps + 1)]
    rule.requires_grad_(False)  # no meta-gradient here: no graph through the LSTM
    try:
        curve = [runs.split_loss(runs.nets)]
        for _, nets in truncated_unroll(losses, runs.nets, rule, steps, window=1):
            curve.append(runs.split_loss(nets))
    finally:
        rule.requires_grad_(True)
    return torch.stack(curve)


def final_mean(curve: Tensor) -> float:
    """The nets' mean final loss; inf if any diverged (so a rate that diverges is never chosen)."""
    final = curve[-1]
    return float(final.mean()) if bool(torch.isfinite(final).all()) else math.inf


class MetaTraining:
    """One LSTM optimizer and its outer Adam, meta-trained iteration by iteration."""

    def __init__(self, meta_lr: float, args: argparse.Namespace, split: tuple[Tensor, Tensor]) -> None:
        torch.manual_seed(args.seed)
        self.rule = LearnedOptimizer(hidden_size=20, layers=2, preprocess_p=10.0, output_scale=0.01)
        self.optimizer = torch.optim.Adam(self.rule.parameters(), lr=meta_lr)
        self.args, self.split, self.done = args, split, 0
        self.history: list[float] = []
        self.seconds = self.cpu_seconds = 0.0

    def train(self, iterations: int) -> None:
        """`iterations` more meta-iterations, each a fresh net (or `--nets` of them) and fresh minibatches."""
        start, cpu, args = time.perf_counter(), time.process_time(), self.args
        for _ in range(iterations):
            seed = 1_000_000 * (args.seed + 1) + self.done
            runs = Runs.draw(TRAINED, self.split, args.nets, args.batch, seed)
            losses = [runs.minibatch_loss(k) for k in range(TRAINED.steps + 1)]
            for window_loss, nets in truncated_unroll(losses, runs.nets, self.rule, TRAINED.steps, args.window):
                self.optimizer.zero_grad()
                (window_loss / args.nets).backward()  # the mean over nets of the window's mean loss
                self.optimizer.step()
                end = {n: p.detach() for n, p in nets.items()}
            self.history.append(float(runs.split_loss(end).mean()))
            self.done += 1
            if self.done % max(1, args.iterations // 10) == 0:
                recent = self.history[-max(1, args.iterations // 10) :]
                print(
                    f"  meta-iteration {self.done}: final meta-train loss {sum(recent) / len(recent):.4f} "
                    f"(mean of the last {len(recent)})"
                )
        self.seconds += time.perf_counter() - start
        self.cpu_seconds += time.process_time() - cpu


def interval(values: Tensor) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval."""
    from scipy.stats import t  # scikit-learn's dependency

    n = values.numel()
    return float(values.mean()), float(t.ppf(0.975, n - 1) * values.std(unbiased=True) / math.sqrt(n))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=200, help="meta-iterations of the chosen meta-lr (in all)")
    parser.add_argument("--tune-iterations", type=int, default=30, help="meta-iterations of each meta-lr's trial")
    parser.add_argument("--meta-lrs", type=float, nargs="+", default=[0.001, 0.003, 0.01], help="Adam rates tried")
    parser.add_argument("--nets", type=int, default=1, help="nets per meta-iteration (the paper: 1)")
    parser.add_argument("--batch", type=int, default=128, help="minibatch size")
    parser.add_argument("--window", type=int, default=20, help="truncation window (steps)")
    parser.add_argument("--val-nets", type=int, default=10, help="nets that choose each rate (validation images)")
    parser.add_argument("--test-nets", type=int, default=20, help="new nets reported on (test images, >= 20)")
    parser.add_argument("--seed", type=int, default=0, help="the LSTM's initial weights and meta-training draws")
    parser.add_argument("--name", default="learned_optimizer_digits", help="results file stem")
    args = parser.parse_args()
    if args.test_nets < 20:
        parser.error(f"--test-nets must be at least 20 (issue 14), got {args.test_nets}")
    if not 1 <= args.tune_iterations <= args.iterations:
        parser.error(f"need 1 <= --tune-iterations <= --iterations, got {args.tune_iterations}, {args.iterations}")
    torch.set_num_threads(1)
    wall, cpu = time.perf_counter(), time.process_time()
    splits = digits_splits()
    print({name: len(y) for name, (_, y) in splits.items()}, "images")

    # The outer rate: a short trial of each, scored on validation nets; the best one continues.
    val_trained = Runs.draw(TRAINED, splits["validation"], args.val_nets, args.batch, seed=1)
    trials, meta_lr_scores = {}, {}
    for meta_lr in args.meta_lrs:
        print(f"meta-lr {meta_lr:g}: {args.tune_iterations} meta-iterations")
        trials[meta_lr] = MetaTraining(meta_lr, args, splits["meta-train"])
        trials[meta_lr].train(args.tune_iterations)
        meta_lr_scores[meta_lr] = final_mean(run_learned(trials[meta_lr].rule, val_trained))
        print(f"  validation mean final loss {meta_lr_scores[meta_lr]:.4f}")
    meta_lr = min(args.meta_lrs, key=meta_lr_scores.get)
    chosen = trials[meta_lr]
    print(f"meta-lr {meta_lr:g} chosen; continuing to {args.iterations} meta-iterations")
    chosen.train(args.iterations - args.tune_iterations)
    train_seconds = sum(trial.seconds for trial in trials.values())
    train_cpu_seconds = sum(trial.cpu_seconds for trial in trials.values())
    rule = chosen.rule

    results: dict[str, dict] = {}
    for setting in SETTINGS:
        start = time.perf_counter()
        val = Runs.draw(setting, splits["validation"], args.val_nets, args.batch, seed=1)
        test = Runs.draw(setting, splits["test"], args.test_nets, args.batch, seed=2)
        curves, rates, val_scores, coarse = {LSTM: run_learned(rule, test)}, {LSTM: None}, {}, {}
        for name in BASELINES:
            val_scores[name] = {lr: final_mean(run_baseline(name, lr, val)) for lr in GRID}
            coarse[name] = min(GRID, key=val_scores[name].get)
            for lr in (coarse[name] * factor for factor in REFINE):
                val_scores[name][lr] = final_mean(run_baseline(name, lr, val))
            rates[name] = min(val_scores[name], key=val_scores[name].get)
            curves[name] = run_baseline(name, rates[name], test)
        finals = {name: curve[-1] for name, curve in curves.items()}
        summary = {}
        for name, final in finals.items():
            mean, half = interval(final)
            summary[name] = {"log10_mean": math.log10(mean), "mean": mean, "ci95": half}
        best = min(BASELINES, key=lambda name: summary[name]["mean"])
        paired = {name: interval(finals[LSTM] - finals[name]) for name in BASELINES}
        results[setting.name] = {
            "setting": vars(setting) | {"hidden": list(setting.hidden)},
            "rates": rates,
            "rate_at_grid_edge": {n: coarse[n] in (GRID[0], GRID[-1]) for n in BASELINES},
            "validation_mean_final_loss": {
                n: {f"{lr:.4g}": v for lr, v in sorted(s.items())} for n, s in val_scores.items()
            },
            "summary": summary,
            "best_baseline": best,
            "lstm_minus_baseline": {n: {"mean": m, "ci95": h} for n, (m, h) in paired.items()},
            "final_losses": {name: final.tolist() for name, final in finals.items()},
            "mean_curves": {name: curve.mean(1).tolist() for name, curve in curves.items()},
            "ci95_curves": {name: [interval(row)[1] for row in curve] for name, curve in curves.items()},
            "seconds": time.perf_counter() - start,
        }
        line = ", ".join(f"{n} {summary[n]['log10_mean']:.3f}" for n in curves)
        print(f"{setting.name}: log10 mean final loss {line}")
    wall_seconds, cpu_seconds = time.perf_counter() - wall, time.process_time() - cpu

    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {
        "args": vars(args),
        "split_sizes": {name: len(y) for name, (_, y) in splits.items()},
        "meta_lr_validation_mean_final_loss": {f"{lr:g}": v for lr, v in meta_lr_scores.items()},
        "meta_lr": meta_lr,
        "train_seconds": train_seconds,
        "wall_seconds": wall_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "cpu_seconds": cpu_seconds,
        "meta_training_final_losses": chosen.history,
        "settings": results,
    }
    (RESULTS / f"{args.name}.json").write_text(json.dumps(record, indent=1))
    (RESULTS / f"{args.name}.md").write_text(markdown(record))
    plot(record, RESULTS / f"{args.name}.png")
    print(markdown(record))
    print(f"wrote {RESULTS / args.name}.json, .md and .png ({wall_seconds:.0f} s in all)")


def markdown(record: dict) -> str:
    """The results as the README's table: per setting, each optimizer's final test-split loss."""
    args = record["args"]
    lines = [
        f"Digits (scikit-learn, 8×8): LSTM meta-trained on the 20-unit sigmoid MLP, {args['iterations']} "
        f"meta-iterations × {args['nets']} net × {TRAINED.steps} steps (windows of {args['window']}), Adam at meta-lr "
        f"{record['meta_lr']:g} (chosen of {', '.join(record['meta_lr_validation_mean_final_loss'])} by "
        f"{args['tune_iterations']}-iteration trials); meta-training {record['train_cpu_seconds']:.0f} CPU s "
        f"({record['train_seconds']:.0f} s wall), {record['cpu_seconds']:.0f} CPU s in all "
        f"({record['wall_seconds']:.0f} s wall; 1 thread, a 2-core CPU shared with other jobs). Test: "
        f"{args['test_nets']} new nets on the "
        f"{record['split_sizes']['test']} held-out test images; loss = the test split's cross-entropy after the "
        "last step; baselines at the rate (half-decades 1e-4 … 10, then eighth-decades around the best) with "
        f"the lowest mean final loss of {args['val_nets']} nets "
        "on the validation images; ± = 95% t-interval over nets; Δ = LSTM − best baseline, paired (same nets).",
        "",
        "| setting | LSTM (learned) | SGD | RMSprop | Adam | Δ vs best baseline |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in record["settings"].items():
        cells = []
        for opt in (LSTM, *BASELINES):
            s = result["summary"][opt]
            rate = "" if result["rates"][opt] is None else f" (lr {result['rates'][opt]:.3g})"
            cells.append(f"{s['log10_mean']:.3f} · {s['mean']:.3f} ± {s['ci95']:.3f}{rate}")
        best = result["best_baseline"]
        delta = result["lstm_minus_baseline"][best]
        lines.append(f"| {name} | {' | '.join(cells)} | {delta['mean']:+.3f} ± {delta['ci95']:.3f} ({best}) |")
    lines += ["", "Cells: log10 mean final loss · mean final loss ± 95% CI (chosen rate)."]
    return "\n".join(lines) + "\n"


def plot(record: dict, path: Path) -> None:
    """Mean test-split loss against steps per setting (95% bands), and the meta-training curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 8))
    for ax, (name, result) in zip(axes.flat, record["settings"].items(), strict=False):
        for opt, curve in result["mean_curves"].items():
            mean, half = torch.tensor(curve), torch.tensor(result["ci95_curves"][opt])
            rate = result["rates"][opt]
            line = ax.plot(mean.numpy(), label=opt if rate is None else f"{opt} (lr {rate:.3g})")[0]
            ax.fill_between(
                range(len(mean)), (mean - half).numpy(), (mean + half).numpy(), alpha=0.2, color=line.get_color()
            )
        ax.set(yscale="log", xlabel="step", ylabel="test-split loss (mean over nets)", title=name)
        ax.legend(fontsize=8)
    history = torch.tensor(record["meta_training_final_losses"])
    ax = axes.flat[-1]
    ax.plot(history.numpy(), alpha=0.3, label="per meta-iteration")
    width = max(1, len(history) // 20)
    if len(history) >= width:
        smooth = history.unfold(0, width, 1).mean(1)
        ax.plot(range(width - 1, len(history)), smooth.numpy(), label=f"running mean of {width}")
    ax.set(yscale="log", xlabel="meta-iteration", ylabel="final meta-train loss", title="meta-training (chosen lr)")
    ax.legend(fontsize=8)
    fig.suptitle("Learned LSTM optimizer on digits MLPs (Andrychowicz et al. 2016 §3.2, digits for MNIST)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
