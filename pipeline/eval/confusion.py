"""The confusion matrix of a classifier on a held-out split: counts[true, predicted].

Built in the same pass as the stage's accuracy (`train.loop.evaluate`), so its diagonal over its
total is exactly the accuracy the stage reports, and written beside the stage's result.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.atomic import write_json
from pipeline.run_layout import CONFUSION_FILE

# Above this many classes the matrix is not built: 1000 classes are 8 MB summed across ranks and
# a 4 MB JSON; ImageNet-21k's would be 3.8 GB.
MAX_CONFUSION_CLASSES = 1000


def confusion_counts(predicted: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                     num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts of (true, predicted) over the samples `mask` keeps
    (the padding that evens out ranks' batches is not counted)."""
    index = labels[mask].long() * num_classes + predicted[mask].long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def accuracy_of(counts) -> float:
    """Top-1 accuracy of a confusion matrix: its diagonal over its total."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    return float(counts.diagonal().sum() / counts.sum().clamp(min=1))


def write_confusion(out_dir: str | Path, counts, class_names: list[str] | None, split: str, step: int) -> Path:
    """`<out_dir>/confusion.json`: {split, step, class_names, counts (rows: true class, columns: predicted)}."""
    rows = torch.as_tensor(counts).tolist()
    return write_json(Path(out_dir) / CONFUSION_FILE, {"split": split, "step": step, "class_names": class_names,
                                                       "total": int(sum(map(sum, rows))), "counts": rows})
