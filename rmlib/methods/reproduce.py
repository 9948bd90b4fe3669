"""Run the methods of the registry and write their results with provenance.

`train_backbones` writes backbones.json; `reproduce` writes table1.json and ablation.json:
for every row, the backfill curves, their AUCs, the Gain and the paper's conditions
(6)-(8) against the deployed old system and the upgraded model.

Explained in the book: book/table1.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from rmlib import RmlibError
from rmlib.config import Config
from rmlib.engine.backbones import count_parameters
from rmlib.evaluation.backfill import backfill_arrays
from rmlib.evaluation.curves import BackfillCurve, average_curves, check_conditions
from rmlib.evaluation.geometry import merged_shares, part_distances, sample_queries, spread
from rmlib.evaluation.retrieval import evaluate
from rmlib.evaluation.systems import SystemPair
from rmlib.methods.experiment import Experiment
from rmlib.methods.registry import (
    ABLATION_ROWS,
    BASELINE_ROWS,
    CENTRING_ROWS,
    METHODS,
    TABLE1_ROWS,
    paper_table1,
)
from rmlib.methods.setups import ROLES, dataset_spec
from rmlib.outputs import check_folder, check_output, write_json
from rmlib.provenance import provenance


def backbone_entry(exp: Experiment, role: str) -> dict:
    """One model's results: metrics on the evaluation sets, training curve, config, time."""
    trained = exp.model(role)
    metrics = evaluate(*exp.embedding_pair(role), exp.setup.protocol).summary()
    entry = {**metrics, "history": trained.history, "config": asdict(trained.config),
             "parameters": count_parameters(trained.model), "run": trained.run_dir.name,
             "train_wall_time_s": trained.wall_time_s,
             "train_images": len(exp.setup.training_set(role)),
             "test_images": len(exp.setup.query)}
    if hasattr(trained.model.backbone, "pretrained"):
        entry["imagenet_initialised"] = bool(trained.model.backbone.pretrained)
    return entry


def _checked_experiment(dataset: str, config: Config, results: tuple[str, ...],
                        progress: bool) -> Experiment:
    """The experiment that will write `results` (file stems), once its results files and
    run cache are known to be writable: before any training, not after it."""
    exp = Experiment(dataset, config, progress)
    for name in results:
        check_output(config.results_folder(dataset) / f"{name}.json", "the results file")
    check_folder(config.paths.runs / dataset, "the run cache")
    return exp


def train_backbones(dataset: str, config: Config, roles: tuple[str, ...] = ROLES,
                    progress: bool = True) -> dict:
    """Train (or reuse) the requested backbones; add them to backbones.json."""
    start = time.time()
    return _backbones(_checked_experiment(dataset, config, ("backbones",), progress), roles,
                      start)


def _backbones(exp: Experiment, roles: tuple[str, ...], start: float) -> dict:
    out = exp.config.results_folder(exp.dataset) / "backbones.json"
    result = read_results(out) or {}
    for role in roles:
        result[role] = backbone_entry(exp, role)
    result["provenance"] = provenance(
        {"roles": list(roles), "protocol": dataset_spec(exp.dataset).test_protocol,
         "old_classes": exp.setup.num_old_classes,
         "test_time_views": exp.setup.test_time_views, **(exp.setup.details or {})},
        time.time() - start, commit=exp.config.commit, profile=exp.profile)
    result["provenance"]["train_wall_time_s"] = {
        r: result[r]["train_wall_time_s"] for r in ROLES if r in result}
    write_json(out, result)
    return result


# Each study beyond the paper (rmlib.methods.studies, rmlib.methods.chain) by its
# command-line name: the name of its results file, beside Table 1's.
STUDY_FILES = {"orders": "order_policies", "heterogeneous": "heterogeneous",
               "backbone-seeds": "backbone_seeds", "closed-form": "closed_form",
               "open-class": "open_class", "chain": "chain"}


