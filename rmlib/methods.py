"""Each row of Table 1 as a recipe. The Old and New rows: backbones on CIFAR-100.

CIFAR-100 protocol: the old model trains on the training images of fine classes 0-49,
the new one on all 100; both are evaluated leave-one-out on the 10,000 test images
(query set = gallery set, each query's own image excluded, relevant = same fine class).
The smoke profile takes a small real, class-balanced subset of both splits.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from rmlib.backfill import BackfillCurve, backfill_arrays
from rmlib.config import profile_name, profile_settings, results_root
from rmlib.contract import BackfillArrays
from rmlib.data import ImageSet, load_cifar100, old_class_mask, train_val_split
from rmlib.data.cifar import NUM_CLASSES, OLD_CLASSES
from rmlib.embed import cached_embeddings
from rmlib.losses import bct_influence_loss
from rmlib.provenance import provenance
from rmlib.retrieval import Protocol, evaluate
from rmlib.train import (
    BackboneConfig,
    Objective,
    TrainedModel,
    count_parameters,
    train_backbone,
)
from rmlib.transforms import TAU_GRID, TransformConfig, Transforms, cached_transforms
from rmlib.upgrade import select_tau

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
class CifarSetup:
    """The data of one profile: training images, test images and the test protocol."""

    profile: str
    train: ImageSet
    test: ImageSet

    @property
    def protocol(self) -> Protocol:
        return Protocol.leave_one_out(self.test.labels)


def cifar_setup(profile: str | None = None) -> CifarSetup:
    profile = profile or profile_name()
    settings = profile_settings(profile)
    train = per_class_subset(load_cifar100("train"), settings["train_per_class"])
    test = per_class_subset(load_cifar100("test"), settings["test_per_class"])
    return CifarSetup(profile, train, test)


def backbone_config(profile: str, role: str, **overrides) -> BackboneConfig:
    """The config of the old (50 classes) or new (100 classes) backbone of a profile."""
    s = profile_settings(profile)
    cfg = BackboneConfig(
        dataset="cifar100", profile=profile, role=role,
        num_classes=OLD_CLASSES if role == "old" else NUM_CLASSES,
        arch=s["arch"], widths=tuple(s["widths"]) if s["widths"] else (),
        epochs=s[f"epochs_{'old' if role == 'old' else 'new'}"],
        batch_size=s["batch_size"], lr=s["lr"], seed=0 if role == "old" else 1,
    )
    return cfg if not overrides else BackboneConfig(**{**asdict(cfg), **overrides})


def training_set(setup: CifarSetup, role: str) -> ImageSet:
    if role == "old":
        return setup.train.subset(np.flatnonzero(old_class_mask(setup.train.labels)))
    return setup.train


def train_role(setup: CifarSetup, role: str, progress: bool = True) -> TrainedModel:
    cfg = backbone_config(setup.profile, role)
    return train_backbone(cfg, training_set(setup, role), progress=progress)


def test_embeddings(setup: CifarSetup, trained: TrainedModel) -> np.ndarray:
    return cached_embeddings(trained, setup.test.images, "cifar100-test")


def backbone_entry(setup: CifarSetup, trained: TrainedModel) -> dict:
    """One model's results: metrics on the test set, training curve, config, size, time."""
    emb = test_embeddings(setup, trained)
    metrics = evaluate(emb, emb, setup.protocol).summary()
    return {**metrics, "history": trained.history, "config": asdict(trained.config),
            "parameters": count_parameters(trained.model), "run": trained.run_dir.name,
            "train_wall_time_s": trained.wall_time_s,
            "train_images": len(training_set(setup, trained.config.role)),
            "test_images": len(setup.test)}


def train_backbones(roles: tuple[str, ...] = ROLES, profile: str | None = None,
                    progress: bool = True, out: Path | None = None) -> dict:
    """Train (or reuse) the requested backbones and write backbones.json with provenance."""
    start = time.time()
    setup = cifar_setup(profile)
    out = out or results_root() / "cifar100" / setup.profile / "backbones.json"
    result = json.loads(out.read_text()) if out.exists() else {}
    for role in roles:
        trained = train_role(setup, role, progress)
        result[role] = backbone_entry(setup, trained)
    result["provenance"] = provenance(
        config={"roles": list(roles), "protocol": "CIFAR-100 test, leave-one-out",
                "old_classes": OLD_CLASSES, "embedding_flip_tta": True},
        wall_time_s=time.time() - start, profile=setup.profile)
    result["provenance"]["train_wall_time_s"] = {
        r: result[r]["train_wall_time_s"] for r in ROLES if r in result}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=list))
    return result


