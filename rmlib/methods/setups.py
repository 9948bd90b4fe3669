"""The data sets under the old/new protocol, and the backbone configs each role trains with.

CIFAR-100: the old model trains on the training images of fine classes 0-49, the new one
on all 100; both are evaluated leave-one-out on the 10,000 test images (query set =
gallery set, each query's own image excluded, relevant = same fine class).
Market-1501: the old model trains on the first half of the sorted training identities,
the new one on all; the standard query/gallery protocol (same id and same camera removed,
distractors kept, junk dropped by the reader).
The smoke profile takes a small real, class-balanced subset of both CIFAR-100 splits.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import numpy as np

from rmlib.config import Config
from rmlib.data import ImageSet, load_cifar100, load_market1501, market_old_ids, old_class_mask
from rmlib.data.cifar import NUM_CLASSES, OLD_CLASSES
from rmlib.data.market import IMAGENET_MEAN, IMAGENET_STD, read_images
from rmlib.engine.backbones import BackboneConfig
from rmlib.engine.objectives import Objective, TripletObjective
from rmlib.evaluation.emb_file import BackfillArrays
from rmlib.evaluation.retrieval import Protocol

ROLES = ("old", "new")


def per_class_subset(data: ImageSet, per_class: int | None) -> ImageSet:
    """The first `per_class` items of each class (all of them when None), order kept."""
    if per_class is None:
        return data
    keep = np.zeros(len(data), dtype=bool)
    for c in np.unique(data.labels):
        keep[np.flatnonzero(data.labels == c)[:per_class]] = True
    return data.subset(np.flatnonzero(keep))


@dataclass
class Setup:
    """A data set under the old/new protocol: the training images (and the old model's
    share of them) and the evaluation sets. Without a gallery, evaluation is leave-one-out
    on the query set (CIFAR-100); with one, Market-1501's camera protocol applies."""

    dataset: str
    config: Config
    train: ImageSet
    old_mask: np.ndarray
    num_old_classes: int
    num_classes: int
    query: ImageSet
    gallery: ImageSet | None = None
    query_cams: np.ndarray | None = None
    gallery_cams: np.ndarray | None = None
    extra: dict | None = None
    old_backbone: dict | None = None  # old-model config fields replaced (rmlib.methods.beyond)

    @property
    def profile(self) -> str:
        return self.config.name

    @property
    def test_time_views(self) -> str:
        """How query and gallery images are embedded (rmlib.engine.embed.VIEWS)."""
        recipe = self.config.profile.cifar if self.dataset == "cifar100" else \
            self.config.profile.market
        return recipe.tta

    @property
    def test(self) -> ImageSet:
        """CIFAR-100's test set (queries = gallery)."""
        return self.query

    @property
    def protocol(self) -> Protocol:
        if self.gallery is None:
            return Protocol.leave_one_out(self.query.labels)
        return Protocol.camera(self.query.labels, self.gallery.labels, self.query_cams,
                               self.gallery_cams)

    def arrays(self, old_q: np.ndarray, old_g: np.ndarray, new_q: np.ndarray,
               new_g: np.ndarray, reference: tuple[np.ndarray, np.ndarray] | None = None
               ) -> BackfillArrays:
        """Two retrieval systems over this setup's gallery, as the evaluator reads them;
        `reference`: the deployed old system (queries, gallery) for negative flips."""
        ref_q, ref_g = reference if reference is not None else (None, None)
        if self.gallery is None:
            return BackfillArrays(old_q, old_g, new_q, new_g, self.query.labels,
                                  reference_query=ref_q, reference_gallery=ref_g)
        return BackfillArrays(old_q, old_g, new_q, new_g, self.query.labels,
                              self.gallery.labels, self.query_cams, self.gallery_cams,
                              ref_q, ref_g)

    def training_set(self, role: str) -> ImageSet:
        """The old model's share of the training images, or all of them."""
        if role == "old":
            return self.train.subset(np.flatnonzero(self.old_mask))
        return self.train

    def objective(self) -> Objective:
        """Cross-entropy (CIFAR-100); cross-entropy plus batch-hard triplet (Market-1501)."""
        if self.dataset == "market1501":
            return TripletObjective(self.config.profile.market.triplet_margin)
        return Objective()

    def backbone_config(self, role: str) -> BackboneConfig:
        """The config of the old or new backbone (BCT and BiCT copy the new one's)."""
        old = role == "old"
        num_classes = self.num_old_classes if old else self.num_classes
        common = {"profile": self.profile, "role": role, "num_classes": num_classes,
                  "seed": 0 if old else 1}
        if self.dataset == "cifar100":
            r = self.config.profile.cifar
            config = BackboneConfig(
                dataset="cifar100", arch=r.arch, widths=tuple(r.widths),
                epochs=r.epochs_old if old else r.epochs_new, batch_size=r.batch_size, lr=r.lr,
                low_res_epochs=r.low_res_epochs_old if old else r.low_res_epochs_new,
                **dict(r.options), **common)
            return replace(config, **self.old_backbone) if old and self.old_backbone else config
        m = self.config.profile.market
        return BackboneConfig(
            dataset="market1501", arch=m.arch, widths=(),
            epochs=m.epochs_old if old else m.epochs_new, batch_size=m.sampler[0] * m.sampler[1],
            lr=m.lr, weight_decay=5e-4, padding=m.padding, mean=IMAGENET_MEAN, std=IMAGENET_STD,
            sampler=tuple(m.sampler), erase=m.erase, image_size=tuple(m.image_size),
            objective=self.objective().spec, **common)


def cifar_setup(config: Config) -> Setup:
    recipe = config.profile.cifar
    root, download = config.paths.data, config.download
    train = per_class_subset(load_cifar100("train", root, download), recipe.train_per_class)
    test = per_class_subset(load_cifar100("test", root, download), recipe.test_per_class)
    return Setup("cifar100", config, train, old_class_mask(train.labels), OLD_CLASSES,
                 NUM_CLASSES, test)


def market_setup(config: Config) -> Setup:
    """Market-1501 at the profile's resolution; person ids become classes 0..C-1 in sorted
    order, so that the old identities (the first half) are classes 0..C_old-1."""
    size = tuple(config.profile.market.image_size)
    splits = load_market1501(config.paths.data)
    cache = config.paths.runs / "market1501" / "images"

    def images(name: str) -> np.ndarray:
        split = splits[name]
        digest = hashlib.sha1("\n".join(p.name for p in split.paths).encode()).hexdigest()[:12]
        return read_images(split, size, cache / f"{name}-{size[0]}x{size[1]}-{digest}.npy")

    train = splits["train"]
    ids = np.unique(train.pids)
    old_ids = market_old_ids(train.pids)
    train_set = ImageSet(images("train"), np.searchsorted(ids, train.pids))
    return Setup(
        "market1501", config, train_set, np.isin(train.pids, old_ids), len(old_ids), len(ids),
        ImageSet(images("query"), splits["query"].pids), ImageSet(images("gallery"),
                                                                 splits["gallery"].pids),
        splits["query"].cams, splits["gallery"].cams,
        extra={"train_ids": len(ids), "old_ids": len(old_ids), "image_size": list(size)})


SETUPS = {"cifar100": cifar_setup, "market1501": market_setup}
