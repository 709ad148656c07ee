"""Ray Tune sweeps over `lightning-meta` configs: the only package of the project that imports Ray.

A sweep samples overrides of a base config from a YAML search space keyed by dotted CLI paths
(`tune.space`), runs each trial as a `lightning-meta fit` run with those overrides (`tune.trial`),
and writes a results table, the best config as a ready-to-run YAML and a plot (`tune.report`).
`python -m tune --help` (`tune.cli`) is the command; `tune.sweep.run_sweep` the same from Python.
Kept outside `lightning_meta` so the library imports and runs without Ray installed.
"""
