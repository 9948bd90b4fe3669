"""Class-balanced P x K batches: P classes, K items each, so every anchor has positives."""

from __future__ import annotations

import math

import numpy as np
import torch


def pk_batches(labels: torch.Tensor, classes: int, per_class: int, generator: torch.Generator
               ) -> list[torch.Tensor]:
    """One epoch of class-balanced batches: each item once, in groups of `per_class` items
    of one class, `classes` groups a batch, so every anchor has positives in its batch."""
    groups = []
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c)[:, 0]
        idx = idx[torch.randperm(len(idx), generator=generator)]
        groups.extend(idx.split(per_class))
    order = torch.randperm(len(groups), generator=generator).tolist()
    groups = [groups[i] for i in order]
    return [torch.cat(groups[i:i + classes]) for i in range(0, len(groups), classes)]


def pk_batch_count(labels: np.ndarray, classes: int, per_class: int) -> int:
    """How many batches `pk_batches` makes of `labels` in one epoch."""
    counts = np.unique(np.asarray(labels), return_counts=True)[1]
    groups = sum(math.ceil(int(n) / per_class) for n in counts)
    return math.ceil(groups / classes)
