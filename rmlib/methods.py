"""Each row of Table 1 as a recipe that yields two retrieval systems, on either data set.

CIFAR-100: the old model trains on the training images of fine classes 0-49, the new one
on all 100; both are evaluated leave-one-out on the 10,000 test images (query set =
gallery set, each query's own image excluded, relevant = same fine class).
Market-1501: the old model trains on the first half of the sorted training identities,
the new one on all; the standard query/gallery protocol (same id and same camera removed,
distractors kept, junk dropped by the reader).
The smoke profile takes a small real, class-balanced subset of both splits.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from rmlib.backfill import BackfillCurve, backfill_arrays
from rmlib.config import MARKET_SETTINGS, profile_name, profile_settings, results_root, runs_root
from rmlib.contract import BackfillArrays
from rmlib.data import (
    ImageSet,
    load_cifar100,
    load_market1501,
    market_old_ids,
    old_class_mask,
    train_val_split,
)
from rmlib.data.cifar import NUM_CLASSES, OLD_CLASSES
from rmlib.data.market import IMAGENET_MEAN, IMAGENET_STD, read_images
from rmlib.embed import cached_embeddings
from rmlib.losses import bct_influence_loss
from rmlib.outputs import write_json
from rmlib.provenance import provenance
from rmlib.retrieval import Protocol, evaluate
from rmlib.train import (
    BackboneConfig,
    Objective,
    TrainedModel,
    TripletObjective,
    count_parameters,
    train_backbone,
)
from rmlib.transforms import TAU_GRID, TransformConfig, Transforms, cached_transforms
from rmlib.upgrade import rm_systems, select_settings

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
    profile: str
    train: ImageSet
    old_mask: np.ndarray
    num_old_classes: int
    num_classes: int
    query: ImageSet
    gallery: ImageSet | None = None
    query_cams: np.ndarray | None = None
    gallery_cams: np.ndarray | None = None
    extra: dict | None = None

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
               new_g: np.ndarray, reference: np.ndarray | None = None) -> BackfillArrays:
        """Two retrieval systems over this setup's gallery, as the evaluator reads them."""
        if self.gallery is None:
            return BackfillArrays(old_q, old_g, new_q, new_g, self.query.labels,
                                  reference_query=reference)
        return BackfillArrays(old_q, old_g, new_q, new_g, self.query.labels,
                              self.gallery.labels, self.query_cams, self.gallery_cams,
                              reference)


def cifar_setup(profile: str | None = None) -> Setup:
    profile = profile or profile_name()
    settings = profile_settings(profile)
    train = per_class_subset(load_cifar100("train"), settings["train_per_class"])
    test = per_class_subset(load_cifar100("test"), settings["test_per_class"])
    return Setup("cifar100", profile, train, old_class_mask(train.labels), OLD_CLASSES,
                 NUM_CLASSES, test)


def market_setup(profile: str | None = None) -> Setup:
    """Market-1501 at the profile's resolution; person ids become classes 0..C-1 in sorted
    order, so that the old identities (the first half) are classes 0..C_old-1."""
    profile = profile or profile_name()
    size = tuple(MARKET_SETTINGS[profile]["image_size"])
    splits = load_market1501()
    cache = runs_root() / "market1501" / "images"

    def images(name: str) -> np.ndarray:
        split = splits[name]
        digest = hashlib.sha1("\n".join(p.name for p in split.paths).encode()).hexdigest()[:12]
        return read_images(split, size, cache / f"{name}-{size[0]}x{size[1]}-{digest}.npy")

    train = splits["train"]
    ids = np.unique(train.pids)
    old_ids = market_old_ids(train.pids)
    train_set = ImageSet(images("train"), np.searchsorted(ids, train.pids))
    return Setup(
        "market1501", profile, train_set, np.isin(train.pids, old_ids), len(old_ids), len(ids),
        ImageSet(images("query"), splits["query"].pids), ImageSet(images("gallery"),
                                                                 splits["gallery"].pids),
        splits["query"].cams, splits["gallery"].cams,
        extra={"train_ids": len(ids), "old_ids": len(old_ids), "image_size": list(size)})


