"""Two studies beyond the paper, each written to its own results file with provenance.

- `order_policies`: which items to backfill first (rmlib.evaluation.orders), for RM_naive and
  RM, each policy with every seed of the profile: `order_policies.json`.
- `heterogeneous`: an upgrade across architectures. The old model is a CIFAR ResNet-20
  (deep, narrow, residual, 64-d embeddings) instead of the fast net; the new model is
  Table 1's. Rows Old, New, RM_naive, RM and New+rho: `heterogeneous.json`.
- `backbone_seeds`: Table 1's rows that need no other backbone, with the old and new
  backbones trained again from other seeds: the spread over backbones, which Table 1's
  spread over transform seeds and backfill orders does not cover: `backbone_seeds.json`.
- `open_class`: the old model trained on classes 0-39, the new one on 0-79, and the
  rows of Table 1 evaluated on the test images of classes 80-99 (which neither model saw)
  and on all 100 classes (mixed): `open_class.json`.
- `closed_form`: psi in closed form (orthogonal Procrustes, least-squares affine), with and
  without the training-free calibration, beside the trained RQT, CL, MCL and RM:
  `closed_form.json`.
- `chain` (rmlib.methods.chain): a third model that arrives while the first backfill is
  part-way; five ways to go on, over the whole period: `chain.json`.

Explained in the book: book/beyond, book/beyond_two, book/table1.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, replace

import numpy as np

from rmlib import RmlibError
from rmlib.config import Config
from rmlib.evaluation.orders import ORDER_POLICIES, order_policy, policy_order
from rmlib.evaluation.systems import SystemPair
from rmlib.methods.chain import chain
from rmlib.methods.experiment import Experiment
from rmlib.methods.registry import CLOSED_FORM_ROWS, TABLE1_ROWS
from rmlib.methods.reproduce import (
    checked_study_path,
    evaluate_method,
    evaluate_rows,
    final_metrics,
    gain,
)
from rmlib.methods.selection import rm_systems
from rmlib.methods.setups import Setup, dataset_spec
from rmlib.outputs import write_json
from rmlib.provenance import provenance

ORDER_METHODS = ("RM_naive", "RM")
CLOSED_FORMS = ("procrustes", "affine")
HETEROGENEOUS_OLD = {"arch": "resnet20", "widths": (16, 32, 64), "dim": 64, "whiten": False}
HETEROGENEOUS_ROWS = ("RM_naive", "RM", "New+rho")
BACKBONE_SEED_ROWS = ("RM_naive", "RM_naive+cal", "RM", "New+rho")


def training_systems(exp: Experiment, method: str, seed: int) -> SystemPair:
    """`method`'s two systems on the training sample of seed 0 (`Experiment.training_sample`,
    embedded with the test images' views, so the head sees embeddings like the ones it will
    rank); the transforms are those of `seed`."""
    (old, labels), (new, _) = exp.training_sample("old"), exp.training_sample("new")
    naive = SystemPair(old, old, new, new, labels)
    if method == "RM_naive":
        return naive
    if method == "RM":
        return rm_systems(exp.transform("mcl-rho", seed), naive)
    raise ValueError(f"no training systems for {method!r}; use one of {ORDER_METHODS}")


def evaluate_order(exp: Experiment, method: str, policy: str, old: dict, new: dict) -> dict:
    """One method under one order policy: `evaluate_method` with, for each seed, that
    seed's transforms and its random order or head."""
    def order(arrays: SystemPair, seed: int) -> np.ndarray:
        train = training_systems(exp, method, seed) if order_policy(policy).needs_train \
            else None
        return policy_order(policy, arrays, seed, train)

    return {**evaluate_method(exp, method, old, new, order=order), "policy": policy,
            "privileged": order_policy(policy).privileged}


def order_policies(dataset: str, config: Config, policies: tuple[str, ...] | None = None,
                   progress: bool = False) -> dict:
    """Every registered order policy (or `policies`) for RM_naive and RM; writes
    order_policies.json."""
    policies = tuple(ORDER_POLICIES) if policies is None else policies
    start = time.time()
    out = checked_study_path(dataset, config, "orders")
    exp = Experiment(dataset, config, progress)
    base = evaluate_rows(exp, ())
    old, new = final_metrics(base["Old"]), final_metrics(base["New"])
    rows = {method: {policy: evaluate_order(exp, method, policy, old, new)
                     for policy in policies} for method in ORDER_METHODS}
    for by_policy in rows.values():
        for row in by_policy.values():
            row["gain"] = gain(row["auc_mAP"], base["Old"]["auc_mAP"], base["New"]["auc_mAP"])
    result = {"rows": rows, "reference": {n: base[n] for n in ("Old", "New")},
              "provenance": provenance(
                  {"methods": list(ORDER_METHODS), "policies": list(policies),
                   "train_sample": len(exp.training_sample("old")[1]),
                   "seeds": list(config.profile.transforms.seeds),
                   "oracle": "uses the evaluation set's new embeddings and labels: a "
                             "privileged greedy order, a reference for what an order can "
                             "buy, not a policy a deployment can run (and not a bound)",
                   "transforms": {n: asdict(t.config) for n, t in exp.transforms.items()}},
                  time.time() - start, commit=config.commit, profile=config.name)}
    write_json(out, result)
    return result


