"""The Trainer every benchmark here runs: training only, nothing written, nothing printed.

The scripts in this folder run as `python benchmarks/<name>.py`, so this module is importable
by its bare name beside them.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl

QUIET = dict(
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    limit_val_batches=0,
    num_sanity_val_steps=0,
    inference_mode=False,  # gradient-based algorithms adapt during evaluation too
)


def bare_trainer(**overrides: Any) -> pl.Trainer:
    """A `pl.Trainer` with no logger, checkpoints, progress bar, summary or validation;
    `overrides` (max_steps, callbacks, devices...) are passed through."""
    return pl.Trainer(**{**QUIET, **overrides})
