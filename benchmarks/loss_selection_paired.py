"""Paired differences between stored `loss_selection.py --mode omniglot` runs on the same test tasks
(issue 15), per task type, and the selectors' step-size choices on the lr axis.

Every run of `loss_selection.py` with the same seed and `--test-tasks` tests on the same tasks (the
DataModule's seeded test stream), so per-task accuracies of two runs pair up; this recomputes the
task types as the benchmark does and prints, per (method, reference), the mean ± 95% CI of the
per-task differences. For selectors with `lr_scales` (candidate names `<loss>@<scale>`) it also
prints Σ_c p_c·s_c, the step multiplier the softmax takes in training, per task type, and the AUC
with which it is smaller on corrupted than on clean tasks.

    PYTHONPATH=. python benchmarks/loss_selection_paired.py \\
        benchmarks/results/loss_selection_omniglot_lr.json:mixture \\
        --reference benchmarks/results/loss_selection_omniglot.json:cross_entropy \\
        --oracle benchmarks/results/loss_selection_omniglot.json:cross_entropy ...   # per-task best of these
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")

import torch
from loss_selection import Mode, cell, oracle, test_tasks

from lightning_meta.algorithms import mean_and_ci95


def load(spec: str) -> tuple[str, dict]:
    """`file.json:method` → (a label, that method's stored result)."""
    path, method = spec.rsplit(":", 1)
    return f"{Path(path).stem}:{method}", json.loads(Path(path).read_text())["results"][method]


def paired_row(label: str, values: torch.Tensor, reference: torch.Tensor, kinds: torch.Tensor, types: int) -> str:
    """A markdown row: mean ± 95% CI of values − reference per task type, then over all tasks."""
    difference = values - reference
    parts = [mean_and_ci95(difference[kinds == t]) for t in range(types)] + [mean_and_ci95(difference)]
    return f"| {label} | " + " | ".join(f"{m:+.2f} ± {h:.2f}" for m, h in parts) + " |"


def scale_auc(scale: torch.Tensor, kinds: torch.Tensor) -> float:
    """P(a corrupted task's scale < a clean task's), ties counted half: 1 = always smaller."""
    corrupted, clean = scale[kinds == 1], scale[kinds == 0]
    smaller = (corrupted[:, None] < clean[None, :]).float() + 0.5 * (corrupted[:, None] == clean[None, :]).float()
    return float(smaller.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="file.json:method, the runs to compare")
    parser.add_argument("--reference", action="append", required=True, help="file.json:method (repeatable)")
    parser.add_argument("--oracle", nargs="*", default=[], help="file.json:method: also the per-task best of these")
    parser.add_argument("--test-tasks", type=int, default=600)
    args = parser.parse_args()
    _, data = Mode("omniglot").build("cross_entropy", 10, 0)
    _, kinds, names = test_tasks(data, args.test_tasks)
    print("task types: " + ", ".join(f"{int((kinds == t).sum())} {n}" for t, n in enumerate(names)))
    print("\n| accuracy points, mean ± 95% CI | " + " | ".join(f"{n} tasks" for n in names) + " | all |")
    print("|---|" + "---:|" * (len(names) + 1))
    runs, references = [load(s) for s in args.runs], [load(s) for s in args.reference]
    if args.oracle:
        fixed = [load(s)[1] for s in args.oracle]
        best, _ = oracle(
            torch.tensor([f["losses"] for f in fixed]), torch.tensor([f["query_loss"] for f in fixed]), True
        )
        runs.append((f"oracle of the {len(fixed)} --oracle runs", {"losses": best.tolist()}))
        cells = [cell(best[kinds == t], accuracy=True) for t in range(len(names))] + [cell(best, accuracy=True)]
        print("oracle (accuracy): " + " | ".join(cells))
    for label, run in runs:
        for ref_label, ref in references:
            values, reference = torch.tensor(run["losses"]), torch.tensor(ref["losses"])
            print(paired_row(f"{label} − {ref_label}", values, reference, kinds, len(names)))
    print()
    for label, run in runs:
        candidates = run.get("names") or []
        if "probabilities" not in run or not all("@" in c for c in candidates):
            continue
        scales = torch.tensor([float(c.split("@")[1]) for c in candidates])
        weighted = torch.tensor(run["probabilities"]) @ scales
        per_type = "; ".join(
            f"{n} mean {weighted[kinds == t].mean():.3f} (range {weighted[kinds == t].min():.3f}-"
            f"{weighted[kinds == t].max():.3f})"
            for t, n in enumerate(names)
        )
        print(f"{label}: Σ p·scale {per_type}; AUC(smaller on corrupted) {scale_auc(weighted, kinds):.3f}")


if __name__ == "__main__":
    main()
