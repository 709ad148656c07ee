"""Omniglot few-shot table for the metric-based family and first-order MAML, on a time budget.

Each method is built from its `configs/omniglot_<benchmark>/<config>.yaml` (so the table measures
what the configs run) and meta-trained for `--minutes` of training time (validation excluded),
one torch thread; every `--minutes / --val-points` of training it is scored on `--val-tasks`
fixed validation tasks, for the plot of validation accuracy against training time. Then it is
tested on `--test-episodes` fixed test episodes of the Vinyals split: mean accuracy ± 95% CI.
Benchmarks: 5-way 1-shot and 20-way 1-shot (`--benchmarks`; 5-way 5-shot for the methods
that have a `configs/omniglot_5w5s/` config). Finally the method with the best
final validation accuracy on the first benchmark (validation, not test: the test set must not
choose what is tested) is trained again, the same budget, from its `configs/lake/` config
(Omniglot background set only) and scored on Lake's 20 one-shot runs: % error over the 400 test
images.

Every trained model is tested twice, the same weights under both evaluation protocols (README,
"Evaluation protocol"): transductive (BatchNorm over each episode's support set and all its
queries, the default, what `acc`/`error` hold) and per example (each query normalised with its
support set's statistics alone, `per_example` in the JSON). Validation curves are transductive.

Writes, under `--out` (default benchmarks/results/): `omniglot_<benchmark>.json` per benchmark
(the scores, steps, validation curves and settings; the Lake result rides with the first), then
`omniglot_table.md` (the table as printed) and `omniglot_val_accuracy.png` (validation accuracy
against training minutes, per method) from the JSON files of all `--benchmarks`. So the two
benchmarks can run as two processes, one core each, and `--report-only` joins them:

    python benchmarks/omniglot_table.py --minutes 8 --benchmarks 5w1s &
    python benchmarks/omniglot_table.py --minutes 8 --benchmarks 20w1s --no-lake &
    wait; python benchmarks/omniglot_table.py --benchmarks 5w1s 20w1s --report-only

Omniglot and all_runs.zip are read from `$LIGHTNING_META_DATA/omniglot/` (here: ../shared/data).

    python benchmarks/omniglot_table.py --minutes 5 --benchmarks 5w1s            # the README's run
    python benchmarks/omniglot_table.py --minutes 0.5 --test-episodes 50 --val-tasks 10   # a check
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import warnings
from collections.abc import Iterable
from pathlib import Path

os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
os.environ.setdefault("WANDB_MODE", "disabled")

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytorch_lightning as pl
import torch
from bench_trainer import bare_trainer

from lightning_meta.algorithms import MetaLearner, mean_and_ci95
from lightning_meta.cli import run_cli

REPO = Path(__file__).resolve().parents[1]
METHODS = {  # table name: config name under configs/omniglot_*/ and configs/lake/
    "ProtoNet": "protonet",
    "Siamese (Koch loss)": "siamese",
    "Matching Nets": "matching",
    "Relation Nets": "relation",
    "first-order MAML": "fomaml",
}
OTHER_METHODS = {  # run with --methods; the default table stays the one above
    "MAML": "maml",
    "CAVIA": "cavia",
    "MAML + MeTAL": "maml_metal",
    "MetaLSTM": "metalstm",
}
CONFIGS = METHODS | OTHER_METHODS
PUBLISHED = {  # accuracy %, Vinyals split: the papers' Table 1
    ("ProtoNet", "5w1s"): "98.8 (Snell et al.)",
    ("ProtoNet", "20w1s"): "96.0 (Snell et al.)",
    ("Siamese (Koch loss)", "5w1s"): "96.7 (Vinyals et al.)",
    ("Siamese (Koch loss)", "20w1s"): "88.0 (Vinyals et al.)",
    ("Matching Nets", "5w1s"): "98.1 (Vinyals et al.)",
    ("Matching Nets", "20w1s"): "93.8 (Vinyals et al.)",
    ("Relation Nets", "5w1s"): "99.6 (Sung et al.)",
    ("Relation Nets", "20w1s"): "97.6 (Sung et al.)",
    ("first-order MAML", "5w1s"): "98.3 (Nichol et al.)",
    ("first-order MAML", "20w1s"): "89.4 (Nichol et al.)",
    ("MAML", "5w1s"): "98.7 (Finn et al.)",
    ("MAML", "20w1s"): "95.8 (Finn et al.)",
    ("CAVIA", "5w1s"): "— (no Omniglot number)",
    ("MAML + MeTAL", "5w1s"): "— (no Omniglot number; mini-ImageNet 52.63 vs MAML 49.64)",
    ("MAML", "5w5s"): "99.9 (Finn et al.)",
    ("MAML + MeTAL", "5w5s"): "— (no Omniglot number; mini-ImageNet 70.52 vs MAML 64.99)",
}
LAKE_PUBLISHED = "Siamese convnet (Koch et al.) 8.0%, people 4.5%, BPL 3.3%"
PUBLISHED_PROTOCOL = {  # the protocol of the published numbers (configs' headers say where it was read)
    "ProtoNet": "per example (running statistics)",
    "Siamese (Koch loss)": "unverified (Koch's net has no BatchNorm)",
    "Matching Nets": "unverified",
    "Relation Nets": "transductive",
    "first-order MAML": "transductive",
    "MAML": "transductive",
    "CAVIA": "transductive (its code's BatchNorm on batch statistics)",
    "MAML + MeTAL": "transductive (its code's BatchNorm on batch statistics); mini-ImageNet, 5 inner steps",
}


class TrainingClock(pl.Callback):
    """Stops training after `budget_s` seconds of training (validation excluded) and scores the
    model on fixed validation batches every `budget_s / points` seconds of it."""

    def __init__(self, budget_s: float, points: int, val_batches: list) -> None:
        self.budget_s, self.every_s, self.val_batches = budget_s, budget_s / points, val_batches
        self.trained_s, self.next_val_s, self.curve = 0.0, 0.0, []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.next_val_s == 0.0:  # the untrained model, at time 0
            self.curve.append((0.0, accuracy(pl_module, self.val_batches)[0]))
            self.next_val_s = self.every_s
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.trained_s += time.perf_counter() - self._start
        if self.trained_s >= self.next_val_s or self.trained_s >= self.budget_s:
            self.curve.append((self.trained_s, accuracy(pl_module, self.val_batches)[0]))
            self.next_val_s += self.every_s
        if self.trained_s >= self.budget_s:
            trainer.should_stop = True


def accuracy(model: MetaLearner, batches: Iterable) -> tuple[float, float]:
    """Mean query accuracy over the tasks of `batches` ± 95% CI, in percent, in eval mode."""
    was_training = model.training
    model.eval()
    accs = []
    # Gradient-based learners adapt at evaluation; the metric-based need no graph.
    with torch.enable_grad() if model.adapts_with_gradients else torch.no_grad():
        for batch in batches:
            accs.append(model.meta_loss(batch)[1]["acc"])
    model.train(was_training)
    mean, ci = mean_and_ci95(torch.cat(accs))
    return 100 * float(mean), 100 * float(ci)


def pick_for_lake(methods: dict[str, dict]) -> str:
    """The method to score on Lake's runs: the highest validation accuracy at the end of training
    (the last point of each method's `curve` of (seconds, accuracy %)); test accuracy plays no part."""
    return max(methods, key=lambda name: methods[name]["curve"][-1][1])


def per_example_accuracy(model: MetaLearner, batches: Iterable) -> dict[str, float]:
    """`accuracy` of the same weights under the per-example protocol: `{"acc", "ci"}`."""
    model.eval_protocol = "per_example"
    try:
        acc, ci = accuracy(model, batches)
    finally:
        model.eval_protocol = "transductive"
    return {"acc": acc, "ci": ci}


def build(config: Path, args: argparse.Namespace) -> tuple[MetaLearner, pl.LightningDataModule]:
    cli = run_cli(
        [
            "--config",
            str(config),
            "--trainer.logger=false",
            f"--seed_everything={args.seed}",
            f"--data.val_tasks={args.val_tasks}",
            *([f"--data.test_tasks={args.test_episodes}"] if "lake" not in config.parts else []),
        ],
        run=False,
    )
    cli.model.compile_backbone = {"true": True, "false": False}.get(args.compile, args.compile)
    return cli.model, cli.datamodule


def train(model: MetaLearner, data: pl.LightningDataModule, args: argparse.Namespace) -> TrainingClock:
    data.setup("fit")
    clock = TrainingClock(60 * args.minutes, args.val_points, list(data.val_dataloader()))
    trainer = bare_trainer(
        max_steps=-1,
        max_epochs=-1,
        accelerator="cpu",
        callbacks=[clock],
    )
    trainer.fit(model, datamodule=data)
    return clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="training time per method and benchmark")
    parser.add_argument("--benchmarks", nargs="+", default=["5w1s", "20w1s"], choices=["5w1s", "20w1s", "5w5s"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(CONFIGS))
    parser.add_argument("--test-episodes", type=int, default=1000)
    parser.add_argument("--val-tasks", type=int, default=100)
    parser.add_argument("--val-points", type=int, default=8, help="validation scores per training run")
    parser.add_argument(
        "--compile",
        choices=["false", "true", "auto"],
        default="false",
        help="the backbone through torch.compile (README, 'Compiling the backbone'); false by default: "
        "a budget of minutes is too short to pay the compilation back, and the fit runs without a "
        "step limit, which 'auto' would take for a long fit",
    )
    parser.add_argument("--no-lake", action="store_true", help="skip the Lake benchmark run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument(
        "--report-only", action="store_true", help="write the table and PNG from the saved JSON of --benchmarks"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*args parameter is intended.*")  # our own argv is not the CLI's
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)

    if not args.report_only:
        for benchmark in args.benchmarks:
            run_benchmark(benchmark, args, lake=not args.no_lake and benchmark == args.benchmarks[0])
    report(args)


def run_benchmark(benchmark: str, args: argparse.Namespace, lake: bool) -> None:
    """Train and test every method on one benchmark (and the best on Lake's); save the JSON."""
    record: dict = {
        "benchmark": benchmark,
        "minutes": args.minutes,
        "test_episodes": args.test_episodes,
        "val_tasks": args.val_tasks,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "compile": args.compile,
        "protocol": "transductive",  # of `acc` and Lake's `error`; `per_example` holds the other
        "methods": {},
        "lake": None,
    }
    for name in args.methods:
        pl.seed_everything(args.seed, verbose=False)
        model, data = build(REPO / "configs" / f"omniglot_{benchmark}" / f"{CONFIGS[name]}.yaml", args)
        clock = train(model, data, args)
        steps = model.global_step
        acc, ci = accuracy(model, data.test_dataloader())  # streamed: 1000 20-way episodes are 1 GB
        record["methods"][name] = {"acc": acc, "ci": ci, "steps": steps, "curve": clock.curve}
        print(f"{benchmark} {name}: {acc:.1f} ± {ci:.1f}% after {steps} steps", flush=True)
        per_example = per_example_accuracy(model, data.test_dataloader())
        record["methods"][name]["per_example"] = per_example
        print(f"{benchmark} {name}, per example: {per_example['acc']:.1f} ± {per_example['ci']:.1f}%", flush=True)

    if lake:
        best = pick_for_lake(record["methods"])
        pl.seed_everything(args.seed, verbose=False)
        model, data = build(REPO / "configs" / "lake" / f"{CONFIGS[best]}.yaml", args)
        train(model, data, args)
        acc, ci = accuracy(model, data.test_dataloader())
        record["lake"] = {
            "method": best,
            "selected_by": "validation accuracy",
            "error": 100 - acc,
            "ci": ci,
            "steps": model.global_step,
        }
        print(f"Lake {best}: {100 - acc:.1f} ± {ci:.1f}% error", flush=True)
        per_example = per_example_accuracy(model, data.test_dataloader())
        record["lake"]["per_example"] = {"error": 100 - per_example["acc"], "ci": per_example["ci"]}
        print(f"Lake {best}, per example: {100 - per_example['acc']:.1f} ± {per_example['ci']:.1f}% error", flush=True)
    path = args.out / f"omniglot_{benchmark}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}", flush=True)


