"""Everything the methods need on one data set for one profile: backbones, their embeddings
and the transforms, each made on first use and cached on disk by its config.

Explained in the book: book/models, book/table1.
"""

from __future__ import annotations

import time
from dataclasses import replace
from functools import cached_property

import numpy as np

from rmlib import RmlibError
from rmlib.config import Config
from rmlib.data import train_val_split
from rmlib.engine.backbones import TrainedModel, train_backbone
from rmlib.engine.embed import cached_embeddings
from rmlib.engine.objectives import InfluenceObjective, Objective, synthesised_classifier
from rmlib.engine.transforms import (
    TransformConfig,
    Transforms,
    cached_transforms,
    objective_of,
)
from rmlib.evaluation.calibration import DistanceCalibration
from rmlib.evaluation.systems import SystemPair
from rmlib.methods.selection import centring_decision, select_settings
from rmlib.methods.setups import ROLES, Setup, dataset_spec
from rmlib.outputs import cached, save_npy


class Experiment:
    """The backbones ("old", "new", "bct", "bct-old-classes", "bict-upgrade-first"),
    embeddings ("train" in one view, "query"/"gallery" in the profile's test-time views)
    and transforms ("rqt", "cl", "mcl", "mcl-rho", "fct", "bict-forward", ...) of one data
    set and profile, made on demand and
    remembered, and the distance calibrations of the two systems."""

    def __init__(self, dataset: str, config: Config, progress: bool = True,
                 setup: Setup | None = None):
        self.dataset, self.config, self.progress = dataset, config, progress
        self._given_setup = setup
        self.profile = config.name
        self.models: dict[str, TrainedModel] = {}
        self.transforms: dict[str, Transforms] = {}
        self.timings: dict[str, float] = {}
        self.selection: dict | None = None
        self._emb: dict[tuple[str, str], np.ndarray] = {}
        # (seed, psi) -> the old and the new system's calibration
        self._calibrations: dict[tuple[int, str | None],
                                 tuple[DistanceCalibration, DistanceCalibration]] = {}

    @cached_property
    def setup(self) -> Setup:
        """The data set's splits and recipes, read at first use: making an Experiment
        reads nothing, so a run can check where it will write before any work."""
        return self._given_setup or dataset_spec(self.dataset).setup(self.config)

    # --- backbones and their embeddings --------------------------------------------------
    def model(self, role: str) -> TrainedModel:
        if role not in self.models:
            t0 = time.time()
            self.models[role] = self._train(role)
            self.timings[f"backbone_{role}"] = time.time() - t0
        return self.models[role]

    def _train(self, role: str) -> TrainedModel:
        """old/new: the base objective. bct: BCT as published, through the old classifier
        extended to every class by synthesised weights, plain cross-entropy; bct-old-classes:
        through the old classifier on the old classes only, smoothed as the backbone is;
        bict-upgrade-first: through the upgraded old space's classifier (all classes)."""
        if role not in (*ROLES, "bct", "bct-old-classes", "bict-upgrade-first"):
            raise RmlibError(f"no backbone role {role!r}; rmlib trains old, new, bct, "
                             "bct-old-classes and bict-upgrade-first")
        base = self.setup.objective()
        if role in ROLES:
            return self.fit_backbone(self.setup.backbone_config(role),
                                     self.setup.training_set(role), base)
        setup, old = self.setup, self.model("old")
        if role == "bct":
            classifier = synthesised_classifier(old.model.classifier,
                                                self.embeddings("old", "train"),
                                                setup.train.labels, setup.num_classes)
            objective = InfluenceObjective("bct", classifier, setup.num_classes,
                                           source=old.run_dir.name, base=base, smoothing=0.0,
                                           variant={"new_classes": "synthesised"})
        elif role == "bct-old-classes":
            objective = InfluenceObjective("bct", old.model.classifier, setup.num_old_classes,
                                           source=old.run_dir.name, base=base)
        elif role == "bict-upgrade-first":
            up = self.transform("bict")
            objective = InfluenceObjective("bict", up.classifier, setup.num_classes,
                                           source=up.config.key(), base=base)
        # the config's role names the kind of backbone; the objective's spec, the variant
        kind = role.split("-")[0]
        return self.fit_backbone(replace(setup.backbone_config("new"), role=kind), setup.train,
                                 objective)

    def fit_backbone(self, config, images, objective: Objective) -> TrainedModel:
        """Train (or load from the run cache) a backbone of `config` on `images`."""
        return train_backbone(config, images, objective, runs=self.config.paths.runs,
                              device=self.config.torch_device,
                              precision=self.config.precision, progress=self.progress)

    def embeddings(self, role: str, split: str) -> np.ndarray:
        """A backbone's embeddings of the "train" (one view), "query" or "gallery" images
        (the profile's test-time views). On CIFAR-100 "test", "query" and "gallery" are
        all the test set."""
        if split == "train":
            name, images = "train", self.setup.train.images
        elif self.setup.gallery is None:
            name, images = "test", self.setup.query.images
        else:
            name = split
            images = (self.setup.query if split == "query" else self.setup.gallery).images
        if (role, name) not in self._emb:
            self._emb[role, name] = cached_embeddings(
                self.model(role), images, f"{self.dataset}-{name}",
                views="none" if name == "train" else self.setup.test_time_views,
                precision=self.config.precision)
        return self._emb[role, name]

    def centring_decision(self) -> dict:
        """Whether every row should centre its embeddings, decided on the transforms'
        validation split of the training items (`centring_decision`)."""
        fit, val = self.validation_split()
        return centring_decision(self.embeddings("old", "train"),
                                 self.embeddings("new", "train"), self.setup.train.labels,
                                 fit, val)

    def centre(self, role: str) -> np.ndarray:
        """The mean of a backbone's training embeddings (one view): the centre that
        `centred` moves its embeddings by, recorded beside the model (centre.npy)."""
        return cached(self.model(role).run_dir / "centre.npy",
                      lambda: self.embeddings(role, "train").mean(axis=0), save_npy, np.load)

    def embedding_pair(self, role: str) -> tuple[np.ndarray, np.ndarray]:
        """(query, gallery) embeddings of a backbone."""
        return self.embeddings(role, "query"), self.embeddings(role, "gallery")

    def systems(self, old_q: np.ndarray, old_g: np.ndarray, new_q: np.ndarray,
                new_g: np.ndarray) -> SystemPair:
        """Two systems over the gallery; negative flips against the old model's queries."""
        return self.setup.arrays(old_q, old_g, new_q, new_g, reference=self.embedding_pair("old"))

    def naive(self) -> SystemPair:
        """RM_naive: the old system {phi_old(q), phi_old(g)}, the new {phi_new(q), phi_new(g)}."""
        return self.systems(*self.embedding_pair("old"), *self.embedding_pair("new"))

    # --- transforms, with their settings chosen on a validation split of the training set --
    def validation_split(self) -> tuple[np.ndarray, np.ndarray]:
        per_class = min(self.config.profile.transforms.val_per_class,
                        max(2, int(np.bincount(self.setup.train.labels).min()) // 5))
        return train_val_split(self.setup.train.labels, per_class, seed=0)

    def transform_config(self, objective: str, rho: bool = False, towards: str = "new",
                         **kw) -> TransformConfig:
        """The config of `objective`'s transforms between the old model and the `towards`
        model (whose runs are its sources, and so part of its cache key)."""
        recipe, spec = self.config.profile.transforms, objective_of(objective)
        sources = tuple(self.model(r).run_dir.name for r in ("old", towards))
        base = {"objective": objective, "rho": rho, "epochs": recipe.epochs,
                "hidden": recipe.hidden, "sources": sources,
                "num_classes": self.setup.num_classes
                if spec.classifier or spec.target_classifier else 0}
        return TransformConfig(**{**base, **kw})

    def settings(self) -> dict:
        """tau, then psi/rho's width, then their epochs, chosen once for the final method
        (MCL with rho) by the backfill AUC_mAP of the RM systems on held-out training items
        (never test; see `rmlib.methods.selection`), and used by every transform alike."""
        if self.selection is None:
            t0 = time.time()
            fit, val = self.validation_split()
            recipe = self.config.profile.transforms
            base = self.transform_config("mcl", rho=True)
            base = replace(base, sources=base.sources + ("validation-fit-split",))
            self.selection = select_settings(
                base, self.embeddings("old", "train"), self.embeddings("new", "train"),
                self.setup.train.labels, fit, val, taus=recipe.tau_grid,
                tau_epochs=recipe.tau_epochs, widths=recipe.hidden_grid,
                epochs=recipe.epochs_grid, fit_fn=self.fit_transform, progress=self.progress)
            self.timings["hyperparameter_selection"] = time.time() - t0
        return self.selection

    def fit_transform(self, cfg: TransformConfig, old, new, labels, progress,
                      target_classifier=None) -> Transforms:
        """Train (or load from this profile's cache) transforms of `cfg` on these pairs."""
        folder = self.config.paths.runs / self.dataset / self.profile
        return cached_transforms(cfg, old, new, labels, folder, progress,
                                 self.config.torch_device, target_classifier)

    def transform(self, name: str, seed: int = 0, towards: str = "new") -> Transforms:
        """A registered objective's transforms ('rqt', 'cl', 'mcl', 'fct', 'bict', ...), or
        with '-rho' also rho ('mcl-rho'), trained on all training items between the old
        model and the `towards` model; `seed` sets their initialisation and batches (the
        settings are chosen once, for RM; an objective's `fixed` fields override them)."""
        key = (name if towards == "new" else f"{name}>{towards}") + \
            ("" if seed == 0 else f"@seed{seed}")
        if key not in self.transforms:
            chosen = self.settings()  # timed on its own, not inside the first transform
            t0 = time.time()
            rho = name.endswith("-rho")
            spec = objective_of(name.removesuffix("-rho"))
            kw = {"hidden": chosen["hidden"], "epochs": chosen["epochs"], "seed": seed}
            if spec.takes_tau:
                kw["tau"] = chosen["tau"]
            target = self.model(towards).model.classifier if spec.target_classifier else None
            caps = dict(self.config.profile.transforms.fixed_caps)
            fixed = {k: min(v, caps[k]) if k in caps else v for k, v in spec.fixed.items()}
            self.transforms[key] = self.fit_transform(
                self.transform_config(spec.name, rho, towards, **{**kw, **fixed}),
                self.embeddings("old", "train"), self.embeddings(towards, "train"),
                self.setup.train.labels, self.progress, target)
            self.timings[f"transform_{key}"] = time.time() - t0
        return self.transforms[key]

    def training_sample(self, role: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """A backbone's embeddings of up to 10,000 training items drawn with `seed`, embedded
        as the test images are (the calibrations and the learned backfill order fit on
        these, never on test images), and their labels."""
        train = self.setup.train
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(len(train), min(10_000, len(train)), replace=False))
        emb = cached_embeddings(self.model(role), train.images[sample],
                                f"{self.dataset}-train-calibration",
                                views=self.setup.test_time_views, precision=self.config.precision)
        return emb, train.labels[sample]

    def calibrations(self, seed: int = 0, psi: str | None = None
                     ) -> tuple[DistanceCalibration, DistanceCalibration]:
        """The old and the new system's distance -> P(relevant), each fitted on pairs of
        `training_sample(role, seed)` (never test images). With `psi` (a reverse
        transform's name), the old system is {psi(phi_new(q)), phi_old(g)}: its pairs are
        psi-mapped new queries against old gallery items."""
        if (seed, psi) not in self._calibrations:
            (old_emb, labels), (new_emb, _) = (self.training_sample(r, seed) for r in ROLES)
            queries = None if psi is None else self.transform(psi, seed).reverse(new_emb)
            self._calibrations[seed, psi] = (
                DistanceCalibration.fit(old_emb, labels, seed=seed, queries=queries),
                DistanceCalibration.fit(new_emb, labels, seed=seed))
        return self._calibrations[seed, psi]
