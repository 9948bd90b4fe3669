"""The loss of a backbone's training step: plain, re-id (triplet), and BCT/BiCT influence.

An objective's `spec` enters the backbone's config, and so its cache key.

Explained in the book: book/baselines.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from rmlib.losses import batch_hard_triplet_loss, bct_influence_loss
from rmlib.models import RetrievalModel


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

    BCT: the old model's classifier on the old classes (Shen et al. 2020). BiCT: the
    classifier of the upgraded old space h'(phi_old) on all classes (our reading of Su et
    al. 2022: the new model is made backward compatible with the *upgraded* old gallery).
    """

    def __init__(self, name: str, classifier: torch.nn.Module, num_classes: int,
                 source: str, weight: float = 1.0, base: Objective | None = None):
        self.classifier = classifier.eval()
        for p in self.classifier.parameters():
            p.requires_grad_(False)
        self.num_classes, self.weight = num_classes, weight
        self.base = base or Objective()
        self.spec = {"name": name, "source": source, "weight": weight}
        if self.base.spec != Objective.spec:
            self.spec["base"] = self.base.spec

    def __call__(self, model, embedding, logits, labels, config):
        self.classifier.to(embedding.device)  # a transform's classifier comes on the CPU
        loss = self.base(model, embedding, logits, labels, config)
        influence = bct_influence_loss(embedding.float(), labels, self.classifier,
                                       self.num_classes, config.label_smoothing)
        return loss + self.weight * influence
