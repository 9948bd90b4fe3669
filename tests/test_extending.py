"""Extending rmlib: a new entry of a registry, defined here, runs end to end."""

import numpy as np
import pytest
import torch

from rmlib import RmlibError
from rmlib.engine import transforms
from rmlib.engine.transforms import (
    OBJECTIVES,
    TransformConfig,
    TransformObjective,
    build_transforms,
    fit_transforms,
    objective_of,
    register_objective,
)
from rmlib.evaluation.backfill import backfill_arrays
from rmlib.evaluation.systems import SystemPair
from rmlib.methods.recipes import CifarRecipe
from rmlib.methods.selection import rm_systems


def _spaces(n: int, seed: int, classes: int = 8):
    """Labelled items in an old and a better new space (unrelated coordinates)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    old = np.random.default_rng(1).normal(size=(classes, 6))[labels] + rng.normal(size=(n, 6))
    new = np.random.default_rng(2).normal(size=(classes, 8))[labels] + \
        0.5 * rng.normal(size=(n, 8))
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    return labels, unit(old), unit(new)


def cosine_objective(t, o, n, y):
    """A new compatibility loss: psi(phi_new) aligned with phi_old by cosine."""
    return (1 - torch.nn.functional.cosine_similarity(t.psi(n), o)).mean()


@pytest.fixture
def cosine(monkeypatch):
    monkeypatch.setattr(transforms, "OBJECTIVES", OBJECTIVES.copy())  # undone after the test
    return register_objective(TransformObjective("cosine", cosine_objective))


def test_a_new_objective_is_one_function_and_one_registry_entry(cosine):
    labels, old, new = _spaces(600, seed=0)
    config = TransformConfig(objective="cosine", hidden=32, epochs=3, classes_per_batch=4,
                             per_class=8)
    t = fit_transforms(config, old, new, labels, progress=False)
    assert t.config.name == "cosine" and t.rho is None and t.psi.d_out == 6
    history = [h["loss"] for h in t.history]
    assert history[-1] < history[0]  # it trained on the new loss
    q_labels, q_old, q_new = _spaces(200, seed=3)
    untrained = build_transforms(config, 6, 8)

    def alignment(tr):  # how close psi(phi_new(x)) is to phi_old(x), on held-out items
        return float(np.mean(np.sum(tr.reverse(q_new) * q_old, axis=1)))

    assert alignment(t) > alignment(untrained) + 0.2  # what the new loss asks for
    curve, conditions = backfill_arrays(rm_systems(t, SystemPair(q_old, q_old, q_new,
                                                                     q_new, q_labels)))
    assert len(curve.t) == 21 and np.isfinite(curve.auc("mAP")) and "cond6" in str(conditions)
    saved = transforms.Transforms.from_state(t.state())
    torch.testing.assert_close(saved.psi(torch.as_tensor(q_new)), t.psi(torch.as_tensor(q_new)))


def test_an_unknown_objective_is_an_error_never_a_fallback(cosine):
    with pytest.raises(RmlibError, match="unknown objective 'cosin'; use one of .*cosine"):
        TransformConfig(objective="cosin")
    with pytest.raises(RmlibError, match="rho is trained with mcl .* not with 'cosine'"):
        TransformConfig(objective="cosine", rho=True)
    with pytest.raises(RmlibError, match="already registered"):
        register_objective(TransformObjective("cosine", cosine_objective))
    assert objective_of("mcl").takes_tau and not objective_of("cosine").takes_tau


def test_a_new_order_policy_is_one_function_and_one_registry_entry(tmp_path, monkeypatch,
                                                                   capsys):
    """Registered, a policy is a choice of the command line, with its own help."""
    import json

    from rmlib.cli import main
    from rmlib.evaluation import orders

    monkeypatch.setattr(orders, "ORDER_POLICIES", orders.ORDER_POLICIES.copy())
    orders.register_order_policy(orders.OrderPolicy(
        "last_first", lambda arrays, seed, train: np.arange(len(arrays.old_gallery))[::-1],
        summary="the gallery from its end"))
    labels, old, new = _spaces(120, seed=4)
    np.savez(tmp_path / "emb.npz", old_query=old, old_gallery=old, new_query=new,
             new_gallery=new, query_labels=labels)
    with pytest.raises(SystemExit):
        main(["backfill", "--help"])
    assert "last_first (the gallery from its end)" in " ".join(capsys.readouterr().out.split())
    for policy in ("last_first", "random"):
        assert main(["backfill", str(tmp_path / "emb.npz"), "--order", policy, "--json",
                     str(tmp_path / f"{policy}.json")]) == 0
    shown = capsys.readouterr().out
    assert "backfill order last_first\n" in shown  # not seeded: no seed printed
    curves = {p: json.loads((tmp_path / f"{p}.json").read_text()) for p in ("last_first",
                                                                            "random")}
    assert curves["last_first"]["provenance"]["config"]["order"] == "last_first"
    assert curves["last_first"]["mAP"] != curves["random"]["mAP"]
    assert main(["backfill", str(tmp_path / "emb.npz"), "--order", "last_first",
                 "--order-train", str(tmp_path / "emb.npz")]) == 2
    assert "--order-train is for --order uncertainty only" in capsys.readouterr().err


def test_a_new_objective_gives_a_table_row_through_the_runner(cosine, smoke_config,
                                                               monkeypatch):
    """One objective and one Method entry: the runner fits it with the chosen settings and
    evaluates its row beside the others (smoke profile, real CIFAR-100)."""
    from rmlib.methods import registry
    from rmlib.methods.experiment import Experiment
    from rmlib.methods.reproduce import evaluate_rows

    row = registry.Method("+COS", registry._reverse_transform("cosine"),
                          "psi_cos(phi_new) / phi_old, then phi_new")
    monkeypatch.setitem(registry.METHODS, row.name, row)
    exp = Experiment("cifar100", smoke_config, progress=False)
    rows = evaluate_rows(exp, ("RM_naive", "+COS"))
    assert list(rows) == ["Old", "New", "RM_naive", "+COS"]
    cos = rows["+COS"]["auc_mAP"]
    assert 0 < cos < 1 and cos != rows["RM_naive"]["auc_mAP"]
    fitted = exp.transform("cosine")
    # its spec says it takes no tau: the chosen tau is not passed (the default stays)
    assert fitted.config.objective == "cosine" and fitted.config.tau == TransformConfig().tau


# the toy data set's own backbone recipe, for the one profile it runs in
TOY_RECIPE = CifarRecipe("fast", (16, 32, 64), 1, 1, batch_size=64, lr=0.1)


def _toy_setup(config):
    """A data set of 10 colour classes (32 x 32): old on classes 0-4, leave-one-out test."""
    from rmlib.data import ImageSet
    from rmlib.methods.setups import Setup

    rng = np.random.default_rng(0)
    colours = rng.integers(40, 216, (10, 3, 1, 1))

    def images(per_class):
        labels = np.repeat(np.arange(10), per_class)
        noise = rng.normal(0, 40, (len(labels), 3, 32, 32))
        return ImageSet(np.clip(colours[labels] + noise, 0, 255).astype(np.uint8), labels)

    train, test = images(30), images(8)
    return Setup("toy", config, train, train.labels < 5, 5, 10, test,
                 details={"classes": 10})


@pytest.mark.slow  # trains every backbone and transform of the smoke profile
def test_a_new_dataset_is_one_loader_and_one_registry_entry(config_of, monkeypatch, capsys):
    import json
    from dataclasses import replace

    from rmlib.cli import main
    from rmlib.engine.objectives import Objective
    from rmlib.methods import setups

    def toy_backbone(setup, role):
        return replace(setups._cifar_backbone(setup, role), dataset="toy")

    monkeypatch.setattr(setups, "DATASETS", setups.DATASETS.copy())
    setups.register_dataset(setups.Dataset(
        "toy", _toy_setup, {"smoke": TOY_RECIPE}, toy_backbone, lambda c: Objective(),
        test_protocol="toy test, leave-one-out",
        backfill_protocol="toy test, leave-one-out; backfill order default_rng(0)"))
    config = config_of("smoke")
    monkeypatch.setenv("RMLIB_PROFILE", "smoke")
    assert main(["reproduce", "toy", "--quiet"]) == 0  # a choice of the command line now
    assert "Table 1, toy, profile smoke" in capsys.readouterr().out
    table = json.loads((config.paths.results / "toy" / "smoke" / "table1.json").read_text())
    assert set(table["rows"]) >= {"Old", "New", "RM_naive", "BCT", "FCT", "BiCT", "RM"}
    assert table["paper"] == {}  # the paper has no numbers for it
    config_record = table["provenance"]["config"]
    assert config_record["protocol"].startswith("toy test") and config_record["classes"] == 10
    assert all(0 <= r["auc_mAP"] <= 1 for r in table["rows"].values())
    assert config_record["backbones"]["old"]["batch_size"] == 64  # the toy's own recipe
    assert main(["reproduce", "toy", "--profile", "cpu", "--quiet"]) == 2
    assert "'toy' has no recipe for the 'cpu' profile; it runs in smoke" in \
        capsys.readouterr().err
