"""Meta-RL task distributions: batched torch families for training, Gymnasium twins for users.

Importing this package registers the Gymnasium ids (`lightning_meta/Bandit-v0`,
`lightning_meta/TabularMDP-v0`, `lightning_meta/Navigation2D-v0`); Gymnasium is the `rl` extra
(`pip install lightning-meta[rl]`), needed only by `gym_envs`. Nothing here imports Lightning (DESIGN.md layering).
"""

from lightning_meta.envs.families import (
    BernoulliBandit,
    Navigation2D,
    Noise,
    TabularMDP,
    TaskFamily,
    Tasks,
    TaskSpecBatch,
    step_noise,
)

try:
    from lightning_meta.envs.gym_envs import register as _register
except ImportError:  # gymnasium (the `rl` extra) is not installed: the batched families still work
    pass
else:
    _register()

__all__ = [
    "BernoulliBandit",
    "Navigation2D",
    "Noise",
    "TabularMDP",
    "TaskFamily",
    "TaskSpecBatch",
    "Tasks",
    "step_noise",
]
