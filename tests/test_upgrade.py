import json

import numpy as np
import pytest
import torch

from rmlib.cli import main


def spaces(n, classes, seed, d_old=12, d_new=16):
    """Labelled items embedded by an 'old' and a better 'new' model (unrelated spaces)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    c_old = np.random.default_rng(100).normal(size=(classes, d_old))
    c_new = np.random.default_rng(200).normal(size=(classes, d_new))
    old = c_old[labels] + 1.1 * rng.normal(size=(n, d_old))
    new = c_new[labels] + 0.6 * rng.normal(size=(n, d_new))
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    return labels, unit(old), unit(new)


@pytest.fixture
def files(tmp_path):
    labels, old, new = spaces(800, 10, seed=1)
    np.savez(tmp_path / "train.npz", old=old, new=new, labels=labels)
    ql, qo, qn = spaces(300, 10, seed=2)
    np.savez(tmp_path / "emb.npz", old_query=qo, old_gallery=qo, new_query=qn, new_gallery=qn,
             query_labels=ql)
    return tmp_path


def test_fit_apply_backfill_round_trip(files, capsys):
    compat, out = files / "compat.pt", files / "emb_rm.npz"
    assert main(["fit", str(files / "train.npz"), "--out", str(compat), "--epochs", "4",
                 "--quiet"]) == 0
    assert "tau chosen on" in capsys.readouterr().out
    state = torch.load(compat, weights_only=True)
    assert state["old_dim"] == 12 and state["new_dim"] == 16 and state["rho"]
    assert main(["apply", str(compat), str(files / "emb.npz"), "--out", str(out)]) == 0
    with np.load(out) as f:
        assert f["old_query"].shape == (300, 12) and f["new_gallery"].shape == (300, 16)
        np.testing.assert_array_equal(f["old_gallery"], np.load(files / "emb.npz")["old_gallery"])
        assert "reference_query" in f.files
    for name in ("naive", "rm"):
        src = files / ("emb.npz" if name == "naive" else "emb_rm.npz")
        assert main(["backfill", str(src), "--json", str(files / f"{name}.json")]) == 0
    naive = json.loads((files / "naive.json").read_text())
    rm = json.loads((files / "rm.json").read_text())
    # the transformed systems merge better than the raw ones on these well-separated spaces
    assert rm["auc_mAP"] > naive["auc_mAP"]


def test_fit_with_a_given_tau_and_without_rho(files, capsys):
    compat = files / "psi.pt"
    assert main(["fit", str(files / "train.npz"), "--out", str(compat), "--no-rho",
                 "--tau", "0.2", "--epochs", "2", "--quiet"]) == 0
    state = torch.load(compat, weights_only=True)
    assert state["tau"] == 0.2 and not state["rho"]
    assert "tau chosen" not in capsys.readouterr().out


BAD_TRAIN = {
    "missing array": (lambda a: a.pop("labels"), "lacks labels"),
    "rows": (lambda a: a.update(new=a["new"][:-3]), "same training items"),
    "nan": (lambda a: a["old"].__setitem__((0, 0), np.nan), "NaN or inf"),
    "singletons": (lambda a: a.update(labels=np.arange(len(a["labels"]))), "single item"),
    "one class": (lambda a: a.update(labels=np.zeros(len(a["labels"]), int)), "single class"),
    "float labels": (lambda a: a.update(labels=a["labels"] * 1.0), "integers"),
}


@pytest.mark.parametrize("case", sorted(BAD_TRAIN))
def test_bad_training_files(case, files, capsys):
    with np.load(files / "train.npz") as f:
        arrays = {k: f[k].copy() for k in f.files}
    mutate, message = BAD_TRAIN[case]
    mutate(arrays)
    np.savez(files / "bad.npz", **arrays)
    assert main(["fit", str(files / "bad.npz"), "--out", str(files / "x.pt"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err


def test_apply_refuses_another_model_pair(files, capsys):
    compat = files / "compat.pt"
    assert main(["fit", str(files / "train.npz"), "--out", str(compat), "--tau", "0.1",
                 "--epochs", "1", "--quiet"]) == 0
    ql, qo, qn = spaces(200, 10, seed=3, d_new=20)
    np.savez(files / "wide.npz", old_query=qo, old_gallery=qo, new_query=qn, new_gallery=qn,
             query_labels=ql)
    assert main(["apply", str(compat), str(files / "wide.npz"), "--out", str(files / "o.npz")]) == 2
    assert "fitted for 16" in capsys.readouterr().err
    # same dimensions, but embeddings whose mean points away from the fitted new space's
    mean = torch.load(compat, weights_only=True)["new_mean"].numpy()
    other = (-3 * mean + np.random.default_rng(9).normal(size=(200, 16))).astype(np.float32)
    np.savez(files / "other.npz", old_query=qo, old_gallery=qo, new_query=other,
             new_gallery=other, query_labels=ql)
    out = str(files / "o.npz")
    assert main(["apply", str(compat), str(files / "other.npz"), "--out", out]) == 2
    assert "does not look like" in capsys.readouterr().err
    assert main(["apply", str(files / "train.npz"), str(files / "emb.npz"), "--out",
                 str(files / "o.npz")]) == 2
    assert "not a file written by" in capsys.readouterr().err


def test_fit_can_choose_width_and_epochs_on_the_hold_out(files, capsys):
    compat = files / "sized.pt"
    assert main(["fit", str(files / "train.npz"), "--out", str(compat), "--tau", "0.2",
                 "--search-size", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "width chosen on" in out and "epochs chosen on" in out and "tau chosen" not in out
    state = torch.load(compat, weights_only=True)
    assert state["tau"] == 0.2 and state["psi_dims"][2] in (256, 512, 1024)


def test_select_settings_is_a_coordinate_search_on_the_validation_score(monkeypatch):
    """tau first (short fits), then the width at that tau, then the epochs at that width;
    each choice is the best validation score and nothing is fitted twice."""
    from rmlib import upgrade
    from rmlib.transforms import TransformConfig

    best = {"tau": 0.2, "hidden": 256, "epochs": 12}
    calls = []

    def fake_score(cfg, *args, **kwargs):
        calls.append((cfg.tau, cfg.hidden, cfg.epochs))
        return (-abs(cfg.tau - best["tau"]) - abs(cfg.hidden - best["hidden"]) / 1000
                - abs(cfg.epochs - best["epochs"]) / 100)

    monkeypatch.setattr(upgrade, "validation_auc", fake_score)
    base = TransformConfig(hidden=512, epochs=6)
    labels = np.repeat(np.arange(4), 5)
    chosen = upgrade.select_settings(base, None, None, labels, np.arange(10), np.arange(10, 20),
                                     taus=(0.05, 0.2, 1.0), tau_epochs=3,
                                     widths=(256, 512, 1024), epochs=(6, 12))
    assert {k: chosen[k] for k in best} == best
    assert calls[:3] == [(0.05, 512, 3), (0.2, 512, 3), (1.0, 512, 3)]
    assert calls[3:5] == [(0.2, 256, 3), (0.2, 1024, 3)]  # (0.2, 512, 3) is not fitted again
    assert calls[5:] == [(0.2, 256, 6), (0.2, 256, 12)]
    assert len(calls) == len(set(calls))
