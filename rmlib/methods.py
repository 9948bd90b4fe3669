"""Each row of Table 1 as a recipe. The Old and New rows: backbones on CIFAR-100.

CIFAR-100 protocol: the old model trains on the training images of fine classes 0-49,
the new one on all 100; both are evaluated leave-one-out on the 10,000 test images
(query set = gallery set, each query's own image excluded, relevant = same fine class).
The smoke profile takes a small real, class-balanced subset of both splits.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from rmlib.config import profile_name, profile_settings, results_root
from rmlib.data import ImageSet, load_cifar100, old_class_mask
from rmlib.data.cifar import NUM_CLASSES, OLD_CLASSES
from rmlib.embed import cached_embeddings
from rmlib.provenance import provenance
from rmlib.retrieval import Protocol, evaluate
from rmlib.train import BackboneConfig, TrainedModel, count_parameters, train_backbone

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
