"""The data sets under the old/new protocol, and the backbone configs each role trains with.

CIFAR-100: the old model trains on the training images of fine classes 0-49, the new one
on all 100; both are evaluated leave-one-out on the 10,000 test images (query set =
gallery set, each query's own image excluded, relevant = same fine class).
Market-1501: the old model trains on the first half of the sorted training identities,
the new one on all; the standard query/gallery protocol (same id and same camera removed,
distractors kept, junk dropped by the reader).
The smoke profile takes a small real, class-balanced subset of both CIFAR-100 splits.

Each data set is one registered `Dataset` (`DATASETS`): how it is loaded for a profile,
the profile's recipe for it, its backbones' configs and objective, and its protocols in
words; the command line's choices and every caller read the spec, with no default branch.
A new data set is one loader and one `register_dataset(Dataset(...))`.

Explained in the book: book/data_protocol, book/market1501.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np

from rmlib import RmlibError
from rmlib.config import Config
from rmlib.data import ImageSet, load_cifar100, load_market1501, market_old_ids, old_class_mask
from rmlib.data.cifar import NUM_CLASSES, OLD_CLASSES
from rmlib.data.market import IMAGENET_MEAN, IMAGENET_STD, read_images
from rmlib.engine.backbones import BackboneConfig
from rmlib.engine.objectives import Objective, TripletObjective
from rmlib.evaluation.retrieval import Protocol
from rmlib.evaluation.systems import SystemPair
from rmlib.methods.recipes import CIFAR_RECIPES, MARKET_RECIPES
from rmlib.specs import Registry

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
    details: dict | None = None  # what the provenance records of this data set
    old_backbone: dict | None = None  # old-model config fields replaced (rmlib.methods.studies)
    backbone_seed: int = 0  # 0: Table 1's backbones; k: both trained again from seeds 2k, 2k+1

    @property
    def profile(self) -> str:
        return self.config.name

    @property
    def recipe(self):
        """How this profile trains the data set's backbones (`Dataset.recipes`)."""
        return dataset_spec(self.dataset).recipe(self.profile)

    @property
    def test_time_views(self) -> str:
        """How query and gallery images are embedded (rmlib.engine.embed.VIEWS)."""
        return self.recipe.tta

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
               ) -> SystemPair:
        """Two retrieval systems over this setup's gallery, as the evaluator reads them;
        `reference`: the deployed old system (queries, gallery) for negative flips."""
        ref_q, ref_g = reference if reference is not None else (None, None)
        if self.gallery is None:
            return SystemPair(old_q, old_g, new_q, new_g, self.query.labels,
                                  reference_query=ref_q, reference_gallery=ref_g)
        return SystemPair(old_q, old_g, new_q, new_g, self.query.labels,
                              self.gallery.labels, self.query_cams, self.gallery_cams,
                              ref_q, ref_g)

    def training_set(self, role: str) -> ImageSet:
        """The old model's share of the training images, or all of them."""
        if role == "old":
            return self.train.subset(np.flatnonzero(self.old_mask))
        return self.train

    def objective(self) -> Objective:
        """The backbones' base objective, as the data set's spec says."""
        return dataset_spec(self.dataset).objective(self.config)

    def backbone_config(self, role: str) -> BackboneConfig:
        """The config of the old or new backbone (BCT and BiCT copy the new one's)."""
        config = dataset_spec(self.dataset).backbone(self, role)
        return replace(config, **self.old_backbone) if role == "old" and self.old_backbone \
            else config

    def _common(self, role: str) -> dict:
        """The backbone config fields every data set sets alike."""
        old = role == "old"
        return {"profile": self.profile, "role": role,
                "num_classes": self.num_old_classes if old else self.num_classes,
                "seed": (0 if old else 1) + 2 * self.backbone_seed}


