"""One W&B run per trial, logged from the sweep's driver by Ray's `WandbLoggerCallback`.

Why the driver and not Lightning's `WandbLogger` inside each trial: Tune ends a trial that ASHA
stops (or that reaches its budget) by tearing its process down right after the stop decision,
so a trial-side run is cut off mid-write; Ray's callback logs every reported result from a
separate logging actor per trial, which finishes the run when Tune says the trial ended. Runs
are grouped by the sweep's name, carry the trial's sampled values as config, and go offline
unless W&B credentials exist (the sweep sets `WANDB_MODE`).

Two fixes over Ray 2.60's callback, found by reading the offline runs back:

- Runs go straight into their trial's folder (local storage). Ray writes them to its driver
  staging folder and copies that to storage at Tune's last sync, which comes before the runs
  finish: the copies lacked their end.
- The logging actor tears W&B down before returning. Ray kills the actor (and with it W&B's core
  process) as soon as `run()` returns, and `wandb.finish()` returns before the core has flushed
  an offline run: some runs were left with their header only.
"""

from __future__ import annotations

from typing import Any

import wandb
from ray.air.integrations.wandb import WandbLoggerCallback, _WandbLoggingActor


class FlushingLoggingActor(_WandbLoggingActor):
    """Ray's per-trial W&B logging actor, which returns only once W&B has written everything."""

    def run(self) -> None:
        super().run()
        wandb.teardown()


class TrialWandbCallback(WandbLoggerCallback):
    """`WandbLoggerCallback` writing each run into its trial's folder, flushed before it returns.

    Args:
        local_storage: whether trial folders are local paths (else Ray's default place).
        **kwargs: `WandbLoggerCallback`'s arguments (project, group, ...).
    """

    _logger_actor_cls = FlushingLoggingActor

    def __init__(self, local_storage: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.local_storage = local_storage

    def log_trial_start(self, trial: Any) -> None:
        if self.local_storage:
            self.kwargs["dir"] = trial.path
        super().log_trial_start(trial)