SETUPS = {"cifar100": cifar_setup, "market1501": market_setup}


def base_objective(setup: Setup) -> Objective:
    """Cross-entropy (CIFAR-100); cross-entropy plus batch-hard triplet (Market-1501)."""
    if setup.dataset == "market1501":
        return TripletObjective(MARKET_SETTINGS[setup.profile]["triplet_margin"])
    return Objective()


def backbone_config(setup: Setup, role: str) -> BackboneConfig:
    """The config of the old or new backbone (BCT and BiCT copy the new one's)."""
    old = role == "old"
    num_classes = setup.num_old_classes if old else setup.num_classes
    if setup.dataset == "cifar100":
        s = profile_settings(setup.profile)
        return BackboneConfig(
            dataset="cifar100", profile=setup.profile, role=role, num_classes=num_classes,
            arch=s["arch"], widths=tuple(s["widths"]) if s["widths"] else (),
            epochs=s[f"epochs_{'old' if old else 'new'}"], batch_size=s["batch_size"],
            lr=s["lr"], seed=0 if old else 1,
            low_res_epochs=s.get(f"low_res_epochs_{'old' if old else 'new'}", 0))
    m = MARKET_SETTINGS[setup.profile]
    p, k = m["sampler"]
    return BackboneConfig(
        dataset="market1501", profile=setup.profile, role=role, num_classes=num_classes,
        arch=m["arch"], widths=(), epochs=m[f"epochs_{'old' if old else 'new'}"],
        batch_size=p * k, lr=m["lr"], weight_decay=5e-4, padding=m["padding"],
        mean=IMAGENET_MEAN, std=IMAGENET_STD, seed=0 if old else 1, sampler=(p, k),
        erase=m["erase"], image_size=tuple(m["image_size"]),
        objective=base_objective(setup).spec)


def training_set(setup: Setup, role: str) -> ImageSet:
    if role == "old":
        return setup.train.subset(np.flatnonzero(setup.old_mask))
    return setup.train


def train_role(setup: Setup, role: str, progress: bool = True) -> TrainedModel:
    return train_backbone(backbone_config(setup, role), training_set(setup, role),
                          base_objective(setup), progress=progress)


def eval_embeddings(setup: Setup, trained: TrainedModel, split: str) -> np.ndarray:
    """Embeddings of the query or gallery images (CIFAR-100: both are the test set)."""
    if setup.gallery is None:
        return cached_embeddings(trained, setup.query.images, f"{setup.dataset}-test")
    images = setup.query.images if split == "query" else setup.gallery.images
    return cached_embeddings(trained, images, f"{setup.dataset}-{split}")


def backbone_entry(setup: Setup, trained: TrainedModel) -> dict:
    """One model's results: metrics on the evaluation sets, training curve, config, time."""
    q = eval_embeddings(setup, trained, "query")
    g = eval_embeddings(setup, trained, "gallery")
    metrics = evaluate(q, g, setup.protocol).summary()
    entry = {**metrics, "history": trained.history, "config": asdict(trained.config),
             "parameters": count_parameters(trained.model), "run": trained.run_dir.name,
             "train_wall_time_s": trained.wall_time_s,
             "train_images": len(training_set(setup, trained.config.role)),
             "test_images": len(setup.query)}
    if hasattr(trained.model.backbone, "pretrained"):
        entry["imagenet_initialised"] = bool(trained.model.backbone.pretrained)
    return entry


