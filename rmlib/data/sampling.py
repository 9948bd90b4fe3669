"""Class-balanced P x K batches: P classes, K items each, so every anchor has positives.

Explained in the book: book/mcl.
"""

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


def pk_batches_vectorised(labels: torch.Tensor, classes: int, per_class: int,
                          generator: torch.Generator) -> list[torch.Tensor]:
    """`pk_batches` in a handful of tensor operations on the labels' device (a GPU draws
    its own batches): each item once, groups of up to `per_class` items of one class,
    `classes` groups a batch. Two reads of the device per epoch (the number of groups and
    the batch sizes), none per batch. Random streams differ from `pk_batches`'."""
    device, n = labels.device, len(labels)
    noise = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    by_class = torch.argsort(labels.to(torch.float64) * 2 + noise)  # classes, shuffled within
    sorted_labels = labels[by_class]
    counts = torch.bincount(sorted_labels)
    rank = torch.arange(n, device=device) - (torch.cumsum(counts, 0) - counts)[sorted_labels]
    groups_of_class = (counts + per_class - 1) // per_class
    group = (torch.cumsum(groups_of_class, 0) - groups_of_class)[sorted_labels] \
        + rank // per_class
    num_groups = int(groups_of_class.sum())  # read 1
    place = torch.empty(num_groups, dtype=torch.int64, device=device)
    place[torch.randperm(num_groups, generator=generator, device=device)] = torch.arange(
        num_groups, device=device)
    slot = place[group] * per_class + rank % per_class
    items = by_class[torch.argsort(slot)]
    sizes = torch.bincount(place[group] // classes).tolist()  # read 2
    return list(items.split(sizes))
