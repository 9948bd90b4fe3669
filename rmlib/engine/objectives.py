"""The loss of a backbone's training step: plain, re-id (triplet), and BCT/BiCT influence.

An objective's `spec` enters the backbone's config, and so its cache key.

Explained in the book: book/baselines.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from rmlib import RmlibError
from rmlib.losses import batch_hard_triplet_loss, bct_influence_loss
from rmlib.models import CosineClassifier, RetrievalModel


class Smoothed(Protocol):
    """What an objective reads of the backbone's config."""

    label_smoothing: float


class Objective:
    """Cross-entropy with label smoothing on the cosine classifier's logits."""

    spec: dict = {"name": "ce"}

    def __call__(self, model: RetrievalModel, embedding: torch.Tensor, logits: torch.Tensor,
                 labels: torch.Tensor, config: Smoothed) -> torch.Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=config.label_smoothing)


class TripletObjective(Objective):
    """Cross-entropy with label smoothing plus a batch-hard triplet loss (re-id)."""

    def __init__(self, margin: float = 0.3):
        self.margin = margin
        self.spec = {"name": "ce+triplet", "margin": margin}

    def __call__(self, model, embedding, logits, labels, config):
        ce = super().__call__(model, embedding, logits, labels, config)
        return ce + batch_hard_triplet_loss(embedding.float(), labels, self.margin)


class InfluenceObjective(Objective):
    """The base objective plus an influence loss through a frozen classifier of another space.

    BCT (Shen et al. 2020): the old model's classifier, extended to the classes it never
    saw by `synthesised_classifier`, on every class, with plain cross-entropy
    (`smoothing=0`). Its variant on the old classes only (`num_classes` the old model's),
    smoothed as the backbone is, is kept as an ablation. BiCT, upgrade first (an ablation):
    the classifier of the upgraded old space h'(phi_old) on all classes. `variant`: what
    else sets this objective apart, recorded in its `spec` (and so in the cache key).
    """

    def __init__(self, name: str, classifier: torch.nn.Module, num_classes: int,
                 source: str, weight: float = 1.0, base: Objective | None = None,
                 smoothing: float | None = None, variant: dict | None = None):
        self.classifier = classifier.eval()
        for p in self.classifier.parameters():
            p.requires_grad_(False)
        self.num_classes, self.weight, self.smoothing = num_classes, weight, smoothing
        self.base = base or Objective()
        self.spec = {"name": name, "source": source, "weight": weight, **(variant or {})}
        if smoothing is not None:  # None: the backbone's own label smoothing
            self.spec["smoothing"] = smoothing
        if self.base.spec != Objective.spec:
            self.spec["base"] = self.base.spec

    def __call__(self, model, embedding, logits, labels, config):
        self.classifier.to(embedding.device)  # a transform's classifier comes on the CPU
        loss = self.base(model, embedding, logits, labels, config)
        smoothing = config.label_smoothing if self.smoothing is None else self.smoothing
        influence = bct_influence_loss(embedding.float(), labels, self.classifier,
                                       self.num_classes, smoothing)
        return loss + self.weight * influence


def synthesised_classifier(old_classifier: CosineClassifier, old_embeddings: torch.Tensor,
                           labels: torch.Tensor, num_classes: int) -> CosineClassifier:
    """BCT's classifier for a new training set (Shen et al. 2020, sec. 3.3): the old
    model's class weights for the classes it was trained on, and for every class it never
    saw, the normalised mean of the old model's embeddings of that class's training items.
    The influence loss can then tie every new-model embedding to the old space, not only
    those of the old classes."""
    old_weight = old_classifier.weight.detach().float().cpu()
    num_old, dim = old_weight.shape
    embeddings = torch.as_tensor(old_embeddings, dtype=torch.float32)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    sums = torch.zeros(num_classes, dim).index_add_(0, labels, embeddings)
    counts = torch.bincount(labels, minlength=num_classes)
    missing = [c for c in range(num_old, num_classes) if counts[c] == 0]
    if missing:
        raise RmlibError(f"cannot synthesise BCT's classifier: classes {missing[:5]} have no "
                         "training items")
    weight = torch.cat([F.normalize(old_weight, dim=1),
                        F.normalize(sums[num_old:], dim=1)])
    classifier = CosineClassifier(dim, num_classes, old_classifier.scale)
    with torch.no_grad():
        classifier.weight.copy_(weight)
    return classifier.eval()
