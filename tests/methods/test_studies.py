"""The studies beyond the paper, end to end on real CIFAR-100 in the smoke profile.

The studies that read Table 1's backbones share one run cache (`table_config`), as they
do in a real run: its old and new models are trained once for all of them."""

import json

import pytest

from rmlib.cli import main
from rmlib.evaluation.orders import ORDER_POLICIES
from rmlib.methods.studies import HETEROGENEOUS_OLD, heterogeneous, order_policies


@pytest.fixture(scope="module")
def table_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("table-cache")


@pytest.fixture
def table_config(table_folder, cifar_root, monkeypatch):
    """The smoke profile with this module's shared run cache and results (for the command
    line too, which reads them from the environment)."""
    from rmlib.config import Config

    for name, folder in (("RMLIB_RUNS", "runs"), ("RMLIB_RESULTS", "results")):
        monkeypatch.setenv(name, str(table_folder / folder))
    monkeypatch.setenv("RMLIB_DATA", str(cifar_root))
    return Config.from_env("smoke")


def test_order_policies_write_every_policy_with_seeds_for_both_merges(table_config, capsys):
    result = order_policies("cifar100", table_config)
    path = table_config.paths.results / "cifar100" / "smoke" / "order_policies.json"
    assert json.loads(path.read_text())["rows"].keys() == {"RM_naive", "RM"}
    seeds = list(table_config.profile.transforms.seeds)
    for rows in result["rows"].values():
        assert tuple(rows) == tuple(ORDER_POLICIES)
        for policy, row in rows.items():
            assert row["seeds"] == seeds and len(row["auc_mAP_seeds"]) == len(seeds)
            assert row["privileged"] == (policy == "oracle")
            assert 0 < row["auc_mAP"] < 1 and "auc_mAP_std" in row and "gain" in row
    assert "privileged" in result["provenance"]["config"]["oracle"]
    main(["study", "orders", "cifar100", "--profile", "smoke", "--quiet"])  # prints its table
    assert "RM · oracle (privileged)" in capsys.readouterr().out


def test_heterogeneous_upgrade_trains_an_old_model_of_another_architecture(smoke_config):
    result = heterogeneous("cifar100", smoke_config)
    old = result["provenance"]["config"]["backbones"]["old"]
    new = result["provenance"]["config"]["backbones"]["new"]
    assert old["arch"] == HETEROGENEOUS_OLD["arch"] != new["arch"]
    assert old["dim"] == 64 and new["dim"] == 128
    assert set(result["rows"]) == {"Old", "New", "RM_naive", "RM", "New+rho"}
    assert "gain_upgraded" in result["rows"]["RM"]


def test_backbone_seeds_retrain_both_backbones_and_hold_everything_else(table_config, capsys):
    from rmlib.methods.reproduce import reproduce
    from rmlib.methods.studies import BACKBONE_SEED_ROWS, backbone_seeds

    table = reproduce("cifar100", table_config, progress=False)["table1"]["rows"]
    result = backbone_seeds("cifar100", table_config, seeds=(0, 1))
    runs = table_config.paths.runs / "cifar100" / "smoke"
    assert len(list(runs.glob("old-*"))) == len(list(runs.glob("new-*"))) == 2  # a pair each
    rows = result["rows"]
    assert set(rows) == {"Old", "New", *BACKBONE_SEED_ROWS}
    # seed 0 is Table 1's own backbones, at Table 1's first transform and order seed
    assert rows["Old"]["auc_mAP_by_backbone_seed"][0] == table["Old"]["auc_mAP"]
    assert rows["New"]["auc_mAP_by_backbone_seed"][0] == table["New"]["auc_mAP"]
    assert rows["RM"]["auc_mAP_by_backbone_seed"][0] == table["RM"]["auc_mAP_seeds"][0]
    for row in rows.values():
        values = row["auc_mAP_by_backbone_seed"]
        assert len(values) == 2 and row["auc_mAP_backbone_std"] > 0  # other weights, numbers
    written = json.loads((table_config.paths.results / "cifar100" / "smoke" /
                          "backbone_seeds.json").read_text())
    assert written["provenance"]["config"]["hyperparameter_selection"] == json.loads(
        (table_config.paths.results / "cifar100" / "smoke" / "table1.json").read_text()
    )["provenance"]["config"]["hyperparameter_selection"]  # Table 1's, not chosen again
    main(["study", "backbone-seeds", "cifar100", "--profile", "smoke", "--quiet"])
    assert "over backbone seeds [0, 1]" in capsys.readouterr().out  # the smoke profile's