def train_backbones(roles: tuple[str, ...] = ROLES, profile: str | None = None,
                    progress: bool = True, out: Path | None = None,
                    dataset: str = "cifar100") -> dict:
    """Train (or reuse) the requested backbones and write backbones.json with provenance."""
    start = time.time()
    setup = SETUPS[dataset](profile)
    out = out or results_root() / dataset / setup.profile / "backbones.json"
    result = json.loads(out.read_text()) if out.exists() else {}
    for role in roles:
        trained = train_role(setup, role, progress)
        result[role] = backbone_entry(setup, trained)
    protocol = ("CIFAR-100 test, leave-one-out" if dataset == "cifar100"
                else "Market-1501 query/gallery, same-id same-camera removed")
    result["provenance"] = provenance(
        config={"roles": list(roles), "protocol": protocol,
                "old_classes": setup.num_old_classes, "embedding_flip_tta": True,
                **(setup.extra or {})},
        wall_time_s=time.time() - start, profile=setup.profile)
    result["provenance"]["train_wall_time_s"] = {
        r: result[r]["train_wall_time_s"] for r in ROLES if r in result}
    write_json(out, result)
    return result


# --------------------------------------------------------------------------------------
# Table 1: every row as two retrieval systems over the same gallery
# --------------------------------------------------------------------------------------

TABLE1_ROWS = ("Old", "New", "RM_naive", "BCT", "FCT", "BiCT", "RM")
ABLATION_ROWS = ("RM_naive", "+RQT", "+CL", "+MCL", "+rho")
PAPER_MARKET1501 = {  # Table 1 of the paper, Market-1501
    "Old": (62.7, 82.7, 0), "New": (77.3, 90.9, 100), "RM_naive": (69.2, 87.0, 45),
    "BCT": (66.6, 84.3, 27), "FCT": (66.4, 84.2, 25), "BiCT": (65.0, 82.4, 16),
    "RM": (70.7, 87.6, 55),
}
PAPER_CIFAR100 = {  # Table 1 of the paper, CIFAR-100: AUC_mAP, AUC_CMC (top-1), Gain (%)
    "Old": (21.6, 34.3, 0), "New": (47.4, 62.6, 100), "RM_naive": (30.8, 49.1, 36),
    "BCT": (26.4, 43.5, 19), "FCT": (27.1, 49.4, 21), "BiCT": (29.0, 48.3, 29),
    "RM": (41.4, 60.7, 78),
}
PAPER = {"cifar100": PAPER_CIFAR100, "market1501": PAPER_MARKET1501}
VAL_PER_CLASS = 50


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


@dataclass
class Row:
    """One row of Table 1 (or of the ablation): its two systems and what they are."""

    name: str
    arrays: BackfillArrays
    note: str = ""