def heterogeneous(dataset: str, config: Config, progress: bool = False) -> dict:
    """Old, New, RM_naive, RM and New+rho with a ResNet-20 old model; writes
    heterogeneous.json. The settings search reruns: it depends on the two models."""
    start = time.time()
    out = checked_study_path(dataset, config, "heterogeneous")
    setup = replace(dataset_spec(dataset).setup(config), old_backbone=HETEROGENEOUS_OLD)
    exp = Experiment(dataset, config, progress, setup=setup)
    rows = evaluate_rows(exp, HETEROGENEOUS_ROWS)
    prov = provenance(
        {"backbones": {r: asdict(m.config) for r, m in exp.models.items()},
         "old_backbone": {k: list(v) if isinstance(v, tuple) else v
                          for k, v in HETEROGENEOUS_OLD.items()},
         "hyperparameter_selection": exp.selection,
         "transforms": {n: asdict(t.config) for n, t in exp.transforms.items()}},
        time.time() - start, commit=config.commit, profile=config.name)
    prov["step_seconds"] = exp.timings
    prov["backbone_train_seconds"] = {r: m.wall_time_s for r, m in exp.models.items()}
    result = {"rows": rows, "provenance": prov}
    write_json(out, result)
    return result


def backbone_seeds(dataset: str, config: Config, seeds: tuple[int, ...] | None = None,
                   progress: bool = False) -> dict:
    """Old, New, RM_naive, RM_naive+cal, RM and New+rho on old and new backbones trained
    from each of `seeds` (`Setup.backbone_seed`), with everything else held at seed 0 (one
    transform initialisation, backfill order and calibration sample) and the transforms'
    settings Table 1 chose: only the backbones vary. Writes backbone_seeds.json: each
    row's AUCs per backbone seed, their mean and their spread. `seeds`: default the
    profile's `backbone_seeds` (0 is Table 1's own backbones)."""
    seeds = seeds or config.profile.backbone_seeds
    start = time.time()
    out = checked_study_path(dataset, config, "backbone-seeds")
    table = Experiment(dataset, config, progress)
    selection = table.settings()  # chosen once, on Table 1's backbones
    by_seed, timings = {}, {}
    for seed in seeds:
        exp = Experiment(dataset, config, progress, replace(table.setup, backbone_seed=seed))
        exp.selection = selection
        by_seed[seed] = evaluate_rows(exp, BACKBONE_SEED_ROWS, seeds=(0,))
        timings[seed] = {r: m.wall_time_s for r, m in exp.models.items()}
    rows = {}
    for name in ("Old", "New", *BACKBONE_SEED_ROWS):
        row = {"backbone_seeds": list(seeds)}
        for key in ("auc_mAP", "auc_top1", "gain"):
            values = [by_seed[s][name][key] for s in seeds]
            row[f"{key}_by_backbone_seed"] = values
            row[key] = float(np.mean(values))
            row[f"{key}_backbone_std"] = float(np.std(values, ddof=1)) if len(values) > 1 \
                else 0.0
        rows[name] = row
    prov = provenance(
        {"backbone_seeds": list(seeds), "rows": ["Old", "New", *BACKBONE_SEED_ROWS],
         "held_at_seed_0": "transform initialisation and batches, backfill order, "
                           "calibration sample",
         "hyperparameter_selection": selection},
        time.time() - start, commit=config.commit, profile=config.name)
    prov["backbone_train_seconds"] = {str(s): t for s, t in timings.items()}
    result = {"rows": rows, "provenance": prov}
    write_json(out, result)
    return result