def test_closed_form_study_solves_psi_and_reads_the_trained_rows_from_the_cache(
        table_config, capsys):
    from rmlib.methods.registry import CLOSED_FORM_ROWS
    from rmlib.methods.studies import closed_form

    result = closed_form("cifar100", table_config)
    rows = result["rows"]
    assert set(rows) == {"Old", "New", *CLOSED_FORM_ROWS}
    seeds = list(table_config.profile.transforms.seeds)
    for name in ("psi Procrustes", "psi affine"):
        assert rows[name]["seeds"] == seeds and 0 < rows[name]["auc_mAP"] < 1
        # the calibration changes the merge, not the systems (at t = 0, only float32 ties)
        assert rows[f"{name}+cal"]["mAP"][0] == pytest.approx(rows[name]["mAP"][0], abs=2e-3)
        assert rows[f"{name}+cal"]["auc_mAP"] != rows[name]["auc_mAP"]
        assert rows[f"{name}+cal"]["merged_top10"] is None
    # Table 1's two backbones, and the closed forms cached as transforms of their own
    runs = table_config.paths.runs / "cifar100" / "smoke"
    backbones = result["provenance"]["config"]["transforms"]["procrustes"]["sources"]
    assert [b.split("-")[0] for b in backbones] == ["old", "new"]
    assert all((runs / b).is_dir() for b in backbones)
    assert len(list(runs.glob("transform-procrustes-*/t.pt"))) == len(seeds)
    table = table_config.paths.results / "cifar100" / "smoke" / "table1.json"
    if table.is_file():  # with the backbone-seeds test before it: the same cached RM
        rm = json.loads(table.read_text())["rows"]["RM"]
        assert rows["RM"]["auc_mAP_seeds"] == rm["auc_mAP_seeds"]
    assert result["training_pairs"]["items"] > 0
    assert all(len(v) == len(seeds) for v in result["fit_seconds"].values())
    configs = result["provenance"]["config"]["transforms"]
    assert {c["objective"] for c in configs.values()} >= {"procrustes", "affine"}
    assert all(c["epochs"] == 0 for c in configs.values() if c["objective"] == "affine")
    main(["study", "closed-form", "cifar100", "--profile", "smoke", "--quiet"])
    out = capsys.readouterr().out
    assert "psi Procrustes+cal" in out and "training pairs" in out


def test_open_class_trains_on_40_and_80_classes_and_evaluates_on_classes_neither_saw(
        table_config, capsys, monkeypatch):
    import functools

    from rmlib.methods import studies
    from rmlib.methods.registry import TABLE1_ROWS
    from rmlib.methods.studies import open_class, open_class_setup

    unseen = open_class_setup(table_config, "unseen")
    assert unseen.train.labels.max() == 79 and unseen.old_mask.sum() == \
        (unseen.train.labels < 40).sum()
    assert set(unseen.query.labels) == set(range(80, 100))
    assert len(open_class_setup(table_config, "mixed").query.labels) > len(unseen.query.labels)
    # the rows that need no third backbone (BCT and BiCT train one more: the command's
    # default, Table 1's rows, adds them)
    rows = ("RM_naive", "FCT", "RM", "RM_naive+cal")
    result = open_class("cifar100", table_config, rows=rows)
    assert set(result["splits"]) == {"unseen", "mixed"}
    assert result["queries"]["unseen"] == len(unseen.query.labels)
    for by_row in result["splits"].values():
        assert list(by_row) == ["Old", "New", *rows]
        assert all(0 < row["auc_mAP"] < 1 for row in by_row.values())
    backbones = result["provenance"]["config"]["backbones"]
    assert (backbones["old"]["num_classes"], backbones["new"]["num_classes"]) == (40, 80)
    # one settings search for the pair, made for the first split and shared by the second
    assert result["provenance"]["config"]["hyperparameter_selection"]["tau"] > 0
    steps = result["provenance"]["step_seconds"]
    assert "hyperparameter_selection" in steps["unseen"]
    assert "hyperparameter_selection" not in steps["mixed"]
    assert "this project's protocol" in result["provenance"]["config"]["protocol"]["label"]
    assert set(TABLE1_ROWS) >= set(rows)
    monkeypatch.setattr(studies, "open_class", functools.partial(open_class, rows=rows))
    main(["study", "open-class", "cifar100", "--profile", "smoke", "--quiet"])  # from cache
    out = capsys.readouterr().out
    assert "open classes, unseen (" in out and "open classes, mixed (" in out


