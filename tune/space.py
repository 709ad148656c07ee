"""Search spaces in YAML, keyed by the dotted paths of the `lightning-meta` command line.

A space file maps each swept option to a distribution, with the same key a user would type after
`--` on the command line, so a sampled trial *is* a list of CLI overrides and replays with one
`lightning-meta fit --config base.yaml --key=value ...` command:

```yaml
model.init_args.inner_lr: {loguniform: [1.0e-3, 1.0]}
model.init_args.inner_steps: {choice: [1, 3, 5]}
data.init_args.tasks_per_batch: {grid: [10, 25]}
trainer.max_steps: 600                # a constant: the same override for every trial
```

Distributions: `choice` (a list), `grid` (a list, every value tried), `uniform` and `loguniform`
(`[low, high]`), `randint` (`[low, high]`, both ends included, unlike `ray.tune.randint`), and
`{value: X}` or a bare value for a constant. Everything is checked before a trial starts: the
shape of each entry, its range, and then every key against the real CLI parser with the base
config, at values the distribution can produce (both ends of a range, every choice), so a typo or
a float for an integer option fails in the driver, naming the key, instead of in every trial.
This module does not import Ray; `to_tune` does, lazily.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

KINDS = ("choice", "grid", "uniform", "loguniform", "randint", "value")


class SpaceError(ValueError):
    """A search space that cannot be run: the message names the file and the key."""


@dataclass(frozen=True)
class Param:
    """One swept (or fixed) option.

    Args:
        key: dotted CLI path, e.g. `model.init_args.inner_lr`.
        kind: one of `KINDS`.
        args: the values (`choice`, `grid`), the `[low, high]` range, or the constant (`value`).
    """

    key: str
    kind: str
    args: Any

    @property
    def is_constant(self) -> bool:
        """Whether every trial gets the same value."""
        return self.kind == "value"

    @property
    def log_scale(self) -> bool:
        """Whether the parameter is best plotted on a log axis."""
        return self.kind == "loguniform"

    def probe_values(self) -> list[Any]:
        """Values the distribution can produce that exercise the parser: ends, choices, a midpoint.

        The geometric or arithmetic midpoint of a float range is not an integer, so a float range
        on an integer option is refused here rather than in a trial.
        """
        if self.kind in ("choice", "grid"):
            return list(self.args)
        if self.kind == "value":
            return [self.args]
        low, high = self.args
        if self.kind == "randint":
            return [low, high]
        middle = math.sqrt(low * high) if self.kind == "loguniform" else (low + high) / 2
        return [float(low), float(high), middle]


@dataclass(frozen=True)
class SearchSpace:
    """A parsed, shape-checked search space (see the module docstring).

    Args:
        params: the entries, in file order.
        source: where it came from, for messages.
    """

    params: tuple[Param, ...]
    source: str = "<space>"

    @property
    def swept(self) -> tuple[Param, ...]:
        """The entries that vary between trials."""
        return tuple(p for p in self.params if not p.is_constant)

    @property
    def has_grid(self) -> bool:
        """Whether some entry is a grid (every value tried, `num_samples` times each)."""
        return any(p.kind == "grid" for p in self.params)

    def to_tune(self) -> dict[str, Any]:
        """The Ray Tune `param_space`: dotted keys to Tune domains or constants."""
        from ray import tune

        space: dict[str, Any] = {}
        for p in self.params:
            if p.kind == "choice":
                space[p.key] = tune.choice(list(p.args))
            elif p.kind == "grid":
                space[p.key] = tune.grid_search(list(p.args))
            elif p.kind == "uniform":
                space[p.key] = tune.uniform(*p.args)
            elif p.kind == "loguniform":
                space[p.key] = tune.loguniform(*p.args)
            elif p.kind == "randint":
                space[p.key] = tune.randint(p.args[0], p.args[1] + 1)  # Ray excludes the upper end
            else:
                space[p.key] = p.args
        return space


def load_space(path: str | Path) -> SearchSpace:
    """Read and shape-check a space file (see the module docstring for the format).

    Args:
        path: the YAML file.

    Raises:
        SpaceError: naming the file and the offending key.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise SpaceError(f"{path}: cannot read the search space: {error}") from error
    return parse_space(data, source=str(path))


def parse_space(data: Any, source: str = "<space>") -> SearchSpace:
    """Shape-check a space given as a mapping (what `load_space` reads from YAML).

    Args:
        data: dotted keys to distributions or constants.
        source: name used in error messages.

    Raises:
        SpaceError: naming `source` and the offending key.
    """
    if not isinstance(data, Mapping) or not data:
        raise SpaceError(f"{source}: a search space is a non-empty mapping of dotted CLI keys to distributions")
    params = []
    for key, spec in data.items():
        if not isinstance(key, str) or not key or key.startswith("-") or " " in key:
            raise SpaceError(f"{source}: {key!r} is not a dotted CLI key such as model.init_args.inner_lr")
        params.append(_parse_entry(key, spec, source))
    space = SearchSpace(tuple(params), source)
    if not space.swept:
        raise SpaceError(f"{source}: nothing to search: every entry is a constant")
    return space


