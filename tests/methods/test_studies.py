"""The studies beyond the paper, end to end on real CIFAR-100 in the smoke profile."""

import json

from rmlib.cli import main
from rmlib.evaluation.orders import ORDER_POLICIES
from rmlib.methods.studies import HETEROGENEOUS_OLD, heterogeneous, order_policies


def test_order_policies_write_every_policy_with_seeds_for_both_merges(smoke_config, capsys,
                                                                     monkeypatch):
    monkeypatch.setenv("RMLIB_DATA", str(smoke_config.paths.data))
    result = order_policies("cifar100", smoke_config)
    path = smoke_config.paths.results / "cifar100" / "smoke" / "order_policies.json"
    assert json.loads(path.read_text())["rows"].keys() == {"RM_naive", "RM"}
    seeds = list(smoke_config.profile.transforms.seeds)
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


def test_backbone_seeds_retrain_both_backbones_and_hold_everything_else(smoke_config, capsys,
                                                                         monkeypatch):
    from rmlib.methods.reproduce import reproduce
    from rmlib.methods.studies import BACKBONE_SEED_ROWS, backbone_seeds

    table = reproduce("cifar100", smoke_config, progress=False)["table1"]["rows"]
    result = backbone_seeds("cifar100", smoke_config, seeds=(0, 1))
    runs = smoke_config.paths.runs / "cifar100" / "smoke"
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
    written = json.loads((smoke_config.paths.results / "cifar100" / "smoke" /
                          "backbone_seeds.json").read_text())
    assert written["provenance"]["config"]["hyperparameter_selection"] == json.loads(
        (smoke_config.paths.results / "cifar100" / "smoke" / "table1.json").read_text()
    )["provenance"]["config"]["hyperparameter_selection"]  # Table 1's, not chosen again
    monkeypatch.setenv("RMLIB_DATA", str(smoke_config.paths.data))
    main(["study", "backbone-seeds", "cifar100", "--profile", "smoke", "--quiet"])
    assert "over backbone seeds [0, 1]" in capsys.readouterr().out  # the smoke profile's