class Experiment:
    """Everything Table 1 needs on one data set for one profile, each step cached."""

    def __init__(self, dataset: str = "cifar100", profile: str | None = None,
                 progress: bool = True):
        self.dataset = dataset
        self.setup = SETUPS[dataset](profile)
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
                objective = InfluenceObjective("bct", old.model.classifier,
                                               self.setup.num_old_classes,
                                               source=old.run_dir.name,
                                               base=base_objective(self.setup))
                self._models[role] = self._train_new_like("bct", objective)
            elif role == "bict":
                up = self.transform("bict")
                objective = InfluenceObjective("bict", up.classifier, self.setup.num_classes,
                                               source=up.config.key(),
                                               base=base_objective(self.setup))
                self._models[role] = self._train_new_like("bict", objective)
            else:
                raise ValueError(role)
            self.timings[f"backbone_{role}"] = time.time() - t0
        return self._models[role]

    def _train_new_like(self, role: str, objective: Objective) -> TrainedModel:
        cfg = replace(backbone_config(self.setup, "new"), role=role)
        return train_backbone(cfg, self.setup.train, objective, progress=self.progress)

    def embeddings(self, role: str, split: str) -> np.ndarray:
        """A backbone's embeddings of the train (no flip), query or gallery images (flip TTA).

        On CIFAR-100 "test", "query" and "gallery" are all the test set.
        """
        split = "query" if split == "test" else split
        if (role, split) not in self._emb:
            trained = self.model(role)
            if split == "train":
                emb = cached_embeddings(trained, self.setup.train.images,
                                        f"{self.dataset}-train", flip=False)
            else:
                emb = eval_embeddings(self.setup, trained, split)
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
                "num_classes": self.setup.num_classes if objective == "bict" else 0}
        return TransformConfig(**{**base, **kw})

    def select_settings(self, objective: str = "mcl", rho: bool = True) -> dict:
        """tau, then psi/rho's width, then their epochs, by the backfill AUC_mAP of the RM
        systems on held-out training items (never test); see `rmlib.upgrade.select_settings`."""
        fit, val = self.validation_split()
        s = profile_settings(self.profile)
        base = self.transform_config(objective, rho)
        base = replace(base, sources=base.sources + ("validation-fit-split",))

        def fit_cached(cfg, o, n, y, progress):
            return cached_transforms(cfg, o, n, y, self.dataset, self.profile, progress)

        return select_settings(base, self.embeddings("old", "train"),
                               self.embeddings("new", "train"), self.setup.train.labels,
                               fit, val, TAU_GRID, s["tau_epochs"], s["transform_hidden_grid"],
                               s["transform_epochs_grid"], fit_cached, self.progress)

    def settings(self) -> dict:
        """The chosen tau, width and epochs: selected once, for the final method (MCL with
        rho), and used by every transform (psi, rho, and the baselines' h) alike."""
        if self.selection is None:
            t0 = time.time()
            self.selection = self.select_settings()
            self.timings["hyperparameter_selection"] = time.time() - t0
        return self.selection

    def transform(self, name: str) -> Transforms:
        """'rqt', 'cl', 'mcl', 'mcl-rho', 'fct' or 'bict', trained on all training items."""
        if name not in self._transforms:
            t0 = time.time()
            objective, rho = name.split("-")[0], name.endswith("-rho")
            chosen = self.settings()
            kw = {"hidden": chosen["hidden"], "epochs": chosen["epochs"]}
            if objective in ("cl", "mcl"):
                kw["tau"] = chosen["tau"]
            cfg = self.transform_config(objective, rho, **kw)
            self._transforms[name] = cached_transforms(
                cfg, self.embeddings("old", "train"), self.embeddings("new", "train"),
                self.setup.train.labels, self.dataset, self.profile, self.progress)
            self.timings[f"transform_{name}"] = time.time() - t0
        return self._transforms[name]

    # --- rows -----------------------------------------------------------------------------
    def pair(self, role: str) -> tuple[np.ndarray, np.ndarray]:
        """(query, gallery) embeddings of a backbone."""
        return self.embeddings(role, "query"), self.embeddings(role, "gallery")

    def row(self, name: str) -> Row:
        """A Table 1 or ablation row as two systems; negative flips against old/old."""
        old_q, old_g = self.pair("old")

        def systems(oq, og, nq, ng):
            return self.setup.arrays(oq, og, nq, ng, reference=old_q)

        if name == "Old":
            return Row(name, systems(old_q, old_g, old_q, old_g), "phi_old / phi_old, no backfill")
        new_q, new_g = self.pair("new")
        if name == "New":
            return Row(name, systems(new_q, new_g, new_q, new_g),
                       "phi_new / phi_new, fully backfilled")
        naive = systems(old_q, old_g, new_q, new_g)
        if name == "RM_naive":
            return Row(name, naive, "rank merge of old/old and new/new")
        if name == "BCT":
            bq, bg = self.pair("bct")
            return Row(name, systems(bq, old_g, bq, bg), "phi_bct / phi_old, then phi_bct")
        if name == "FCT":
            h = self.transform("fct")
            return Row(name, systems(new_q, h.forward(old_g), new_q, new_g),
                       "phi_new / h(phi_old), no side-information")
        if name == "BiCT":
            (bq, bg), up = self.pair("bict"), self.transform("bict")
            return Row(name, systems(bq, up.forward(old_g), bq, bg),
                       "phi_bict / h'(phi_old), then phi_bict (our reimplementation)")
        transform = {"+RQT": "rqt", "+CL": "cl", "+MCL": "mcl", "+rho": "mcl-rho",
                     "RM": "mcl-rho"}[name]
        return Row(name, rm_systems(self.transform(transform), naive),
                   "psi(rho(phi_new)) / phi_old, then rho(phi_new)" if "rho" in transform
                   else f"psi_{transform}(phi_new) / phi_old, then phi_new")