def closed_form(dataset: str, config: Config, progress: bool = False) -> dict:
    """RM_naive, its calibration, psi by orthogonal Procrustes and by least-squares affine
    maps (each with and without the calibration), and the trained +RQT, +CL, +MCL and RM,
    on Table 1's backbones and cache; writes closed_form.json with each closed form's
    fitting time on the training pairs."""
    start = time.time()
    out = checked_study_path(dataset, config, "closed-form")
    exp = Experiment(dataset, config, progress)
    rows = evaluate_rows(exp, CLOSED_FORM_ROWS)
    fits = {name: [exp.transform(name, seed).history[0]["seconds"]
                   for seed in config.profile.transforms.seeds] for name in CLOSED_FORMS}
    old, new = exp.embeddings("old", "train"), exp.embeddings("new", "train")
    prov = provenance(
        {"rows": list(CLOSED_FORM_ROWS), "hyperparameter_selection": exp.selection,
         "seeds": list(config.profile.transforms.seeds),
         "transforms": {n: asdict(t.config) for n, t in exp.transforms.items()}},
        time.time() - start, commit=config.commit, profile=config.name)
    prov["step_seconds"] = exp.timings
    result = {"rows": rows, "training_pairs": {"items": len(old), "old_dim": old.shape[1],
                                               "new_dim": new.shape[1]},
              "fit_seconds": fits, "provenance": prov}
    write_json(out, result)
    return result


# The open-class protocol (this project's; the WACV 2025 version of the paper has one, whose
# tables are not available to reproduce): classes the old model, the new model and
# neither of them trained on.
OPEN_CLASS = {"old_classes": 40, "new_classes": 80, "num_classes": 100}
OPEN_CLASS_SPLITS = {"unseen": "test images of classes 80-99, which neither model saw",
                     "mixed": "all 10,000 test images: classes 0-39 seen by both models, "
                              "40-79 by the new one only, 80-99 by neither"}


def open_class_setup(config: Config, split: str) -> Setup:
    """CIFAR-100 with the old model on classes 0-39 and the new one on 0-79 (their
    training images only), evaluated leave-one-out on the `split` of the test set."""
    if split not in OPEN_CLASS_SPLITS:
        raise ValueError(f"split {split!r}; use one of {', '.join(OPEN_CLASS_SPLITS)}")
    base = dataset_spec("cifar100").setup(config)
    old_classes, new_classes = OPEN_CLASS["old_classes"], OPEN_CLASS["new_classes"]
    train = base.train.subset(np.flatnonzero(base.train.labels < new_classes))
    query = base.query if split == "mixed" else \
        base.query.subset(np.flatnonzero(base.query.labels >= new_classes))
    return replace(base, train=train, old_mask=train.labels < old_classes,
                   num_old_classes=old_classes, num_classes=new_classes, query=query,
                   details={"open_class": {**OPEN_CLASS, "split": split,
                                           "evaluated_on": OPEN_CLASS_SPLITS[split]}})


def open_class(dataset: str, config: Config, progress: bool = False,
               rows: tuple[str, ...] = TABLE1_ROWS) -> dict:
    """Table 1's rows with the old model on 40 classes and the new one on 80, on the test
    images of the 20 classes neither saw and on all of them. The transforms' settings are
    chosen on this pair's own validation split (they depend on the two models), once for
    both splits. `rows`: default Table 1's. Writes open_class.json."""
    if dataset != "cifar100":
        raise RmlibError(f"the open-class study is defined on cifar100, not {dataset!r}")
    start = time.time()
    out = checked_study_path(dataset, config, "open-class")
    splits, experiments, selection = {}, {}, None
    for split in OPEN_CLASS_SPLITS:  # the same backbones and transforms, from the cache
        exp = Experiment(dataset, config, progress, setup=open_class_setup(config, split))
        exp.selection = selection
        splits[split] = evaluate_rows(exp, rows)
        selection = exp.selection
        experiments[split] = exp
    exp = experiments["unseen"]
    prov = provenance(
        {"rows": list(rows),
         "protocol": {**OPEN_CLASS, "splits": OPEN_CLASS_SPLITS,
                      "label": "this project's protocol, not the WACV 2025 paper's"},
         "backbones": {r: asdict(m.config) for r, m in exp.models.items()},
         "hyperparameter_selection": selection,
         "seeds": list(config.profile.transforms.seeds),
         "transforms": {n: asdict(t.config) for n, t in exp.transforms.items()}},
        time.time() - start, commit=config.commit, profile=config.name)
    prov["step_seconds"] = {split: e.timings for split, e in experiments.items()}
    prov["backbone_train_seconds"] = {r: m.wall_time_s for r, m in exp.models.items()}
    result = {"splits": splits, "queries": {s: len(e.setup.query) for s, e in
                                            experiments.items()},
              "provenance": prov}
    write_json(out, result)
    return result


# Each study by its command-line name: the function that runs it (and writes its file).
STUDIES: dict[str, Callable[..., dict]] = {
    "orders": order_policies, "heterogeneous": heterogeneous, "backbone-seeds": backbone_seeds,
    "closed-form": closed_form, "open-class": open_class, "chain": chain}
