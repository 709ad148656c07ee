"""Meta-RL task distributions: batched torch families for training, Gymnasium twins for users.

Importing this package registers the Gymnasium ids (`lightning_meta/Bandit-v0`,
`lightning_meta/TabularMDP-v0`, `lightning_meta/Navigation2D-v0`, and the MuJoCo ones,
`lightning_meta/HalfCheetahVel-v0` etc.); Gymnasium is the `rl` extra
(`pip install lightning-meta[rl]`), needed only by `gym_envs`. The MuJoCo locomotion families
(`HalfCheetahVel`, `HalfCheetahDir`, `AntDir`) import here without MuJoCo and need the `mujoco`
extra (`pip install lightning-meta[mujoco]`) to step; `MetaWorldML1` (Meta-World's ML1 goals,
`lightning_meta/MetaWorldML1-v0`) imports here without Meta-World and needs the `metaworld`
extra (`pip install lightning-meta[metaworld]`) to be constructed. Nothing here imports
Lightning (DESIGN.md layering).
"""

import importlib.util

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
from lightning_meta.envs.locomotion import AntDir, HalfCheetahDir, HalfCheetahVel, LocomotionFamily
from lightning_meta.envs.metaworld_ml1 import MetaWorldML1

if importlib.util.find_spec("gymnasium") is not None:  # the `rl` extra; the batched families need only torch
    from lightning_meta.envs.gym_envs import register as _register

    _register()

__all__ = [
    "AntDir",
    "BernoulliBandit",
    "HalfCheetahDir",
    "HalfCheetahVel",
    "LocomotionFamily",
    "MetaWorldML1",
    "Navigation2D",
    "Noise",
    "TabularMDP",
    "TaskFamily",
    "TaskSpecBatch",
    "Tasks",
    "step_noise",
]