def study_path(dataset: str, config: Config, study: str) -> Path:
    """Where a study's results file lives: beside Table 1's."""
    return config.results_folder(dataset) / f"{STUDY_FILES[study]}.json"


def checked_study_path(dataset: str, config: Config, study: str) -> Path:
    """`study_path`, once that file and the run cache are known to be writable: checked
    before a study trains anything, not after."""
    out = study_path(dataset, config, study)
    check_output(out, "the results file")
    check_folder(config.paths.runs / dataset, "the run cache")
    return out


def read_results(path: Path) -> dict | None:
    """A results file's content, None if there is none; a damaged one is one clear line."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RmlibError(f"{path} is not a readable results file ({exc}); move it aside "
                         "and run again") from exc


def gain(auc: float, auc_old: float, auc_new: float) -> float:
    """(AUC_method - AUC_old) / (AUC_new - AUC_old), on mAP; NaN when New equals Old."""
    if auc_new == auc_old:
        return float("nan")
    return (auc - auc_old) / (auc_new - auc_old)


def final_metrics(row: dict) -> dict:
    """A row's metrics at the end of its curve (t = 1): a baseline for conditions (6)-(7)."""
    return {"mAP": row["mAP"][-1], "top1": row["top1"][-1]}


def evaluate_method(exp: Experiment, name: str, old: dict | None = None,
                    new: dict | None = None,
                    order: Callable[[SystemPair, int], np.ndarray] | None = None,
                    seeds: tuple[int, ...] | None = None) -> dict:
    """A method's backfill curves (the mean over the profile's seeds, if the method depends
    on them), AUCs with their spread, and conditions (6)-(8) of the mean curve, judged
    against the deployed old system's metrics `old` and the upgraded model's `new`
    (default: the method's own end points). `order(arrays, seed)`: the backfill order of
    a seed (default: the random order of the seed). `seeds`: those of a seeded method
    (default: the profile's)."""
    t0 = time.time()
    method = METHODS[name]
    seeds = (seeds or exp.config.profile.transforms.seeds) if method.seeded else (0,)
    runs, first_arrays = [], None
    for seed in seeds:
        arrays = method.systems(exp, seed)
        if first_arrays is None:
            first_arrays = arrays
        runs.append(backfill_arrays(
            arrays, seed=seed, new_baseline=new, old_baseline=old,
            calibration=method.calibration(exp, seed) if method.calibration else None,
            order=order(arrays, seed) if order else None, device=exp.config.torch_device))
    curve, spread = average_curves([c for c, _ in runs])
    sample = sample_queries(first_arrays)  # the geometry of seed 0's systems, computed once
    first = runs[0][1]
    conditions = check_conditions(curve, old or {m: first[m]["old"] for m in first},
                                  new or final_metrics(curve.to_dict()),
                                  std={m: spread[f"{m}_std"] for m in ("mAP", "top1")})
    return {**curve.to_dict(), "seeds": list(seeds), **spread, "conditions": conditions,
            "systems": method.note, "part_distances": part_distances(first_arrays, sample=sample),
            # a calibrated merge ranks by other scores than the distances counted here
            "merged_top10": None if method.calibration else merged_shares(
                first_arrays, order=order(first_arrays, seeds[0]) if order else None,
                sample=sample),
            "eval_seconds": time.time() - t0}


def evaluate_rows(exp: Experiment, names: tuple[str, ...],
                  seeds: tuple[int, ...] | None = None) -> dict[str, dict]:
    """Old and New first (they are the baselines of every other row), then `names`, each
    evaluated once (`same_as` rows share their twin's result), with the Gain and, when
    New+rho is among them, the Gain over the upgraded model. `seeds`: as evaluate_method's."""
    rows = {"Old": evaluate_method(exp, "Old"), "New": evaluate_method(exp, "New")}
    old, new = final_metrics(rows["Old"]), final_metrics(rows["New"])
    for name in names:
        twin = METHODS[name].same_as
        if name not in rows:
            rows[name] = rows[twin] if twin in rows else evaluate_method(exp, name, old, new,
                                                                         seeds=seeds)
    auc_old = rows["Old"]["auc_mAP"]
    for row in rows.values():
        row["gain"] = gain(row["auc_mAP"], auc_old, rows["New"]["auc_mAP"])
        if "New+rho" in rows:
            row["gain_upgraded"] = gain(row["auc_mAP"], auc_old, rows["New+rho"]["auc_mAP"])
    return rows