def _parse_entry(key: str, spec: Any, source: str) -> Param:
    where = f"{source}: {key}"
    if isinstance(spec, Mapping) and len(spec) == 1 and next(iter(spec)) in KINDS:
        kind, args = next(iter(spec.items()))
    elif isinstance(spec, Mapping) and not ({"class_path", "init_args"} & set(spec)):
        raise SpaceError(
            f"{where}: {dict(spec)!r} is not a distribution: use exactly one of {', '.join(KINDS)} "
            "(a constant mapping goes in {value: ...})"
        )
    else:
        return Param(key, "value", spec)
    if kind in ("choice", "grid"):
        if not isinstance(args, Sequence) or isinstance(args, str) or not args:
            raise SpaceError(f"{where}: {kind} needs a non-empty list of values, got {args!r}")
        return Param(key, kind, tuple(args))
    if kind == "value":
        return Param(key, kind, args)
    if not (isinstance(args, Sequence) and not isinstance(args, str) and len(args) == 2):
        raise SpaceError(f"{where}: {kind} needs [low, high], got {args!r}")
    low, high = args
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
    if kind == "randint":
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)) or low > high:
            raise SpaceError(f"{where}: randint needs integers [low, high] with low <= high, got {args!r}")
    elif not numbers or not all(math.isfinite(v) for v in (low, high)) or not low < high:
        raise SpaceError(f"{where}: {kind} needs finite numbers [low, high] with low < high, got {args!r}")
    elif kind == "loguniform" and low <= 0:
        raise SpaceError(f"{where}: loguniform needs 0 < low < high, got {args!r}")
    return Param(key, kind, (low, high))


def format_value(value: Any) -> str:
    """A value as the CLI parses it: JSON for lists, dicts, booleans and None; repr for floats."""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (bool, list, tuple, dict)) or value is None:
        return json.dumps(value)
    return str(value)


def overrides_to_args(overrides: Mapping[str, Any]) -> list[str]:
    """`{"model.init_args.inner_lr": 0.1}` -> `["--model.init_args.inner_lr=0.1"]`."""
    return [f"--{key}={format_value(value)}" for key, value in overrides.items()]


def replay_command(config: str | Path, args: Sequence[str], overrides: Mapping[str, Any]) -> str:
    """The one `lightning-meta fit` command that reruns a trial.

    Args:
        config: the base config.
        args: overrides common to every trial of the sweep.
        overrides: the trial's sampled values.
    """
    words = ["lightning-meta", "fit", "--config", str(config), *args, *overrides_to_args(overrides)]
    return shlex.join(words)


class ConfigChecker:
    """Parses `lightning-meta fit` arguments with the real CLI parser, without training anything.

    Builds the CLI once (`run_cli(run=False)`, which checks that the base config and the common
    arguments build), then reuses its parser for every probe.

    Args:
        config: the base config.
        args: overrides common to every trial.
    """

    def __init__(self, config: str | Path, args: Sequence[str] = ()) -> None:
        from lightning_meta.cli import run_cli

        self.config, self.args = str(config), list(args)
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
                self.cli = run_cli(["--config", self.config, *self.args, "--trainer.logger=false"], run=False)
        except SystemExit as error:
            raise SpaceError(
                f"the base config does not parse: lightning-meta fit --config {shlex.join([self.config, *self.args])}"
                f"\n{stderr.getvalue().strip()}"
            ) from error
        self.parser = self.cli.parser
        self.parser.exit_on_error = False

    def parse(self, overrides: Mapping[str, Any]) -> Any:
        """The parsed config namespace of the base config plus `overrides`.

        Raises:
            SpaceError: with the parser's own message.
        """
        argv = ["--config", self.config, *self.args, *overrides_to_args(overrides)]
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                return self.parser.parse_args(argv)
        except (Exception, SystemExit) as error:
            message = "\n".join("    " + line for line in str(error).strip().splitlines())
            raise SpaceError(message) from error

    def dump(self, overrides: Mapping[str, Any]) -> str:
        """The fully resolved config of base + `overrides`, as YAML that `lightning-meta fit --config` takes."""
        return self.parser.dump(self.parse(overrides))

    def check(self, space: SearchSpace) -> None:
        """Parse every key of `space` at each of its probe values (others at their first probe).

        Raises:
            SpaceError: naming the space file, the key and the value that the CLI refused.
        """
        base = {p.key: p.probe_values()[0] for p in space.params}
        for p in space.params:
            for value in p.probe_values():
                try:
                    self.parse({**base, p.key: value})
                except SpaceError as error:
                    raise SpaceError(
                        f"{space.source}: {p.key}={format_value(value)} ({p.kind}) is refused by "
                        f"`lightning-meta fit --config {self.config}`:\n{error}"
                    ) from None

    def get(self, namespace: Any, key: str) -> Any:
        """The value at dotted `key` of a parsed namespace, or None."""
        for part in key.split("."):
            if namespace is None or not hasattr(namespace, "__contains__") or part not in namespace:
                return None
            namespace = namespace[part]
        return namespace


def metric_mode(metric: str) -> str:
    """`min` or `max` from the metric's name: losses and errors go down, accuracies up.

    Raises:
        ValueError: for a name that says neither; pass `--mode` then.
    """
    name = metric.rsplit("/", 1)[-1].lower()
    if any(word in name for word in ("acc", "f1", "auc", "reward", "return", "score")):
        return "max"
    if any(word in name for word in ("loss", "error", "mse", "mae", "nll", "perplexity")):
        return "min"
    raise ValueError(f"cannot tell whether {metric!r} should go up or down: pass --mode min or --mode max")
