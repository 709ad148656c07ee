"""Per-task data augmentation as batched torch ops, drawn from the task's own generator.

A task is a pure function of its global index (`sampler.py`): its classes, examples and label
permutation come from `task_rng(seed, stream, index)`. `Augmentation` draws every random
parameter from that same generator, after the task's examples are chosen, so an augmented task
is still a pure function of its index: DDP ranks see the same augmented tasks as one process,
a resumed run the same as an uninterrupted one, and turning augmentation on changes neither
which classes nor which examples a task holds.

Geometric transforms (random resized crop, horizontal flip, rotation, shift) are composed into
one affine map per image and applied with one `grid_sample` over all images of the task;
colour jitter (brightness, contrast, saturation) follows. Nothing here imports Lightning.

Omniglot's usual augmentation is small rotations and shifts of each drawing (ink high,
background 0, so the zero padding is background); natural images take a random resized crop,
a flip and colour jitter.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Augmentation"]


def _pair(value: float | tuple[float, float] | list[float], name: str, symmetric: bool) -> tuple[float, float] | None:
    """(low, high) from a number (±value when symmetric, else (value, value)) or a pair; None if off."""
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{name}={value} must be >= 0 (0 turns it off)")
        if value == 0:
            return None
        return (-float(value), float(value)) if symmetric else (float(value), float(value))
    if len(value) != 2 or value[0] > value[1]:
        raise ValueError(f"{name}={list(value)} must be a number or a [low, high] pair with low <= high")
    return float(value[0]), float(value[1])


class Augmentation:
    """Random per-image augmentation of a task's images, drawn from the task's generator.

    Every option defaults to off; set only what the data calls for. Each image of the task gets
    its own draw.

    Args:
        crop_scale: random resized crop: the crop's area as a fraction of the image's, drawn
            uniformly from [low, high] (e.g. [0.08, 1.0] as in Inception/torchvision; None: off).
        crop_ratio: the crop's aspect ratio range (log-uniform), e.g. [3/4, 4/3].
        flip: probability of a horizontal flip.
        rotation: degrees: a number d draws from [-d, d], a pair from [low, high].
        shift: translation as a fraction of the image side: a number s draws each axis from
            [-s, s] (Omniglot's few-pixel shifts: e.g. 0.1 at 28×28 is ±2.8 pixels).
        brightness: a number b multiplies by a factor from [1 - b, 1 + b].
        contrast: a number c blends with the image's mean by a factor from [1 - c, 1 + c].
        saturation: a number s blends with the greyscale image by a factor from [1 - s, 1 + s]
            (RGB only; refused on one channel).
        max_value: the images' value range is [0, max_value] (1 for the readers here, which
            scale uint8 to [0, 1]); colour jitter clamps to it.
        apply_to: "both" (support and query images), "support" or "query".
        eval_tasks: augment validation and test tasks too (default: training tasks only).
    """

    def __init__(
        self,
        crop_scale: tuple[float, float] | None = None,
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: float = 0.0,
        rotation: float | tuple[float, float] = 0.0,
        shift: float = 0.0,
        brightness: float = 0.0,
        contrast: float = 0.0,
        saturation: float = 0.0,
        max_value: float = 1.0,
        apply_to: str = "both",
        eval_tasks: bool = False,
    ) -> None:
        if crop_scale is not None:
            low, high = crop_scale
            if not 0 < low <= high <= 1:
                raise ValueError(f"crop_scale={list(crop_scale)} must satisfy 0 < low <= high <= 1, e.g. [0.08, 1.0]")
        if not 0 < crop_ratio[0] <= crop_ratio[1]:
            raise ValueError(f"crop_ratio={list(crop_ratio)} must satisfy 0 < low <= high, e.g. [0.75, 1.333]")
        if not 0 <= flip <= 1:
            raise ValueError(f"flip={flip} is a probability: it must be in [0, 1]")
        if not 0 <= shift < 1:
            raise ValueError(f"shift={shift} is a fraction of the image side: it must be in [0, 1)")
        for key, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if not 0 <= value <= 1:
                raise ValueError(f"{key}={value} must be in [0, 1] (a factor is drawn from [1 - {key}, 1 + {key}])")
        if max_value <= 0:
            raise ValueError(f"max_value={max_value} must be > 0 (1 for images scaled to [0, 1], 255 for raw bytes)")
        if apply_to not in ("both", "support", "query"):
            raise ValueError(f"apply_to={apply_to!r} must be one of 'both', 'support', 'query'")
        self.crop_scale = tuple(crop_scale) if crop_scale is not None else None
        self.crop_ratio = tuple(crop_ratio)
        self.flip, self.shift = float(flip), float(shift)
        self.rotation = _pair(rotation, "rotation", symmetric=True)
        self.brightness, self.contrast, self.saturation = float(brightness), float(contrast), float(saturation)
        self.max_value, self.apply_to, self.eval_tasks = float(max_value), apply_to, eval_tasks

    @property
    def geometric(self) -> bool:
        return self.crop_scale is not None or self.flip > 0 or self.rotation is not None or self.shift > 0

    @property
    def colour(self) -> bool:
        return self.brightness > 0 or self.contrast > 0 or self.saturation > 0

    def __repr__(self) -> str:
        keys = ("crop_scale", "flip", "rotation", "shift", "brightness", "contrast", "saturation", "apply_to")
        return f"Augmentation({', '.join(f'{k}={getattr(self, k)!r}' for k in keys)})"

    # ----------------------------------------------------------------------------- parameters

    def affine(self, n: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
        """`[n, 2, 3]` affine maps from output to input coordinates (`F.affine_grid`'s θ).

        Coordinates are normalised to [-1, 1] per axis; the map is crop ∘ shift ∘ rotation ∘
        flip: the output pixel at (x, y) reads the input at θ·(x, y, 1).
        """
        theta = np.zeros((n, 2, 3))
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        if self.crop_scale is not None:
            # The crop's size in normalised units: area fraction s and aspect r = w/h (in pixels).
            area = rng.uniform(*self.crop_scale, size=n)
            log_r = rng.uniform(math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1]), size=n)
            ratio = np.exp(log_r)
            sx = np.minimum(np.sqrt(area * ratio * height / width), 1.0)  # crop width / image width
            sy = np.minimum(np.sqrt(area / ratio * width / height), 1.0)  # crop height / image height
            cx = rng.uniform(-1.0, 1.0, size=n) * (1.0 - sx)
            cy = rng.uniform(-1.0, 1.0, size=n) * (1.0 - sy)
            crop = np.zeros((n, 3, 3))
            crop[:, 0, 0], crop[:, 1, 1], crop[:, 0, 2], crop[:, 1, 2], crop[:, 2, 2] = sx, sy, cx, cy, 1.0
            theta = crop[:, :2] @ np.concatenate([theta, np.tile([[[0.0, 0.0, 1.0]]], (n, 1, 1))], axis=1)
        rest = np.tile(np.eye(3), (n, 1, 1))
        if self.shift > 0:
            # A shift of t (fraction of the side) moves content by t, i.e. 2t normalised units.
            rest[:, 0, 2] = -2.0 * rng.uniform(-self.shift, self.shift, size=n)
            rest[:, 1, 2] = -2.0 * rng.uniform(-self.shift, self.shift, size=n)
        if self.rotation is not None:
            angle = np.deg2rad(rng.uniform(*self.rotation, size=n))
            cos, sin = np.cos(angle), np.sin(angle)
            rot = np.tile(np.eye(3), (n, 1, 1))
            # In pixel units, so a rotation of a non-square image stays a rotation.
            aspect = height / width
            rot[:, 0, 0], rot[:, 0, 1] = cos, -sin * aspect
            rot[:, 1, 0], rot[:, 1, 1] = sin / aspect, cos
            rest = rest @ rot
        if self.flip > 0:
            flips = np.where(rng.random(size=n) < self.flip, -1.0, 1.0)
            flip = np.tile(np.eye(3), (n, 1, 1))
            flip[:, 0, 0] = flips
            rest = rest @ flip
        full = np.concatenate([theta, np.tile([[[0.0, 0.0, 1.0]]], (n, 1, 1))], axis=1) @ rest
        return full[:, :2]

    # ----------------------------------------------------------------------------- application

    def images(self, x: Tensor, rng: np.random.Generator) -> Tensor:
        """Augment a batch of images `[n, C, H, W]` (float), each with its own draw from `rng`."""
        if x.dim() != 4:
            raise ValueError(f"Augmentation works on images [n, channels, height, width]; got shape {tuple(x.shape)}")
        n, channels, height, width = x.shape
        if self.saturation > 0 and channels != 3:
            raise ValueError(f"saturation={self.saturation} needs RGB images; these have {channels} channel(s)")
        if self.geometric:
            theta = torch.as_tensor(self.affine(n, height, width, rng), dtype=x.dtype)
            grid = F.affine_grid(theta, [n, channels, height, width], align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if self.colour:
            x = self._jitter(x, rng)
        return x

    def _factors(self, amount: float, n: int, rng: np.random.Generator, dtype: torch.dtype) -> Tensor:
        return torch.as_tensor(rng.uniform(1.0 - amount, 1.0 + amount, size=n), dtype=dtype).view(n, 1, 1, 1)

    def _jitter(self, x: Tensor, rng: np.random.Generator) -> Tensor:
        n = x.shape[0]
        if self.brightness > 0:
            x = x * self._factors(self.brightness, n, rng, x.dtype)
        if self.contrast > 0:
            grey = _greyscale(x).mean(dim=(1, 2, 3), keepdim=True)
            x = grey + self._factors(self.contrast, n, rng, x.dtype) * (x - grey)
        if self.saturation > 0:
            grey = _greyscale(x)
            x = grey + self._factors(self.saturation, n, rng, x.dtype) * (x - grey)
        return x.clamp(0.0, self.max_value)

    def task_images(self, support_x: Tensor, query_x: Tensor, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        """Augment a task's support and query images (as `apply_to` says), drawn from `rng`.

        Support and query images are augmented in one batch (one draw per image), so the draw
        an image gets does not depend on `apply_to`.
        """
        if x_dims := {support_x.dim(), query_x.dim()} - {4}:
            raise ValueError(
                f"Augmentation needs image tasks ([n, channels, height, width]); got {sorted(x_dims)}-d inputs"
            )
        both = self.images(torch.cat([support_x, query_x]), rng)
        new_support, new_query = both[: len(support_x)], both[len(support_x) :]
        if self.apply_to == "support":
            return new_support, query_x
        if self.apply_to == "query":
            return support_x, new_query
        return new_support, new_query


def _greyscale(x: Tensor) -> Tensor:
    """ITU-R 601 luma for RGB, the image itself for one channel; `[n, 1, H, W]`."""
    if x.shape[1] == 3:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(1, 3, 1, 1)
        return (x * weights).sum(dim=1, keepdim=True)
    return x.mean(dim=1, keepdim=True)