class CifarExperiment(Experiment):
    """The CIFAR-100 experiment of a profile."""

    def __init__(self, profile: str | None = None, progress: bool = True):
        super().__init__("cifar100", profile, progress)


def gain(auc: float, auc_old: float, auc_new: float) -> float:
    """(AUC_method - AUC_old) / (AUC_new - AUC_old), on mAP; NaN when New equals Old."""
    if auc_new == auc_old:
        return float("nan")
    return (auc - auc_old) / (auc_new - auc_old)


def evaluate_rows(exp: Experiment, names: tuple[str, ...], baselines: dict | None = None
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


PROTOCOLS = {
    "cifar100": "CIFAR-100 test, leave-one-out; backfill order default_rng(0)",
    "market1501": "Market-1501 query/gallery, same-id same-camera removed, distractors kept; "
                  "backfill order default_rng(0)",
}


def reproduce(dataset: str = "cifar100", profile: str | None = None, progress: bool = True
              ) -> dict:
    """Train/evaluate whatever is missing; write table1.json and ablation.json."""
    start = time.time()
    exp = Experiment(dataset, profile, progress)
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
    folder = results_root() / dataset / exp.profile
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "backbones": {r: asdict(m.config) for r, m in exp._models.items()},
        "transforms": {n: asdict(t.config) for n, t in exp._transforms.items()},
        "hyperparameter_selection": exp.selection,
        "protocol": PROTOCOLS[dataset],
        "fct": "without side-information",
        **(exp.setup.extra or {}),
    }
    prov = provenance(config, time.time() - start, exp.profile)
    prov["step_seconds"] = exp.timings
    prov["backbone_train_seconds"] = {r: m.wall_time_s for r, m in exp._models.items()}
    prov["transform_fit_seconds"] = {n: sum(h["seconds"] for h in t.history)
                                     for n, t in exp._transforms.items()}
    tables = {"table1": {"rows": table, "paper": PAPER[dataset]},
              "ablation": {"rows": ablation}}
    for name, body in tables.items():
        body["provenance"] = prov
        write_json(folder / f"{name}.json", body)
    return tables


def reproduce_cifar100(profile: str | None = None, progress: bool = True) -> dict:
    return reproduce("cifar100", profile, progress)


def results(dataset: str = "cifar100", profile: str | None = None, progress: bool = False
            ) -> dict:
    """Table 1 and ablation results of a profile: read from data/results if there, else run."""
    profile = profile or profile_name()
    folder = results_root() / dataset / profile
    if (folder / "table1.json").exists() and (folder / "ablation.json").exists():
        return {name: json.loads((folder / f"{name}.json").read_text())
                for name in ("table1", "ablation")}
    return reproduce(dataset, profile, progress)


def cifar100_results(profile: str | None = None, progress: bool = False) -> dict:
    return results("cifar100", profile, progress)


def curve_of(result_row: dict) -> BackfillCurve:
    """A BackfillCurve back from a results-file row."""
    keys = ("t", "mAP", "top1", "top5", "nfr")
    return BackfillCurve(**{k: result_row[k] for k in keys},
                         num_valid_queries=result_row.get("num_valid_queries", 0))