# --------------------------------------------------------------------------------------
# Table 1: every row as two retrieval systems over the same gallery
# --------------------------------------------------------------------------------------

TABLE1_ROWS = ("Old", "New", "RM_naive", "BCT", "FCT", "BiCT", "RM")
ABLATION_ROWS = ("RM_naive", "+RQT", "+CL", "+MCL", "+rho")
PAPER_CIFAR100 = {  # Table 1 of the paper, CIFAR-100: AUC_mAP, AUC_CMC (top-1), Gain (%)
    "Old": (21.6, 34.3, 0), "New": (47.4, 62.6, 100), "RM_naive": (30.8, 49.1, 36),
    "BCT": (26.4, 43.5, 19), "FCT": (27.1, 49.4, 21), "BiCT": (29.0, 48.3, 29),
    "RM": (41.4, 60.7, 78),
}
VAL_PER_CLASS = 50


class InfluenceObjective(Objective):
    """Cross-entropy plus an influence loss through a frozen classifier of another space.

    BCT: the old model's classifier on the old classes (Shen et al. 2020). BiCT: the
    classifier of the upgraded old space h'(phi_old) on all classes (our reading of Su et
    al. 2022: the new model is made backward compatible with the *upgraded* old gallery).
    """

    def __init__(self, name: str, classifier: torch.nn.Module, num_classes: int,
                 source: str, weight: float = 1.0):
        self.classifier = classifier.eval()
        for p in self.classifier.parameters():
            p.requires_grad_(False)
        self.num_classes, self.weight = num_classes, weight
        self.spec = {"name": name, "source": source, "weight": weight}

    def __call__(self, model, embedding, logits, labels, config):
        ce = super().__call__(model, embedding, logits, labels, config)
        influence = bct_influence_loss(embedding.float(), labels, self.classifier,
                                       self.num_classes, config.label_smoothing)
        return ce + self.weight * influence


@dataclass
class Row:
    """One row of Table 1 (or of the ablation): its two systems and what they are."""

    name: str
    arrays: BackfillArrays
    note: str = ""


