"""The sweep command: `python -m tune --config BASE.yaml --space SPACE.yaml [options] [-- fit args]`.

Arguments after a lone `--` are passed to every trial's `lightning-meta fit` (for example a
shorter `--trainer.max_steps` for the sweep than the config's own). Bad input exits with status 2
and a message naming the problem before Ray starts; a sweep in which no trial reported the metric
exits with status 1, an interrupted one (Ctrl+C; `--resume` goes on) with 130.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tune.space import SpaceError
from tune.sweep import SCHEDULERS, SEARCHES, SweepSettings, run_sweep


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m tune`."""
    parser = argparse.ArgumentParser(
        prog="python -m tune",
        description="Ray Tune sweep over a lightning-meta config. Arguments after `--` go to every "
        "trial's `lightning-meta fit`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--config", help="base lightning-meta config (required unless --resume)")
    add("--space", help="search space YAML keyed by dotted CLI paths (required unless --resume)")
    add("--num-samples", type=int, default=10, help="trials sampled from the space (with grids: per grid point)")
    add("--metric", default="val/loss", help="reported metric to optimise")
    add("--mode", choices=("min", "max"), help="optimisation direction (default: from the metric's name)")
    add("--scheduler", choices=SCHEDULERS, default="asha", help="trial scheduler")
    add("--search", choices=SEARCHES, default="random", help="random/grid sampling, or Optuna (needs its extra)")
    add("--name", help="sweep name, a folder under --storage-path (default: from the file names and the time)")
    add("--storage-path", default="logs/sweeps", help="where results and checkpoints go: a folder or a URI")
    add("--address", help="Ray cluster to attach to (auto, host:port; default: $RAY_ADDRESS, else a private one)")
    add("--num-cpus", type=int, help="CPUs of a private local cluster (default: all)")
    add("--cpus-per-trial", type=float, help="CPUs per trial (default: one per worker)")
    add("--gpus-per-trial", type=float, default=0.0, help="GPUs per trial, split over its workers")
    add("--workers-per-trial", type=int, default=1, help="processes per trial; >1 trains DDP through Ray Train")
    add("--max-concurrent", type=int, help="trials running at once (default: as resources allow)")
    add("--max-failures", type=int, default=0, help="retries of a crashed trial, from its last checkpoint")
    add("--max-t", type=int, help="ASHA: largest budget in validations (default: from the config)")
    add("--grace-period", type=int, default=1, help="ASHA: validations before a trial may be stopped")
    add("--reduction-factor", type=float, default=2.0, help="ASHA: keep 1/this of the trials at each rung")
    add("--perturbation-interval", type=int, default=2, help="PBT: validations between exploit/explore steps")
    add("--seed", type=int, help="seed of the search algorithm")
    add("--resume", action="store_true", help="continue an interrupted sweep (--name, or the latest of config+space)")
    add("--no-wandb", dest="wandb", action="store_false", help="no W&B runs (default: one per trial)")
    add("--wandb-project", default="lightning-meta", help="W&B project")
    add("--keep-checkpoints", type=int, help="checkpoints kept per trial (default: 2; 4 under PBT)")
    add("--ray-temp-dir", help="Ray's temp dir for a private local cluster (default: Ray's)")
    add("--verbose", type=int, default=1, choices=(0, 1, 2, 3), help="Tune's console verbosity")
    return parser


def parse_settings(argv: Sequence[str]) -> SweepSettings:
    """Settings from a command line (without the program name)."""
    argv = list(argv)
    trial_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, trial_args = argv[:cut], argv[cut + 1 :]
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not ns.resume and not (ns.config and ns.space):
        parser.error("--config and --space are required (unless --resume)")
    values = vars(ns)
    values["config"], values["space"] = ns.config or "", ns.space or ""
    return SweepSettings(trial_args=tuple(trial_args), **values)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `python -m tune`."""
    settings = parse_settings(sys.argv[1:] if argv is None else argv)
    try:
        outcome = run_sweep(settings)
    except SpaceError as error:
        print(f"python -m tune: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    if outcome.interrupted:
        raise SystemExit(130)
    if outcome.best is None:
        print(f"python -m tune: no trial reported {settings.metric}", file=sys.stderr)
        raise SystemExit(1)
