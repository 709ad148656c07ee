"""What a finished sweep leaves behind: a results table, the best config, a plot.

- `results.csv`: one row per trial (status, whether the scheduler stopped it early, the metric's
  last and best reported values, every swept value, the error if it crashed, its folder, and the
  one `lightning-meta fit` command that replays it), sorted best first.
- `best.yaml`: the best trial's fully resolved config, as the CLI parser itself dumps it, so
  `lightning-meta fit --config best.yaml` is that trial, with its replay command in the header.
- `<metric>.png`: the metric against each swept hyperparameter, one panel each (log axis for
  log-uniform ones, and for the metric when it spans over two decades), trials stopped early
  drawn apart, so the shape of the landscape shows.

Rows are built from plain dicts (`TrialRow`), not from Ray objects, so this is testable alone.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_meta.checkpoint_io import atomic_write_bytes
from tune.space import SearchSpace, format_value


@dataclass
class TrialRow:
    """One trial's outcome.

    Args:
        trial_id: Tune's trial id.
        status: `TERMINATED` (ran to its end or was stopped by the scheduler) or `ERROR`.
        overrides: the trial's values, by dotted key.
        iterations: validations reported.
        last: the metric at the last report (None if never reported).
        best: the best value of the metric over all reports.
        step: the training step of the last report.
        time_s: the trial's total time.
        path: the trial's folder.
        error: first line of the error, for crashed trials.
        stopped_early: whether the scheduler stopped it before its last validation.
        replay: the `lightning-meta fit` command that reruns it.
    """

    trial_id: str
    status: str
    overrides: dict[str, Any]
    iterations: int = 0
    last: float | None = None
    best: float | None = None
    step: int | None = None
    time_s: float | None = None
    path: str = ""
    error: str = ""
    stopped_early: bool = False
    replay: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def rank(rows: Sequence[TrialRow], mode: str) -> list[TrialRow]:
    """Rows best first by the last reported metric; trials without a finite value last."""
    sign = 1.0 if mode == "min" else -1.0
    return sorted(rows, key=lambda r: (not _finite(r.last), sign * r.last if _finite(r.last) else 0.0))


def write_results_csv(rows: Sequence[TrialRow], path: Path, metric: str, keys: Sequence[str]) -> Path:
    """Write the results table (see the module docstring); returns `path`."""
    columns = ["trial_id", "status", "stopped_early", "iterations", "step", f"{metric} (last)", f"{metric} (best)"]
    columns += [*keys, "time_s", "error", "path", "replay"]
    # Written whole or not at all: a killed driver never leaves a half table (atomic_write_bytes).
    with io.StringIO(newline="") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        for r in rows:
            values = [r.trial_id, r.status, r.stopped_early, r.iterations, r.step, r.last, r.best]
            values += [format_value(r.overrides[k]) if k in r.overrides else "" for k in keys]
            values += [None if r.time_s is None else round(r.time_s, 2), r.error, r.path, r.replay]
            writer.writerow(["" if v is None else v for v in values])
        atomic_write_bytes(path, file.getvalue().encode())
    return path


def write_best_yaml(resolved: str, path: Path, header: Sequence[str]) -> Path:
    """Write a resolved config with `header` lines as comments on top; returns `path`."""
    lines = [f"# {line}".rstrip() for line in header]
    atomic_write_bytes(path, ("\n".join(lines) + "\n" + resolved).encode())
    return path


def plot_metric(rows: Sequence[TrialRow], space: SearchSpace, metric: str, mode: str, path: Path) -> Path | None:
    """Scatter the last reported metric against each swept hyperparameter; returns `path`.

    None when no trial reported a finite value (nothing to plot).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if _finite(r.last)]
    params = space.swept
    if not points or not params:
        return None
    best = rank(points, mode)[0]
    fig, axes = plt.subplots(1, len(params), figsize=(4.2 * len(params), 3.6), squeeze=False)
    for ax, param in zip(axes[0], params, strict=True):
        values = [r.overrides.get(param.key) for r in points]
        numeric = all(_finite(v) for v in values)
        if numeric:
            xs = [float(v) for v in values]
        else:
            labels = list(dict.fromkeys(format_value(v) for v in values))
            xs = [labels.index(format_value(v)) for v in values]
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        for stopped, style in ((False, {"marker": "o", "color": "C0", "label": "ran to the end"}),
                               (True, {"marker": "x", "color": "0.55", "label": "stopped early"})):  # fmt: skip
            chosen = [(x, r.last) for x, r in zip(xs, points, strict=True) if r.stopped_early == stopped]
            if chosen:
                ax.scatter(*zip(*chosen, strict=True), **style)
        best_x = xs[points.index(best)]
        ax.scatter([best_x], [best.last], s=160, facecolors="none", edgecolors="C3", label="best")
        if param.log_scale and numeric:
            ax.set_xscale("log")
        ys = [r.last for r in points]
        if min(ys) > 0 and max(ys) > 100 * min(ys):  # a diverging trial would flatten the rest
            ax.set_yscale("log")
        ax.set_xlabel(param.key.replace(".init_args", ""))
        ax.set_ylabel(f"{metric} (last report)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{metric} ({'lower' if mode == 'min' else 'higher'} is better), {len(points)} trials")
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, dpi=110, format="png")
    plt.close(fig)
    atomic_write_bytes(path, image.getvalue())
    return path