class CifarExperiment:
    """Everything Table 1 needs on CIFAR-100 for one profile, each step cached."""

    def __init__(self, profile: str | None = None, progress: bool = True):
        self.setup = cifar_setup(profile)
        self.profile = self.setup.profile
        self.progress = progress
        self._models: dict[str, TrainedModel] = {}
        self._emb: dict[tuple[str, str], np.ndarray] = {}
        self._transforms: dict[str, Transforms] = {}
        self.timings: dict[str, float] = {}
        self.selection: dict | None = None

    # --- backbones and their embeddings ------------------------------------------------
    def model(self, role: str) -> TrainedModel:
        if role not in self._models:
            t0 = time.time()
            if role in ROLES:
                self._models[role] = train_role(self.setup, role, self.progress)
            elif role == "bct":
                old = self.model("old")
                objective = InfluenceObjective("bct", old.model.classifier, OLD_CLASSES,
                                               source=old.run_dir.name)
                self._models[role] = self._train_new_like("bct", objective)
            elif role == "bict":
                up = self.transform("bict")
                objective = InfluenceObjective("bict", up.classifier, NUM_CLASSES,
                                               source=up.config.key())
                self._models[role] = self._train_new_like("bict", objective)
            else:
                raise ValueError(role)
            self.timings[f"backbone_{role}"] = time.time() - t0
        return self._models[role]

    def _train_new_like(self, role: str, objective: Objective) -> TrainedModel:
        cfg = replace(backbone_config(self.profile, "new"), role=role)
        return train_backbone(cfg, self.setup.train, objective, progress=self.progress)

    def embeddings(self, role: str, split: str) -> np.ndarray:
        """Embeddings of the train (no flip) or test (flip TTA) images by a backbone."""
        if (role, split) not in self._emb:
            trained = self.model(role)
            if split == "test":
                emb = test_embeddings(self.setup, trained)
            else:
                emb = cached_embeddings(trained, self.setup.train.images, "cifar100-train",
                                        flip=False)
            self._emb[role, split] = emb
        return self._emb[role, split]

    # --- transforms, with tau chosen on a validation split of the training set ----------
    def validation_split(self) -> tuple[np.ndarray, np.ndarray]:
        per_class = min(VAL_PER_CLASS, max(2, int(np.bincount(self.setup.train.labels).min()) // 5))
        return train_val_split(self.setup.train.labels, per_class, seed=0)

    def transform_config(self, objective: str, rho: bool = False, **kw) -> TransformConfig:
        s = profile_settings(self.profile)
        sources = tuple(self.model(r).run_dir.name for r in ("old", "new"))
        base = {"objective": objective, "rho": rho, "epochs": s["transform_epochs"],
                "hidden": s["transform_hidden"], "sources": sources,
                "num_classes": NUM_CLASSES if objective == "bict" else 0}
        return TransformConfig(**{**base, **kw})

    def select_tau(self, objective: str = "mcl", rho: bool = True) -> dict:
        """Choose tau by the backfill AUC_mAP on held-out training items (never test)."""
        fit, val = self.validation_split()
        base = self.transform_config(objective, rho,
                                     epochs=profile_settings(self.profile)["tau_epochs"])
        base = replace(base, sources=base.sources + ("validation-fit-split",))

        def fit_cached(cfg, o, n, y, progress):
            return cached_transforms(cfg, o, n, y, "cifar100", self.profile, progress)

        return select_tau(base, self.embeddings("old", "train"), self.embeddings("new", "train"),
                          self.setup.train.labels, fit, val, TAU_GRID, fit_cached,
                          self.progress)

    def tau(self) -> float:
        """tau of CL and MCL: selected once, for the final method (MCL with rho)."""
        if self.selection is None:
            t0 = time.time()
            self.selection = self.select_tau()
            self.timings["tau_selection"] = time.time() - t0
        return self.selection["tau"]

    def transform(self, name: str) -> Transforms:
        """'rqt', 'cl', 'mcl', 'mcl-rho', 'fct' or 'bict', trained on all training items."""
        if name not in self._transforms:
            t0 = time.time()
            objective, rho = name.split("-")[0], name.endswith("-rho")
            kw = {"tau": self.tau()} if objective in ("cl", "mcl") else {}
            cfg = self.transform_config(objective, rho, **kw)
            self._transforms[name] = cached_transforms(
                cfg, self.embeddings("old", "train"), self.embeddings("new", "train"),
                self.setup.train.labels, "cifar100", self.profile, self.progress)
            self.timings[f"transform_{name}"] = time.time() - t0
        return self._transforms[name]

    # --- rows -----------------------------------------------------------------------------
    def row(self, name: str) -> Row:
        y = self.setup.test.labels
        old = self.embeddings("old", "test")

        def systems(old_q, old_g, new_q, new_g):
            return BackfillArrays(old_q, old_g, new_q, new_g, y, reference_query=old)

        if name == "Old":
            return Row(name, systems(old, old, old, old), "phi_old / phi_old, no backfill")
        new = self.embeddings("new", "test")
        if name == "New":
            return Row(name, systems(new, new, new, new), "phi_new / phi_new, fully backfilled")
        if name == "RM_naive":
            return Row(name, systems(old, old, new, new), "rank merge of old/old and new/new")
        if name == "BCT":
            bct = self.embeddings("bct", "test")
            return Row(name, systems(bct, old, bct, bct), "phi_bct / phi_old, then phi_bct")
        if name == "FCT":
            h = self.transform("fct")
            return Row(name, systems(new, h.forward(old), new, new),
                       "phi_new / h(phi_old), no side-information")
        if name == "BiCT":
            bict, up = self.embeddings("bict", "test"), self.transform("bict")
            return Row(name, systems(bict, up.forward(old), bict, bict),
                       "phi_bict / h'(phi_old), then phi_bict (our reimplementation)")
        transform = {"+RQT": "rqt", "+CL": "cl", "+MCL": "mcl", "+rho": "mcl-rho",
                     "RM": "mcl-rho"}[name]
        arrays = rm_arrays(self.transform(transform), old, new, y)
        return Row(name, BackfillArrays(**{**arrays.__dict__, "reference_query": old}),
                   "psi(rho(phi_new)) / phi_old, then rho(phi_new)" if "rho" in transform
                   else f"psi_{transform}(phi_new) / phi_old, then phi_new")


def rm_arrays(t: Transforms, old: np.ndarray, new: np.ndarray, labels: np.ndarray
              ) -> BackfillArrays:
    """The RM systems of eval items: {psi(rho(new)) vs old gallery} and {rho(new) vs rho(new)}."""
    new_side = t.new_side(new)
    return BackfillArrays(t.reverse(new), old, new_side, new_side, labels)


def gain(auc: float, auc_old: float, auc_new: float) -> float:
    """(AUC_method - AUC_old) / (AUC_new - AUC_old), on mAP."""
    return (auc - auc_old) / (auc_new - auc_old)


def evaluate_rows(exp: CifarExperiment, names: tuple[str, ...], baselines: dict | None = None
                  ) -> dict:
    """Backfill curves, AUCs, Gain and conditions (6)-(8) of each row."""
    out = {}
    old_b = baselines["Old"] if baselines else None
    new_b = baselines["New"] if baselines else None
    for name in names:
        t0 = time.time()
        row = exp.row(name)
        curve, conditions = backfill_arrays(row.arrays, seed=0, new_baseline=new_b)
        if old_b is not None:  # condition (6) against the deployed old system
            for m in conditions:
                conditions[m]["old"] = old_b[m]
                conditions[m]["cond6_M0_ge_old"] = bool(conditions[m]["M0"] >= old_b[m] - 1e-12)
        out[name] = {**curve.to_dict(), "conditions": conditions, "systems": row.note,
                     "eval_seconds": time.time() - t0}
        if name in ("Old", "New") and baselines is not None:
            baselines[name] = {"mAP": curve.mAP[-1], "top1": curve.top1[-1]}
    return out


def reproduce_cifar100(profile: str | None = None, progress: bool = True) -> dict:
    """Train/evaluate whatever is missing; write table1.json and ablation.json."""
    start = time.time()
    exp = CifarExperiment(profile, progress)
    baselines: dict = {}
    table = evaluate_rows(exp, ("Old", "New"), baselines)
    auc_old, auc_new = table["Old"]["auc_mAP"], table["New"]["auc_mAP"]
    table.update(evaluate_rows(exp, TABLE1_ROWS[2:], baselines))
    ablation = {"RM_naive": table["RM_naive"]}
    ablation.update(evaluate_rows(exp, ABLATION_ROWS[1:-1], baselines))
    ablation["+rho"] = table["RM"]
    for rows in (table, ablation):
        for r in rows.values():
            r["gain"] = gain(r["auc_mAP"], auc_old, auc_new)
    folder = results_root() / "cifar100" / exp.profile
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "backbones": {r: asdict(m.config) for r, m in exp._models.items()},
        "transforms": {n: asdict(t.config) for n, t in exp._transforms.items()},
        "tau_selection": exp.selection,
        "protocol": "CIFAR-100 test, leave-one-out; backfill order default_rng(0)",
        "fct": "without side-information",
    }
    prov = provenance(config, time.time() - start, exp.profile)
    prov["step_seconds"] = exp.timings
    prov["backbone_train_seconds"] = {r: m.wall_time_s for r, m in exp._models.items()}
    prov["transform_fit_seconds"] = {n: sum(h["seconds"] for h in t.history)
                                     for n, t in exp._transforms.items()}
    tables = {"table1": {"rows": table, "paper": PAPER_CIFAR100},
              "ablation": {"rows": ablation}}
    for name, body in tables.items():
        body["provenance"] = prov
        (folder / f"{name}.json").write_text(json.dumps(body, indent=2, default=list))
    return tables


def cifar100_results(profile: str | None = None, progress: bool = False) -> dict:
    """Table 1 and ablation results of a profile: read from data/results if there, else run."""
    profile = profile or profile_name()
    folder = results_root() / "cifar100" / profile
    if (folder / "table1.json").exists() and (folder / "ablation.json").exists():
        return {name: json.loads((folder / f"{name}.json").read_text())
                for name in ("table1", "ablation")}
    return reproduce_cifar100(profile, progress)


def curve_of(result_row: dict) -> BackfillCurve:
    """A BackfillCurve back from a results-file row."""
    keys = ("t", "mAP", "top1", "top5", "nfr")
    return BackfillCurve(**{k: result_row[k] for k in keys},
                         num_valid_queries=result_row.get("num_valid_queries", 0))
