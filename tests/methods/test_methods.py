import json

import numpy as np
import pytest
import torch

from rmlib import RmlibError
from rmlib.data.sampling import pk_batches
from rmlib.engine.transforms import TransformConfig, Transforms, fit_transforms
from rmlib.evaluation.retrieval import Protocol, evaluate
from rmlib.evaluation.systems import SystemPair
from rmlib.methods.registry import ABLATION_ROWS, BASELINE_ROWS, METHODS, TABLE1_ROWS
from rmlib.methods.reproduce import gain
from rmlib.own_upgrade import rm_systems
from tests.conftest import clustered


def paired_embeddings(n=600, classes=12, seed=0):
    """Old and new embeddings of the same items in unrelated, differently scaled spaces."""
    labels, old = clustered(n, 16, classes, 0.9, seed=seed)
    rng = np.random.default_rng(seed + 1)
    new = rng.normal(size=(classes, 24))[labels] + 0.5 * rng.normal(size=(n, 24))
    norm = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    return labels, norm(old), norm(new)


def test_pk_batches_cover_every_item_once():
    labels = torch.tensor([0] * 10 + [1] * 7 + [2] * 3)
    batches = pk_batches(labels, classes=2, per_class=4, generator=torch.Generator())
    seen = torch.cat(batches).sort().values
    assert torch.equal(seen, torch.arange(20))


@pytest.mark.parametrize("objective,rho,layers", [("rqt", False, 2), ("mcl", True, 2),
                                                  ("mcl", True, 1), ("fct", False, 1)])
def test_transforms_learn_and_round_trip(objective, rho, layers, tmp_path):
    labels, old, new = paired_embeddings()
    cfg = TransformConfig(objective=objective, rho=rho, tau=0.2, hidden=64, epochs=15,
                          classes_per_batch=6, per_class=8, layers=layers)
    t = fit_transforms(cfg, old, new, labels, progress=False)
    assert t.history[-1]["loss"] < t.history[0]["loss"]
    path = tmp_path / "t.pt"
    torch.save(t.state(), path)
    back = Transforms.from_state(torch.load(path, weights_only=True))
    learned = back.h if objective == "fct" else back.psi
    linears = [m for m in learned.net if isinstance(m, torch.nn.Linear)]
    assert len(linears) == layers + 1 and back.config.layers == layers
    if objective == "fct":
        np.testing.assert_allclose(back.forward(old), t.forward(old), atol=1e-6)
    else:
        np.testing.assert_allclose(back.reverse(new), t.reverse(new), atol=1e-6)
        out = t.reverse(new)
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("n,epochs", [(40, 1), (40, 2), (40, 3), (180, 1), (180, 2),
                                      (180, 5)])
def test_short_fits_of_any_length_train(n, epochs):
    """OneCycleLR divides by (warm-up steps - 1): a fit of exactly 10 steps (a tenth warming
    up) once failed with ZeroDivisionError. Here 1, 2, 3, 5, 10 and 25 steps."""
    from rmlib.engine.transforms import steps_per_epoch

    labels, old, new = paired_embeddings(n=n, classes=6 if n == 40 else 12)
    cfg = TransformConfig(objective="rqt", hidden=16, epochs=epochs, classes_per_batch=6,
                          per_class=64 if n == 40 else 8)  # one batch an epoch, or five
    assert steps_per_epoch(cfg, labels) == (1 if n == 40 else 5)
    t = fit_transforms(cfg, old, new, labels, progress=False)
    assert len(t.history) == epochs and np.isfinite(t.history[-1]["loss"])


def test_rqt_brings_reverse_queries_into_the_old_space():
    labels, old, new = paired_embeddings(seed=3)
    cfg = TransformConfig(objective="rqt", hidden=64, epochs=30, classes_per_batch=6)
    t = fit_transforms(cfg, old, new, labels, progress=False)
    protocol = Protocol.leave_one_out(labels)
    # a new query, reverse-transformed, searches the old gallery better than an old query
    # (the new model is the better one), and far above chance (1/12)
    rev = evaluate(t.reverse(new), old, protocol).summary()["mAP"]
    assert rev > evaluate(old, old, protocol).summary()["mAP"] > 0.3
    arrays = rm_systems(t, SystemPair(old, old, new, new, labels))
    assert arrays.old_query.shape == old.shape and arrays.new_query.shape == new.shape
    np.testing.assert_array_equal(arrays.reference_query, old)