def test_chain_chooses_a_third_model_on_held_out_images_and_follows_five_strategies(
        table_config, capsys):
    from rmlib.figures import plot_period_curves
    from rmlib.methods.chain import PERIOD, SEARCHES, STRATEGIES, T1_VALUES, chain
    from rmlib.tables import chain_frame

    result = chain("cifar100", table_config)
    third = result["third_model"]
    assert set(third["held_out_mAP"]) == {"longer", "wider"}
    assert third["chosen"] == max(third["held_out_mAP"], key=third["held_out_mAP"].get)
    assert third["held_out_items"] > 0 and third["fit_items"] > third["held_out_items"]
    runs = table_config.paths.runs / "cifar100" / "smoke"
    assert len(list(runs.glob("third-*"))) == 2  # both candidates, cached
    searches = {name: s["mAP"] for name, s in result["searches"].items()}
    assert set(searches) == set(SEARCHES)
    seeds = list(table_config.profile.transforms.seeds)
    assert list(result["t1"]) == [str(t) for t in T1_VALUES]
    assert set(result["average_compatibility"]) == {"naive", "composed", "direct"}

    def close(a, b):  # the evaluator's end points are the single systems (float32 ties)
        assert a == pytest.approx(b, abs=1e-5)

    for t1, rows in result["t1"].items():
        assert list(rows) == list(STRATEGIES)
        for name, row in rows.items():
            assert row["x"][0] == 0 and row["x"][-1] == PERIOD
            assert row["seeds"] == seeds and len(row["auc_mAP_seeds"]) == len(seeds)
            assert row["re_embedded_N"] == (2.0 if name == "finish first" else 1 + float(t1))
            # the first backfill starts at M1's items searched by the first system's query
            close(row["mAP"][0], searches["M1" if name == "3-system naive" else "M1 by psi_21"])
            # and every strategy ends with every item re-embedded by M3
            close(row["mAP"][-1], searches["M3" if name == "3-system naive" else "M3 by rho_3"])
        # M3 arrives at t1 = x[k] == x[k + 1]: restart and the naive merge go on from the
        # same gallery and queries; the 3-system RM switches every part to M3's query
        k = rows["restart"]["x"].index(float(t1))
        assert rows["restart"]["x"][k + 1] == float(t1)
        for name in ("restart", "3-system naive"):
            close(rows[name]["mAP"][k + 1], rows[name]["mAP"][k])
        assert rows["3-system RM"]["mAP"][k + 1] != rows["restart"]["mAP"][k + 1]
        assert rows["3-system RM"]["mAP"][k + 1] != rows["3-system RM, composed psi"]["mAP"][k + 1]
        # finishing first: all M2 (rho_2) at x = 1, then M3's query through psi_32 on it
        finish = rows["finish first"]
        j = finish["x"].index(1.0)
        close(finish["mAP"][j], searches["M2 by rho_2"])
        close(finish["mAP"][j + 1], searches["M2 by psi_32"])
        assert finish["served_cross_searches"] == ["1-2", "2-3"]
    frame = chain_frame(result["t1"]["0.5"]).data
    assert list(frame.index) == list(STRATEGIES) and frame.loc["restart", "serves"] == "1-2"
    plot_period_curves(result["t1"]["0.5"], t1=0.5, path=table_config.paths.results / "c.png")
    main(["study", "chain", "cifar100", "--profile", "smoke", "--quiet"])  # from the cache
    out = capsys.readouterr().out
    assert "M3 arrives at t1 = 0.5:" in out and "3-system RM, composed psi" in out
    assert "average compatibility" in out