# The results files `reproduce` writes, and their rows.
RESULT_TABLES = {"table1": TABLE1_ROWS, "ablation": ABLATION_ROWS, "baselines": BASELINE_ROWS,
                 "centring": CENTRING_ROWS}
# What they hold besides rows: 2 adds the baselines file, part distances, merged top 10s
# and the models' spaces; 3 the centring file and its decision. A cheap profile's results
# of another format are made again.
RESULTS_FORMAT = 3


def reproduce(dataset: str, config: Config, progress: bool = True,
              backbones: bool = False) -> dict:
    """Train/evaluate whatever is missing; write table1.json, ablation.json,
    baselines.json and centring.json (`RESULT_TABLES`), and with
    `backbones` first backbones.json too (as `train both` would: one experiment, one
    load of the data, for a chapter that makes a cheap profile on the spot)."""
    start = time.time()
    exp = _checked_experiment(dataset, config, tuple(RESULT_TABLES)
                              + (("backbones",) if backbones else ()), progress)
    made = {"backbones": _backbones(exp, ROLES, start)} if backbones else {}
    return {**_tables(exp, time.time() if backbones else start), **made}


def _tables(exp: Experiment, start: float) -> dict:
    rows = evaluate_rows(exp, tuple(n for names in RESULT_TABLES.values() for n in names))
    run_config = {
        "backbones": {r: asdict(m.config) for r, m in exp.models.items()},
        "transforms": {n: asdict(t.config) for n, t in exp.transforms.items()},
        "hyperparameter_selection": exp.selection,
        "protocol": dataset_spec(exp.dataset).backfill_protocol,
        "fct": "without side-information",
        "test_time_views": exp.setup.test_time_views,
        **(exp.setup.details or {}),
    }
    prov = provenance(run_config, time.time() - start, commit=exp.config.commit,
                      profile=exp.profile)
    prov["step_seconds"] = exp.timings
    prov["backbone_train_seconds"] = {r: m.wall_time_s for r, m in exp.models.items()}
    prov["transform_fit_seconds"] = {n: sum(h["seconds"] for h in t.history)
                                     for n, t in exp.transforms.items()}
    tables = {name: {"rows": {n: rows[n] for n in names}}
              for name, names in RESULT_TABLES.items()}
    tables["table1"]["paper"] = paper_table1().get(exp.dataset, {})
    tables["table1"]["format"] = RESULTS_FORMAT
    tables["centring"]["decision"] = exp.centring_decision()
    # how much of its space each model's gallery embedding uses (the cone, book/rank_merge)
    tables["table1"]["spaces"] = {role: spread(exp.embeddings(role, "gallery"))
                                  for role in ROLES}
    for name, body in tables.items():
        body["provenance"] = prov
        write_json(exp.config.results_folder(exp.dataset) / f"{name}.json", body)
    return tables


def curve_of(result_row: dict) -> BackfillCurve:
    """A BackfillCurve back from a results-file row, with its spread over seeds (if any)
    in `extras`, which `rmlib.report.plot_curves` draws as bands."""
    keys = ("t", "mAP", "top1", "top5", "nfr")
    spread = {k: result_row[k] for k in ("mAP_std", "top1_std") if k in result_row}
    return BackfillCurve(**{k: result_row[k] for k in keys},
                         num_valid_queries=result_row.get("num_valid_queries", 0),
                         extras=spread)
