import json
import subprocess
import sys

import numpy as np
import pytest

from rmlib.cli import main
from tests.conftest import clustered
from tests.reference import reference_curve


def write(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.fixture
def loo_file(tmp_path):
    labels, old = clustered(150, 8, 7, 1.2, seed=11)
    rng = np.random.default_rng(12)
    new = (rng.normal(size=(7, 8))[labels] * 2 + 0.7 * rng.normal(size=(150, 8))).astype("f4")
    path = write(tmp_path / "emb.npz", old_query=old, old_gallery=old, new_query=new,
                 new_gallery=new, query_labels=labels)
    return path, dict(oq=old, og=old, nq=new, ng=new, qlab=labels)


def test_backfill_json_agrees_with_independent_evaluator(loo_file, tmp_path, capsys):
    path, a = loo_file
    out = tmp_path / "out.json"
    assert main(["backfill", str(path), "--seed", "3", "--json", str(out),
                 "--plot", str(tmp_path / "c.png")]) == 0
    result = json.loads(out.read_text())
    ref = reference_curve(a["oq"], a["og"], a["nq"], a["ng"], a["qlab"], seed=3)
    for k in ("mAP", "top1", "top5", "nfr"):
        np.testing.assert_allclose(result[k], ref[k], atol=1e-4)
    assert len(result["t"]) == 21
    assert result["auc_mAP"] == pytest.approx(np.trapezoid(ref["mAP"], result["t"]), abs=1e-4)
    assert result["provenance"]["config"]["seed"] == 3
    assert (tmp_path / "c.png").stat().st_size > 1000
    shown = capsys.readouterr().out
    assert "AUC mAP" in shown and "(8)" in shown


def test_backfill_camera_protocol_and_reference_query(tmp_path):
    ql, oq = clustered(40, 5, 6, 1.0, seed=1)
    gl, og = clustered(90, 5, 7, 1.0, seed=2)
    rng = np.random.default_rng(3)
    nq, ng = oq * 1.5 + 0.1, og * 1.5
    ref = (oq + 0.2 * rng.normal(size=oq.shape)).astype("f4")
    qc, gc = rng.integers(1, 4, 40), rng.integers(1, 4, 90)
    path = write(tmp_path / "m.npz", old_query=oq, old_gallery=og, new_query=nq, new_gallery=ng,
                 query_labels=ql, gallery_labels=gl, query_cams=qc, gallery_cams=gc,
                 reference_query=ref)
    out = tmp_path / "m.json"
    assert main(["backfill", str(path), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    expected = reference_curve(oq, og, nq, ng, ql, gl, qc, gc, ref_q=ref)
    for k in ("mAP", "top1", "top5", "nfr"):
        np.testing.assert_allclose(result[k], expected[k], atol=1e-4)


BAD_CASES = {
    "missing key": (lambda a: a.pop("new_gallery"), "lacks new_gallery"),
    "dimension": (lambda a: a.update(new_query=a["new_query"][:, :3]), "has dimension"),
    "rows": (lambda a: a.update(new_query=a["new_query"][:-1]), "rows"),
    "nan": (lambda a: a["old_gallery"].__setitem__((3, 1), np.nan), "NaN or inf in 1 row"),
    "inf": (lambda a: a["new_query"].__setitem__((0, 0), np.inf), "NaN or inf"),
    "label length": (lambda a: a.update(query_labels=a["query_labels"][:-2]), "one per query"),
    "float labels": (lambda a: a.update(query_labels=a["query_labels"] * 0.5), "integers"),
    "empty gallery": (lambda a: a.update(old_gallery=a["old_gallery"][:0],
                                         new_gallery=a["new_gallery"][:0],
                                         gallery_labels=np.zeros(0, int)), "empty"),
    "loo rows": (lambda a: a.update(old_gallery=a["old_gallery"][:-1],
                                    new_gallery=a["new_gallery"][:-1]), "leave-one-out"),
    "one camera array": (lambda a: a.update(gallery_labels=a["query_labels"],
                                            query_cams=a["query_labels"]), "both query_cams"),
    "no relevant": (lambda a: a.update(query_labels=np.arange(len(a["query_labels"]))),
                    "no query has a relevant"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_exits_2_with_one_line(case, loo_file, tmp_path, capsys):
    path, _ = loo_file
    with np.load(path) as f:
        arrays = {k: f[k].copy() for k in f.files}
    mutate, message = BAD_CASES[case]
    mutate(arrays)
    bad = write(tmp_path / "bad.npz", **arrays)
    assert main(["backfill", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("rmlib: error:")
    assert message in err


def test_unreadable_files(tmp_path, capsys):
    assert main(["backfill", str(tmp_path / "absent.npz")]) == 2
    (tmp_path / "junk.npz").write_text("hello")
    assert main(["backfill", str(tmp_path / "junk.npz")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "not a readable .npz" in err


def test_module_entry_point_runs_without_traceback(loo_file, tmp_path):
    path, _ = loo_file
    ok = subprocess.run([sys.executable, "-m", "rmlib", "backfill", str(path)],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "AUC mAP" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "rmlib", "backfill", str(tmp_path / "x.npz")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_provenance_is_dirty_only_when_code_changed(tmp_path, monkeypatch):
    """Edited chapters or results do not make a result's commit '+dirty'; edited code does."""
    import subprocess

    from rmlib import provenance

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                       cwd=tmp_path, check=True, capture_output=True)

    for name in ("rmlib/a.py", "book/a.ipynb", "data/results/r.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("0")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "first")
    monkeypatch.setattr(provenance, "REPO_ROOT", tmp_path)
    for name in ("book/a.ipynb", "data/results/r.json"):
        (tmp_path / name).write_text("1")
    assert not provenance.git_commit().endswith("+dirty")
    (tmp_path / "rmlib/a.py").write_text("1")
    assert provenance.git_commit().endswith("+dirty")
