"""A few-shot task of one's own, read from folders, for `lightning-meta predict`.

```
my_task/
  support/<class name>/*.png|jpg   labelled examples, one folder per class
  query/*.png|jpg                  the images to classify
```

Images are decoded as the model's training images were (`ImageFormat`: size, greyscale or RGB,
inversion), so a model meta-trained on Omniglot reads new drawings as it read Omniglot's.
Predictions are written as a CSV of query file, predicted class name and its probability.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lightning_meta.data.folders import class_folders
from lightning_meta.data.images import IMAGE_SUFFIXES, ImageFormat, image_files
from lightning_meta.task import TaskBatch

__all__ = ["FolderTask", "format_table", "load_folder_task", "write_predictions"]


@dataclass
class FolderTask:
    """A support set with class names and unlabelled queries, as tensors.

    Attributes:
        support_x: float `[S, C, H, W]` in [0, 1].
        support_y: long `[S]`, indices into `class_names`.
        class_names: the support folders' names, sorted.
        query_x: float `[Q, C, H, W]` in [0, 1].
        query_files: the query images, sorted by name.
    """

    support_x: Tensor
    support_y: Tensor
    class_names: list[str]
    query_x: Tensor
    query_files: list[Path]

    def as_batch(self) -> TaskBatch:
        """A batch of this one task, for `Trainer.predict` (query labels are placeholders, unread)."""
        placeholder = torch.zeros(len(self.query_files), dtype=torch.long)
        return TaskBatch(self.support_x[None], self.support_y[None], self.query_x[None], placeholder[None])


def _read_all(files: list[Path], image_format: ImageFormat) -> Tensor:
    return torch.from_numpy(np.stack([image_format.read(f) for f in files])).to(torch.float32).div_(255.0)


def load_folder_task(folder: str | Path, image_format: ImageFormat) -> FolderTask:
    """Read `folder/support/<class>/*` and `folder/query/*` (module docstring).

    Raises:
        FileNotFoundError: `folder`, its `support/` or its `query/` is missing.
        ValueError: no support class, an empty class folder or query folder, or an unreadable
            image; each message names the path and the fix.
    """
    folder = Path(folder).expanduser()
    layout = f"{folder}/support/<class name>/*.png and {folder}/query/*.png (or .jpg)"
    if not folder.is_dir():
        raise FileNotFoundError(f"--folders {folder} is not a folder: give a folder laid out as {layout}")
    for sub in ("support", "query"):
        if not (folder / sub).is_dir():
            raise FileNotFoundError(f"{folder} has no {sub}/ folder: lay it out as {layout}")
    classes = class_folders(folder / "support", "support classes")
    query_files = image_files(folder / "query")
    if not query_files:
        raise ValueError(
            f"{folder / 'query'} holds no images (endings {', '.join(IMAGE_SUFFIXES)}): put the images to "
            "classify there"
        )
    files = [f for fs in classes.values() for f in fs]
    labels = [c for c, fs in enumerate(classes.values()) for _ in fs]
    return FolderTask(
        support_x=_read_all(files, image_format),
        support_y=torch.tensor(labels, dtype=torch.long),
        class_names=list(classes),
        query_x=_read_all(query_files, image_format),
        query_files=query_files,
    )


def write_predictions(path: Path, task: FolderTask, probabilities: Tensor) -> list[tuple[str, str, float]]:
    """Write `query_file,predicted_class,probability` rows (files relative to `query/`); return them."""
    probability, best = probabilities.max(-1)
    rows = [
        (file.name, task.class_names[int(c)], float(p))
        for file, c, p in zip(task.query_files, best.tolist(), probability.tolist(), strict=True)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["query_file", "predicted_class", "probability"])
        writer.writerows((file, name, f"{p:.4f}") for file, name, p in rows)
    return rows


def format_table(rows: list[tuple[str, str, float]], limit: int = 20) -> str:
    """The first `limit` rows as an aligned text table (and how many more there are)."""
    shown = [("query_file", "predicted_class", "probability")] + [(a, b, f"{p:.3f}") for a, b, p in rows[:limit]]
    widths = [max(len(r[i]) for r in shown) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in shown]
    if len(rows) > limit:
        lines.append(f"... and {len(rows) - limit} more (all in the CSV)")
    return "\n".join(lines)