def _cifar_backbone(setup: Setup, role: str) -> BackboneConfig:
    r, old = setup.recipe, role == "old"
    return BackboneConfig(
        dataset="cifar100", arch=r.arch, widths=tuple(r.widths),
        epochs=r.epochs_old if old else r.epochs_new, batch_size=r.batch_size, lr=r.lr,
        low_res_epochs=r.low_res_epochs_old if old else r.low_res_epochs_new,
        **dict(r.options), **setup._common(role))


def _market_backbone(setup: Setup, role: str) -> BackboneConfig:
    m, old = setup.recipe, role == "old"
    return BackboneConfig(
        dataset="market1501", arch=m.arch, widths=(),
        epochs=m.epochs_old if old else m.epochs_new, batch_size=m.sampler[0] * m.sampler[1],
        lr=m.lr, weight_decay=5e-4, padding=m.padding, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        sampler=tuple(m.sampler), erase=m.erase, image_size=tuple(m.image_size),
        objective=setup.objective().spec, **setup._common(role))


def cifar_setup(config: Config) -> Setup:
    recipe = dataset_spec("cifar100").recipe(config.name)
    root, download = config.paths.data, config.download
    train = per_class_subset(load_cifar100("train", root, download), recipe.train_per_class)
    test = per_class_subset(load_cifar100("test", root, download), recipe.test_per_class)
    return Setup("cifar100", config, train, old_class_mask(train.labels), OLD_CLASSES,
                 NUM_CLASSES, test)


def market_setup(config: Config) -> Setup:
    """Market-1501 at the profile's resolution; person ids become classes 0..C-1 in sorted
    order, so that the old identities (the first half) are classes 0..C_old-1."""
    size = tuple(dataset_spec("market1501").recipe(config.name).image_size)
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
        details={"train_ids": len(ids), "old_ids": len(old_ids), "image_size": list(size)})


@dataclass(frozen=True)
class Dataset:
    """A data set as rmlib runs it: `setup(config)` loads it under the old/new protocol;
    `recipes` its backbones' recipe for each profile it runs in (its `tta`: the test-time
    views; `recipe(profile)` picks one);
    `backbone(setup, role)` the old or new backbone's config; `objective(config)` the
    backbones' base objective; `test_protocol` and `backfill_protocol` say in words what
    the backbones and the backfill are evaluated on (results files record them). The
    paper's numbers, where it has them, are `paper_table1.json`'s entry of the same name."""

    name: str
    setup: Callable[[Config], Setup]
    recipes: Mapping[str, object]
    backbone: Callable[[Setup, str], BackboneConfig]
    objective: Callable[[Config], Objective]
    test_protocol: str
    backfill_protocol: str

    def recipe(self, profile: str) -> object:
        """The recipe of profile `profile`; a profile without one is one clear error."""
        if profile not in self.recipes:
            raise RmlibError(f"data set {self.name!r} has no recipe for the {profile!r} "
                             f"profile; it runs in {', '.join(self.recipes)}")
        return self.recipes[profile]


DATASETS = Registry("data set")


def register_dataset(dataset: Dataset) -> Dataset:
    """Add `dataset` to `DATASETS` (a name is registered once)."""
    return DATASETS.register(dataset)


def dataset_spec(name: str) -> Dataset:
    """The registered data set `name`; an unknown one is an error, never a default."""
    return DATASETS.spec(name)


register_dataset(Dataset(
    "cifar100", cifar_setup, CIFAR_RECIPES, _cifar_backbone, lambda c: Objective(),
    test_protocol="CIFAR-100 test, leave-one-out",
    backfill_protocol="CIFAR-100 test, leave-one-out; backfill order default_rng(0)"))
register_dataset(Dataset(
    "market1501", market_setup, MARKET_RECIPES, _market_backbone,
    lambda c: TripletObjective(dataset_spec("market1501").recipe(c.name).triplet_margin),
    test_protocol="Market-1501 query/gallery, same-id same-camera removed",
    backfill_protocol="Market-1501 query/gallery, same-id same-camera removed, distractors "
                      "kept; backfill order default_rng(0)"))
