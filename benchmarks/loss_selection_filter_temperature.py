"""The temperature of `consistency_filtered_cross_entropy` on the Omniglot label-noise family
(issue 15), checked on VALIDATION tasks (never the test tasks that `loss_selection.py` reports).

θ0 is cross-entropy MAML from `configs/omniglot_5w5s/maml_label_noise.yaml`, trained as
`loss_selection.py --mode omniglot` trains its cross-entropy row (`--steps` meta-steps, seed 0, one
thread). From that θ0 each validation task (the DataModule's seeded validation stream, half of them
with 40% of the support labels flipped) is adapted for `--eval-steps` inner steps of cross-entropy
and of the filtered cross-entropy at each `--temperatures`, and the query accuracy (%) per task
type is reported, with the mean consistency weight and the share of weights below 0.5 at θ0 (the
weights are recomputed at every inner step, from the current logits).

    PYTHONPATH=. python benchmarks/loss_selection_filter_temperature.py --steps 250 --tasks 200
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")

import pytorch_lightning as pl
import torch
from bench_trainer import bare_trainer
from loss_selection import Mode

from lightning_meta.algorithms import mean_and_ci95
from lightning_meta.data.sampler import VAL, task_rng
from lightning_meta.inner_loop import adapt, forward, named_params
from lightning_meta.losses.candidates import consistency_filtered_cross_entropy, consistency_weights, cross_entropy

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--eval-steps", type=int, default=3)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.03, 0.1, 0.3, 1.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "loss_selection_filter_temperature.md"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    pl.seed_everything(args.seed, verbose=False)
    model, data = Mode("omniglot").build("cross_entropy", args.steps, args.seed)
    start, cpu = time.perf_counter(), time.process_time()
    bare_trainer(max_steps=args.steps, accelerator="cpu").fit(model, datamodule=data)
    train_cpu = time.process_time() - cpu
    family = data.sources["val"]
    model.eval()
    backbone, params0 = model.backbone, named_params(model.backbone)
    losses = {"cross_entropy": cross_entropy}
    for t in args.temperatures:
        losses[f"filtered, temperature {t:g}"] = partial(consistency_filtered_cross_entropy, temperature=t)
    accuracy: dict[str, list[float]] = {name: [] for name in losses}
    kinds, weight_mean, weight_low = [], [], []
    for i in range(args.tasks):
        task, kind = family.sample_with_type(task_rng(data.eval_seed, VAL, i))
        kinds.append(int(kind))
        with torch.no_grad():
            w = consistency_weights(forward(backbone, params0, task.support_x), task.support_y)
        weight_mean.append(float(w.mean()))
        weight_low.append(float((w < 0.5).double().mean()))
        for name, fn in losses.items():
            trajectory = adapt(
                lambda p, fn=fn, task=task: fn(forward(backbone, p, task.support_x), task.support_y),
                params0, args.eval_steps, model.update_rule, True,
            )  # fmt: skip
            with torch.no_grad():
                q = forward(backbone, trajectory[-1], task.query_x)
            accuracy[name].append(100.0 * float((q.argmax(-1) == task.query_y).double().mean()))
    kinds_t = torch.tensor(kinds)
    names = family.task_types
    lines = [
        f"Omniglot label-noise family (`maml_label_noise.yaml`), θ0 = cross-entropy MAML after {args.steps} "
        f"meta-steps (seed {args.seed}), {args.tasks} VALIDATION tasks ("
        + ", ".join(f"{int((kinds_t == t).sum())} {n}" for t, n in enumerate(names))
        + f"), query accuracy (%) after {args.eval_steps} inner steps, mean ± 95% CI.",
        "",
        "| inner loss at test | " + " | ".join(f"{n} tasks" for n in names) + " | all |",
        "|---|" + "---:|" * (len(names) + 1),
    ]
    for name, values in accuracy.items():
        a = torch.tensor(values)
        parts = [mean_and_ci95(a[kinds_t == t]) for t in range(len(names))] + [mean_and_ci95(a)]
        lines.append(f"| {name} | " + " | ".join(f"{m:.1f} ± {h:.1f}" for m, h in parts) + " |")
    wm, wl = torch.tensor(weight_mean), torch.tensor(weight_low)
    lines += [
        "",
        "Consistency weights at θ0 (temperature 0.1): "
        + "; ".join(
            f"{n}: mean {wm[kinds_t == t].mean():.3f}, share below 0.5 {wl[kinds_t == t].mean():.3f}"
            for t, n in enumerate(names)
        )
        + ".",
        "",
        f"{(time.perf_counter() - start) / 60:.1f} wall minutes in all, {train_cpu / 60:.1f} process-CPU minutes of "
        "training, one thread.",
    ]
    table = "\n".join(lines)
    print(table, flush=True)
    args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
