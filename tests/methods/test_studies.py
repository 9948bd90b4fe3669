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
