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
    "singletons": (lambda a: a.update(labels=np.arange(len(a["labels"]))),
                   "have fewer than 4 items"),
    # two per label pass a fit but not the hold-out that chooses tau: refused up front
    "two per label": (lambda a: a.update(labels=np.arange(len(a["labels"])) // 2),
                      "needs 4 per label (2 held out, 2 to fit); give --tau"),
    "unknown key": (lambda a: a.update(label=a["labels"]), "unknown array(s) label"),
    "width 0": (lambda a: a.update(old=a["old"][:, :0]), "width 0"),
    "complex": (lambda a: a.update(old=a["old"] + 1j), "complex numbers"),
    "strings": (lambda a: a.update(new=a["new"].astype(str)), "real numbers"),
    "overflow": (lambda a: a.update(old=a["old"].astype("f8") * 1e300), "beyond float32"),
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


def test_two_items_per_label_fit_when_tau_is_given(files, capsys):
    with np.load(files / "train.npz") as f:
        old, new = f["old"][:40], f["new"][:40]
    np.savez(files / "pairs.npz", old=old, new=new, labels=np.arange(40) // 2)
    compat = files / "pairs.pt"
    assert main(["fit", str(files / "pairs.npz"), "--out", str(compat), "--tau", "0.2",
                 "--epochs", "1", "--quiet"]) == 0
    assert f"wrote {compat}" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--tau", "inf"], "--tau: inf is not a finite positive number"),
    (["--tau", "nan"], "--tau: nan is not a finite positive number"),
    (["--tau", "-1"], "--tau: -1 is not a finite positive number"),
    (["--epochs", "0"], "--epochs: 0 is not positive"),
    (["--epochs", "-5"], "--epochs: -5 is not positive; give 1 or more"),
])
def test_bad_fit_options_are_one_line(argv, message, files, capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", str(files / "train.npz"), "--out", str(files / "c.pt"), *argv])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err
    assert not (files / "c.pt").exists()


@pytest.fixture
def compat(files):
    path = files / "compat.pt"
    assert main(["fit", str(files / "train.npz"), "--out", str(path), "--tau", "0.2",
                 "--epochs", "1", "--quiet"]) == 0
    return path


def _nan_psi(state):
    first = next(iter(state["psi"]))
    state["psi"][first][0] = float("nan")


BAD_COMPAT = {
    "missing field": (lambda s: s.pop("psi_dims"), "lacks the field 'psi_dims'"),
    "wrong type": (lambda s: s.update(old_dim="12"), "field 'old_dim' is a str"),
    "wrong dims": (lambda s: s.update(psi_dims=[16, 13, s["psi_dims"][2]]),
                   "psi maps 16 -> 13 dimensions"),
    "bad mean": (lambda s: s.update(new_mean=s["new_mean"][:3]), "new_mean has shape (3,)"),
    "nan weights": (_nan_psi, "psi weights hold NaN or inf"),
    "size mismatch": (lambda s: s.update(psi_dims=[16, 12, 7]), "is not psi's 7"),
    "bad config": (lambda s: s.update(config="{not json"), "config does not parse"),
    # a config that would build a million layers (about 1 TB) is refused by counting tensors
    "a million layers": (lambda s: _config(s, layers=1_000_000),
                         "which is 7000002 psi tensors, but the file holds"),
    "zero layers": (lambda s: _config(s, layers=0), "layers 0, not a positive integer"),
    "another objective": (lambda s: _config(s, objective="cl", rho=False), "objective is 'cl'"),
    "closed form with rho": (lambda s: _config(s, objective="affine"), "does not parse"),
    "rho missing": (lambda s: s.update(rho={}), "with rho, which is"),
    "tensor shape": (lambda s: s["psi"].update({"net.0.weight": torch.zeros(3, 3)}),
                     "psi tensor 'net.0.weight' has shape (3, 3)"),
    # fitted before fit normalised its inputs: apply (which normalises) would not match it
    "before unit inputs": (lambda s: s.pop("unit_inputs"), "fitted by an older rmlib"),
    "string seed": (lambda s: _config(s, seed="x"), "seed 'x', not a non-negative integer"),
    "huge seed": (lambda s: _config(s, seed=2 ** 70), "not a non-negative integer"),
    "string rho": (lambda s: _config(s, rho="yes"), "rho 'yes', not true or false"),
    "no centres": (lambda s: s.pop("centres"), "lacks the field 'centres'"),
    "mcl of width 0": (lambda s: (_config(s, hidden=0), s.update(psi_dims=[16, 12, 0])),
                       "width 0 does not fit 'mcl'"),
    "format 1 with centres": (lambda s: s.update(format="rmlib-compat-1", centres={
        "old": torch.zeros(12), "new": torch.ones(16)}), "neither closed forms nor centres"),
    "one centre": (lambda s: s.update(centres={"old": torch.zeros(12)}),
                   "centres are neither empty nor one for the old and one for the new"),
    "centre shape": (lambda s: s.update(centres={"old": torch.zeros(3), "new": torch.zeros(16)}),
                     "old centre has shape (3,), not (12,)"),
    "nan centre": (lambda s: s.update(centres={"old": torch.zeros(12),
                                               "new": torch.full((16,), float("nan"))}),
                   "new centre weights hold NaN or inf"),
}


def _config(state, **changes):
    state["config"] = json.dumps({**json.loads(state["config"]), **changes})


@pytest.mark.parametrize("case", sorted(BAD_COMPAT))
def test_malformed_compat_files_are_one_line_naming_the_file(case, compat, files, capsys):
    state = torch.load(compat, weights_only=True)
    mutate, message = BAD_COMPAT[case]
    mutate(state)
    bad = files / "bad.pt"
    torch.save(state, bad)
    out = files / "o.npz"
    assert main(["apply", str(bad), str(files / "emb.npz"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{bad} is damaged: " in err and message in err
    assert "emb.npz" not in err and not out.exists()


def test_apply_writes_the_path_it_prints(compat, files, capsys):
    out = files / "rm_systems"  # no extension: written as given, not as rm_systems.npz
    assert main(["apply", str(compat), str(files / "emb.npz"), "--out", str(out)]) == 0
    assert f"wrote {out}:" in capsys.readouterr().out
    assert out.is_file() and not (files / "rm_systems.npz").exists()
    assert main(["backfill", str(out)]) == 0
    for target in (files, compat, files / "emb.npz"):  # a folder, or an input
        before = target.read_bytes() if target.is_file() else None
        assert main(["apply", str(compat), str(files / "emb.npz"), "--out", str(target)]) == 2
        assert before is None or target.read_bytes() == before
    err = capsys.readouterr().err
    assert "is a folder" in err and err.count("is the input file") == 2


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
    from rmlib.engine.transforms import TransformConfig
    from rmlib.methods import selection

    best = {"tau": 0.2, "hidden": 256, "epochs": 12}
    calls = []

    def fake_score(cfg, *args, **kwargs):
        calls.append((cfg.tau, cfg.hidden, cfg.epochs))
        return (-abs(cfg.tau - best["tau"]) - abs(cfg.hidden - best["hidden"]) / 1000
                - abs(cfg.epochs - best["epochs"]) / 100)

    monkeypatch.setattr(selection, "validation_auc", fake_score)
    base = TransformConfig(hidden=512, epochs=6)
    labels = np.repeat(np.arange(4), 5)
    chosen = selection.select_settings(base, None, None, labels, np.arange(10),
                                       np.arange(10, 20), taus=(0.05, 0.2, 1.0), tau_epochs=3,
                                       widths=(256, 512, 1024), epochs=(6, 12))
    assert {k: chosen[k] for k in best} == best
    assert calls[:3] == [(0.05, 512, 3), (0.2, 512, 3), (1.0, 512, 3)]
    assert calls[3:5] == [(0.2, 256, 3), (0.2, 1024, 3)]  # (0.2, 512, 3) is not fitted again
    assert calls[5:] == [(0.2, 256, 6), (0.2, 256, 12)]
    assert len(calls) == len(set(calls))


def test_embeddings_that_are_not_unit_length_give_the_same_result(files, capsys):
    """fit and apply L2-normalise what they read: norms near 20 (a model without a final
    normalisation) give the AUC of the unit-length data, not a broken merge."""
    rng = np.random.default_rng(5)
    scaled = files / "scaled"
    scaled.mkdir()
    for name in ("train.npz", "emb.npz"):
        with np.load(files / name) as f:
            arrays = {k: f[k] * rng.uniform(18, 22, (len(f[k]), 1)).astype(np.float32)
                      if f[k].ndim == 2 else f[k] for k in f.files}
        np.savez(scaled / name, **arrays)
    auc = {}
    for folder in (files, scaled):
        fit = ["fit", str(folder / "train.npz"), "--out", str(folder / "c.pt"), "--tau", "0.2",
               "--epochs", "2", "--quiet"]
        assert main(fit) == 0
        assert main(["apply", str(folder / "c.pt"), str(folder / "emb.npz"), "--out",
                     str(folder / "rm.npz")]) == 0
        assert main(["backfill", str(folder / "rm.npz"), "--json", str(folder / "rm.json")]) == 0
        auc[folder] = json.loads((folder / "rm.json").read_text())["auc_mAP"]
    out = capsys.readouterr().out
    assert out.count("not unit length") == 2  # fit and apply each say so, once
    assert auc[scaled] == pytest.approx(auc[files], abs=0.005)
    assert torch.load(scaled / "c.pt", weights_only=True)["unit_inputs"] is True


def test_fit_centre_records_the_training_means_and_apply_moves_by_them(files, capsys):
    """fit --centre: each system moved by the mean of its unit training embeddings before
    fitting, the two centres kept in COMPAT.pt, and apply moving the evaluation file by the
    same ones before psi and rho (rm_systems of the centred systems, computed here)."""
    from rmlib.evaluation.emb_file import load_backfill_arrays
    from rmlib.evaluation.systems import centred
    from rmlib.methods.selection import rm_systems
    from rmlib.own_upgrade import load_compat

    # a shared direction (the cone of book/rank_merge) on top of each space
    coned = files / "coned"
    coned.mkdir()
    for name in ("train.npz", "emb.npz"):
        with np.load(files / name) as f:
            np.savez(coned / name, **{k: f[k] + 2.0 if f[k].ndim == 2 else f[k] for k in f.files})
    compat, out = coned / "c.pt", coned / "rm.npz"
    assert main(["fit", str(coned / "train.npz"), "--out", str(compat), "--tau", "0.2",
                 "--epochs", "2", "--centre", "--quiet"]) == 0
    assert "each system centred on its mean over TRAIN.npz" in capsys.readouterr().out
    state = torch.load(compat, weights_only=True)
    with np.load(coned / "train.npz") as f:
        unit = {k: f[k] / np.linalg.norm(f[k], axis=1, keepdims=True) for k in ("old", "new")}
    for side in ("old", "new"):
        np.testing.assert_allclose(state["centres"][side].numpy(), unit[side].mean(0), atol=1e-6)
    assert main(["apply", str(compat), str(coned / "emb.npz"), "--out", str(out)]) == 0
    t, _ = load_compat(compat)
    raw = load_backfill_arrays(coned / "emb.npz")
    unit_raw = {k: getattr(raw, k) / np.linalg.norm(getattr(raw, k), axis=1, keepdims=True)
                for k in ("old_query", "old_gallery", "new_query", "new_gallery")}
    expected = rm_systems(t, centred(type(raw)(**unit_raw, query_labels=raw.query_labels),
                                     unit["old"].mean(0), unit["new"].mean(0)))
    with np.load(out) as f:
        for key in ("old_query", "old_gallery", "new_query", "new_gallery"):
            np.testing.assert_allclose(f[key], getattr(expected, key), atol=1e-5)
        np.testing.assert_array_equal(f["reference_query"], raw.old_query)  # flips: raw old

    plain = files / "plain.pt"  # without --centre: no centres, apply leaves the file as it is
    assert main(["fit", str(coned / "train.npz"), "--out", str(plain), "--tau", "0.2",
                 "--epochs", "1", "--quiet"]) == 0
    assert torch.load(plain, weights_only=True)["centres"] == {}


def test_compat_files_of_format_1_load_as_not_centred(compat, files):
    state = torch.load(compat, weights_only=True)
    state.pop("centres")
    state["format"] = "rmlib-compat-1"
    old = files / "format1.pt"
    torch.save(state, old)
    outs = [files / "new.npz", files / "old.npz"]
    for path, out in zip((compat, old), outs, strict=True):
        assert main(["apply", str(path), str(files / "emb.npz"), "--out", str(out)]) == 0
    with np.load(outs[0]) as a, np.load(outs[1]) as b:
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("method", ["procrustes", "affine"])
def test_fit_method_closed_form_round_trip(method, files, capsys):
    """--method procrustes|affine: psi alone, solved in closed form (no labels read beyond
    their format, so one item per label is enough), saved, checked and applied like MCL's,
    and it merges better than the naive systems on these spaces."""
    from rmlib.engine import closed_form
    from rmlib.own_upgrade import load_compat

    with np.load(files / "train.npz") as f:
        old, new = f["old"], f["new"]
    np.savez(files / "singletons.npz", old=old, new=new, labels=np.arange(len(old)))
    compat, out = files / f"{method}.pt", files / f"{method}.npz"
    assert main(["fit", str(files / "singletons.npz"), "--out", str(compat), "--method",
                 method, "--centre"]) == 0
    assert f"fitted psi ({method}, in closed form) on 800 items" in capsys.readouterr().out
    t, state = load_compat(compat)
    assert t.rho is None and t.config.objective == method and state["centres"]
    centred_old = old - old.mean(0)
    centred_new = new - new.mean(0)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    solved = closed_form.procrustes(unit(centred_new), unit(centred_old)) \
        if method == "procrustes" else closed_form.affine(unit(centred_new), unit(centred_old))[0]
    np.testing.assert_allclose(t.psi.linear.weight.detach().numpy(), solved, atol=1e-5)
    assert main(["apply", str(compat), str(files / "emb.npz"), "--out", str(out)]) == 0
    for name, src in (("naive", files / "emb.npz"), ("closed", out)):
        assert main(["backfill", str(src), "--json", str(files / f"{name}.json")]) == 0
    naive = json.loads((files / "naive.json").read_text())
    closed = json.loads((files / "closed.json").read_text())
    assert closed["auc_mAP"] > naive["auc_mAP"]


@pytest.mark.parametrize("argv", [["--tau", "0.1"], ["--epochs", "3"], ["--search-size"],
                                  ["--rho"]])
def test_closed_forms_refuse_the_options_of_a_trained_fit(argv, files, capsys):
    assert main(["fit", str(files / "train.npz"), "--out", str(files / "c.pt"), "--method",
                 "procrustes", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{argv[0]} are for --method mcl only" in err
    assert not (files / "c.pt").exists()


def test_fit_centre_refuses_a_row_at_the_mean_in_one_line(files, capsys):
    with np.load(files / "train.npz") as f:
        old, new, labels = f["old"].copy(), f["new"].copy(), f["labels"]
    old[:] = old[0]  # every old row the same: centring leaves each of them at the mean
    np.savez(files / "flat.npz", old=old, new=new, labels=labels)
    out = files / "c.pt"
    assert main(["fit", str(files / "flat.npz"), "--out", str(out), "--tau", "0.2",
                 "--epochs", "1", "--centre", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "centring leaves 800 old training row(s) at the mean" in err
    assert not out.exists()