def test_bad_transform_configs():
    with pytest.raises(RmlibError, match="unknown objective"):
        TransformConfig(objective="nope")
    with pytest.raises(RmlibError, match="rho is trained with mcl"):
        TransformConfig(objective="rqt", rho=True)


def test_cache_keys_follow_every_field_and_the_cache_version(monkeypatch):
    """A key hashes every field of a config and the cache version: a change of either is a
    new run, never a stale one reused."""
    from dataclasses import fields, replace

    from rmlib.engine import runs

    cfg = TransformConfig(objective="mcl", rho=True, tau=0.1, hidden=1024, epochs=12)
    changed = {"tau": 0.2, "hidden": 512, "layers": 1, "epochs": 6, "seed": 1, "mine": False,
               "sources": ("x",), "lr": 1e-3, "per_class": 4}
    keys = {replace(cfg, **{k: v}).key() for k, v in changed.items()}
    assert len(keys) == len(changed) and cfg.key() not in keys
    assert {f.name for f in fields(cfg)} >= set(changed)
    before = cfg.key()
    monkeypatch.setattr(runs, "CACHE_VERSION", "another")
    assert cfg.key() != before


def test_gain():
    assert gain(0.3, 0.2, 0.4) == pytest.approx(0.5)
    assert gain(0.2, 0.2, 0.4) == 0.0