PROTOCOLS_NOTE = (
    "Transductive: BatchNorm over each episode's support set and all its queries (the default); per example: "
    "the same weights, each query normalised with its support set's statistics alone (README, Evaluation protocol)."
)


def per_example_cell(scores: dict, key: str) -> str:
    """`scores`' per-example `key` ± CI, or — for results saved before both protocols were scored."""
    per_example = scores.get("per_example")
    return f"{per_example[key]:.1f} ± {per_example['ci']:.1f}" if per_example else "—"


def report(args: argparse.Namespace) -> None:
    """`omniglot_table.md` and the PNG from the saved JSON of each of `--benchmarks`."""
    missing = [b for b in args.benchmarks if not (args.out / f"omniglot_{b}.json").exists()]
    if missing:
        raise SystemExit(
            "; ".join(f"{args.out / f'omniglot_{b}.json'} does not exist" for b in missing)
            + f": run `--benchmarks {' '.join(missing)}` (with the same --out) without --report-only first"
        )
    records = {b: json.loads((args.out / f"omniglot_{b}.json").read_text()) for b in args.benchmarks}
    methods = [m for m in CONFIGS if all(m in r["methods"] for r in records.values())]
    settings = {b: f"{r['minutes']:g} min, {r['test_episodes']} test episodes" for b, r in records.items()}
    first = next(iter(records.values()))
    lines = [
        "Omniglot (Vinyals split, 28×28), test accuracy % ± 95% CI over fixed seeded test episodes after a "
        "training-time budget per method (validation excluded): "
        + "; ".join(f"{b}: {s}" for b, s in settings.items())
        + f". torch {first['torch']}, threads: {first['threads']}, seed {first['seed']}. "
        "Published numbers are the papers', at their full budgets.",
        "",
        PROTOCOLS_NOTE,
        "",
        "| method | "
        + " | ".join(f"{b} transductive (steps) | {b} per example | {b} published" for b in records)
        + " | published protocol |",
        "|---|" + "---:|---:|---:|" * len(records) + "---|",
    ]
    for name in methods:
        cells = []
        for b, r in records.items():
            m = r["methods"][name]
            cells.append(
                f"{m['acc']:.1f} ± {m['ci']:.1f} ({m['steps']}) | {per_example_cell(m, 'acc')} | "
                f"{PUBLISHED.get((name, b), '')}"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {PUBLISHED_PROTOCOL.get(name, '')} |")
    for b, r in records.items():
        if r["lake"]:
            lake = r["lake"]
            lines += [
                "",
                # Runs saved before `selected_by` was recorded picked by test accuracy.
                f"Lake's one-shot benchmark (20 runs, 400 test images), {lake['method']} (best at {b} by "
                f"{lake.get('selected_by', 'test accuracy')}) trained "
                f"{r['minutes']:g} min on the background set only ({lake['steps']} steps, "
                f"configs/lake/{CONFIGS[lake['method']]}.yaml): **{lake['error']:.1f}% error** "
                f"(± {lake['ci']:.1f}, 95% CI over runs). Published: {LAKE_PUBLISHED}.",
            ]
            per_example = lake.get("per_example")
            lines.append(
                "That error is transductive (the 20 test images of a run share BatchNorm statistics); per example, "
                + (
                    f"the same weights: **{per_example['error']:.1f}% error** (± {per_example['ci']:.1f})."
                    if per_example
                    else "not measured in this run."
                )
                + " The published numbers classify each test image alone."
            )
    table = "\n".join(lines)
    print(table)
    (args.out / "omniglot_table.md").write_text(table + "\n")

    figure, axes = plt.subplots(1, len(records), figsize=(5.5 * len(records), 4), squeeze=False)
    for ax, (benchmark, r) in zip(axes[0], records.items(), strict=True):
        for name in methods:
            t, a = zip(*r["methods"][name]["curve"], strict=True)
            ax.plot([s / 60 for s in t], a, marker="o", markersize=3, label=name)
        ax.set(
            title=f"Omniglot {benchmark}: {r['val_tasks']} validation tasks",
            xlabel="training time (min, 1 thread)",
            ylabel="validation accuracy (%)",
        )
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(args.out / "omniglot_val_accuracy.png", dpi=110)
    print(f"wrote {args.out / 'omniglot_table.md'} and {args.out / 'omniglot_val_accuracy.png'}")


if __name__ == "__main__":
    main()