def test_smoke_reproduce_writes_every_row(smoke_config, tmp_path):
    from rmlib.methods.reproduce import reproduce

    tables = reproduce("cifar100", smoke_config, progress=False)
    folder = tmp_path / "results" / "cifar100" / "smoke"
    table = json.loads((folder / "table1.json").read_text())
    ablation = json.loads((folder / "ablation.json").read_text())
    assert list(table["rows"]) == list(TABLE1_ROWS)
    assert list(ablation["rows"]) == list(ABLATION_ROWS)
    rows = table["rows"]
    assert rows["Old"]["gain"] == 0 and rows["New"]["gain"] == pytest.approx(1)
    assert np.ptp(rows["Old"]["mAP"]) == 0  # no backfill: a flat curve
    assert np.ptp(rows["New+rho"]["mAP"]) == 0  # the upgraded model alone: flat too
    assert rows["New+rho"]["gain_upgraded"] == pytest.approx(1)
    seeds = list(smoke_config.profile.transforms.seeds)
    assert len(seeds) >= 3
    for name, row in {**rows, **ablation["rows"]}.items():
        assert len(row["t"]) == 21 and len(row["nfr"]) == 21
        assert set(row["conditions"]["top1"]) >= {"cond6_M0_ge_old", "cond7_M1_ge_new",
                                                  "drawdown", "cond8_no_fall_beyond_noise"}
        assert "gain_upgraded" in row
        if name in ("Old", "New"):
            assert row["seeds"] == [0] and row["auc_mAP_std"] == 0
            continue
        # every merged row: its seeds, one AUC per seed, their mean and spread
        assert row["seeds"] == seeds, name
        assert len(row["auc_mAP_seeds"]) == len(row["auc_top1_seeds"]) == len(seeds)
        assert row["auc_mAP"] == pytest.approx(np.mean(row["auc_mAP_seeds"]))
        assert row["auc_mAP_std"] == pytest.approx(np.std(row["auc_mAP_seeds"], ddof=1))
        assert len(row["mAP_std"]) == 21
    # the backfill order differs between seeds, so RM_naive's AUC does too
    assert rows["RM_naive"]["auc_mAP_std"] > 0
    # RM_naive ends where New ends and starts where Old starts
    assert rows["RM_naive"]["mAP"][0] == pytest.approx(rows["Old"]["mAP"][0])
    assert rows["RM_naive"]["mAP"][-1] == pytest.approx(rows["New"]["mAP"][-1])
    chosen = table["provenance"]["config"]["hyperparameter_selection"]
    assert chosen["tau"] in (0.05, 0.1, 0.2, 1.0)
    assert chosen["hidden"] in (64, 128) and chosen["epochs"] in (2, 3)
    assert {int(w) for w in chosen["val_auc_mAP_by_hidden"]} == {64, 128}
    transforms = table["provenance"]["config"]["transforms"]
    assert {"mcl-rho", "mcl-rho@seed1", "mcl-rho@seed2"} <= set(transforms)
    assert transforms["mcl-rho@seed2"]["seed"] == 2
    rm = transforms["mcl-rho"]
    assert (rm["tau"], rm["hidden"], rm["epochs"]) == (chosen["tau"], chosen["hidden"],
                                                       chosen["epochs"])
    assert table["paper"]["RM"] == [41.4, 60.7, 78]
    assert tables["table1"]["rows"].keys() == rows.keys()
    for role in ("old", "new"):
        assert 0 < table["spaces"][role]["mean_vector_length"] < 1
    merged = rows["RM_naive"]["merged_top10"]
    assert set(merged) == {"0.05", "0.25", "0.5"}
    assert all(0 <= m["from_new_part"] <= 1 for m in merged.values())
    centring = json.loads((folder / "centring.json").read_text())
    assert list(centring["rows"]) == ["Old, centred", "New, centred", "RM_naive, centred"]
    decision = centring["decision"]
    assert decision["decision"] in ("every row", "rows of their own")
    assert set(decision["raw"]) == set(decision["centred"]) == {
        "old_mAP", "new_mAP", "rm_naive_auc_mAP"}
    runs = smoke_config.paths.runs / "cifar100" / "smoke"
    assert len(list(runs.glob("old-*/centre.npy"))) == 1  # recorded with the model
    baselines = json.loads((folder / "baselines.json").read_text())
    assert list(baselines["rows"]) == list(BASELINE_ROWS)
    for name, row in baselines["rows"].items():
        assert row["seeds"] == (seeds if METHODS[name].seeded else [0]), name
        distances = row["part_distances"]
        assert 0 <= distances["new irrelevant closer than old relevant"] <= 1
        assert distances["old relevant"] > 0 and distances["new irrelevant"] > 0
    backbones = baselines["provenance"]["config"]["backbones"]
    published, variant = backbones["bct"]["objective"], backbones["bct-old-classes"]["objective"]
    assert (published["new_classes"], published["smoothing"]) == ("synthesised", 0.0)
    assert set(variant) == {"name", "source", "weight"}  # as every earlier run recorded it
    assert backbones["bct"]["role"] == backbones["bct-old-classes"]["role"] == "bct"
    transforms = baselines["provenance"]["config"]["transforms"]
    old_run, target_run = transforms["bict-forward>bct"]["sources"]  # towards BCT's model
    assert old_run.startswith("old-") and target_run.startswith("bct-")
    # ml-fct's own 2048 wide, 80 epochs, capped by the smoke profile's fixed_caps
    assert (transforms["fct-mlfct"]["hidden"], transforms["fct-mlfct"]["epochs"]) == (64, 2)


def test_the_registry_covers_table1_and_the_ablation():
    from rmlib.methods.registry import paper_table1

    assert set(TABLE1_ROWS) | set(ABLATION_ROWS) <= set(METHODS)
    for dataset in ("cifar100", "market1501"):
        assert set(paper_table1()[dataset]) <= set(TABLE1_ROWS)
    for method in METHODS.values():
        assert method.note
        assert method.same_as is None or method.same_as in METHODS


def test_a_new_method_is_one_registry_entry(smoke_config, monkeypatch):
    """Adding a row is one entry: here an existing row under a second name, evaluated by the
    same runner, with the same numbers."""
    from rmlib.methods import registry
    from rmlib.methods.experiment import Experiment
    from rmlib.methods.reproduce import evaluate_rows

    entry = registry.Method("RM_naive again", lambda e, seed: e.naive(),
                            "rank merge of old/old and new/new, registered twice")
    monkeypatch.setitem(registry.METHODS, entry.name, entry)
    rows = evaluate_rows(Experiment("cifar100", smoke_config, progress=False),
                         ("RM_naive", entry.name))
    assert list(rows) == ["Old", "New", "RM_naive", entry.name]
    for key in ("mAP", "top1", "nfr", "auc_mAP", "auc_mAP_seeds", "gain", "conditions"):
        assert rows[entry.name][key] == rows["RM_naive"][key]
