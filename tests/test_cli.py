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
    # a misspelt optional array would silently turn the run into leave-one-out
    "unknown key": (lambda a: a.update(gallery_label=a["query_labels"]),
                    "unknown array(s) gallery_label; accepted: old_query"),
    "width 0": (lambda a: a.update({k: a[k][:, :0] for k in EMBEDDINGS}), "width 0"),
    "complex": (lambda a: a.update(old_query=a["old_query"] * (1 + 1j)), "complex numbers"),
    "strings": (lambda a: a.update(new_query=a["new_query"].astype(str)), "real numbers"),
    "booleans": (lambda a: a.update(new_gallery=a["new_gallery"] > 0), "real numbers"),
    "overflow": (lambda a: a.update({k: a[k].astype("f8") * 1e300 for k in EMBEDDINGS}),
                 "beyond float32"),
    "underflow": (lambda a: a.update({k: a[k].astype("f8") * 1e-300 for k in EMBEDDINGS}),
                  "multiply all four arrays by one common factor"),
    "spread": (lambda a: a.update({k: a[k].astype("f8") * 1e37 for k in EMBEDDINGS}),
               "divide all four arrays by one common factor"),
}
EMBEDDINGS = ("old_query", "old_gallery", "new_query", "new_gallery")


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
    np.save(tmp_path / "single.npy", np.zeros((3, 2)))
    (tmp_path / "single.npy").rename(tmp_path / "single.npz")
    assert main(["backfill", str(tmp_path / "single.npz")]) == 2
    np.savez(tmp_path / "objects.npz", old_query=np.array([{"a": 1}], dtype=object))
    assert main(["backfill", str(tmp_path / "objects.npz")]) == 2
    np.savez_compressed(tmp_path / "packed.npz", old_query=np.zeros((500, 50)))
    raw = bytearray((tmp_path / "packed.npz").read_bytes())
    raw[100:140] = b"\x00" * 40  # inside the compressed stream of old_query
    (tmp_path / "packed.npz").write_bytes(bytes(raw))
    assert main(["backfill", str(tmp_path / "packed.npz")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 5 and all(line.startswith("rmlib: error:") for line in lines)
    assert "does not exist" in lines[0] and "not a readable .npz" in lines[1]
    assert "single array (.npy)" in lines[2] and "'old_query' cannot be read" in lines[3]


def _huge_header(path):
    """An npz whose member's header claims shape (2**40, 16): numpy would try to allocate
    64 TiB before noticing that the data is not there."""
    import zipfile

    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 16), "f4"))
    header["shape"] = (2 ** 40, 16)
    with zipfile.ZipFile(path, "w") as z, z.open("old_query.npy", "w") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(np.zeros(16, "f4").tobytes())


def _symlink_loop(path):
    path.symlink_to(path)


BAD_FILES = {
    "a folder": (lambda p: p.mkdir(), "is a folder; give the path of an .npz file"),
    "a FIFO": (lambda p: __import__("os").mkfifo(p), "is not a regular file"),
    "a link loop": (_symlink_loop, "cannot be opened"),
    "a huge header": (_huge_header, "its header claims shape (1099511627776, 16)"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_inputs_that_are_not_npz_files_are_one_line(case, tmp_path, capsys):
    make, message = BAD_FILES[case]
    make(tmp_path / "emb.npz")
    assert main(["backfill", str(tmp_path / "emb.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("rmlib: error:") and message in err


@pytest.mark.parametrize("argv,message", [
    (["--seed", "-1"], "argument --seed: -1 is negative"),
    (["--seed", "1.5"], "argument --seed: '1.5' is not an integer"),
])
def test_bad_options_are_one_line(argv, message, loo_file, capsys):
    path, _ = loo_file
    with pytest.raises(SystemExit) as done:
        main(["backfill", str(path), *argv])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("rmlib: error:") and message in err


def _auc(path, tmp_path, name):
    out = tmp_path / f"{name}.json"
    assert main(["backfill", str(path), "--json", str(out)]) == 0
    return json.loads(out.read_text())["auc_mAP"]


@pytest.mark.parametrize("dtype", ["f4", "f8"])
@pytest.mark.parametrize("case", ["offset 1000", "offset 100", "scale 1e20", "scale 1e-20"])
def test_where_the_embeddings_sit_does_not_change_the_numbers(case, dtype, tmp_path):
    """Euclidean distances ignore a common shift and scale with a common factor, so the
    AUC must not move: far from the origin the fused float32 expansion used to cancel
    (AUC_mAP 12.5 instead of 85.8 at +1000) and 1e20 overflowed its squares."""
    labels, old = clustered(400, 64, 20, 1.6, seed=5)
    rng = np.random.default_rng(6)
    new = old[:, ::-1] + 0.2 * rng.normal(size=old.shape)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    old, new = unit(old.astype("f8")), unit(new)
    old, new = old.astype(dtype), new.astype(dtype)
    plain = write(tmp_path / "plain.npz", old_query=old, old_gallery=old, new_query=new,
                  new_gallery=new, query_labels=labels)
    kind, value = case.split()
    move = (lambda x: x + float(value)) if kind == "offset" else (lambda x: x * float(value))
    moved = write(tmp_path / "moved.npz", **{k: move(v.astype("f8")).astype(dtype) for k, v in
                                             (("old_query", old), ("old_gallery", old),
                                              ("new_query", new), ("new_gallery", new))},
                  query_labels=labels)
    expected = _auc(plain, tmp_path, "plain")
    assert 0.3 < expected < 0.99
    # float32 storage itself rounds x + 1000 to 6e-5; float64 input keeps its digits up to
    # the float32 distances (a last-bit difference can swap two near-tied items)
    assert _auc(moved, tmp_path, "moved") == pytest.approx(expected,
                                                          abs=1e-3 if dtype == "f4" else 1e-5)


@pytest.mark.slow  # a process of its own
def test_module_entry_point_runs_without_traceback(loo_file, tmp_path):
    path, _ = loo_file
    ok = subprocess.run([sys.executable, "-m", "rmlib", "backfill", str(path)],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "AUC mAP" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "rmlib", "backfill", str(tmp_path / "x.npz")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_provenance_names_no_commit_of_an_unrelated_repository(tmp_path, monkeypatch):
    """rmlib installed as a package inside some other git repository: that repository's
    HEAD is not rmlib's commit."""
    import subprocess

    from rmlib import __version__, config

    site = tmp_path / "venv" / "lib" / "site-packages"
    (site / "rmlib").mkdir(parents=True)
    (site / "rmlib" / "__init__.py").write_text("")
    (tmp_path / "app.py").write_text("")
    for args in (["init", "-q"], ["add", "app.py"], ["commit", "-qm", "app"]):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                       cwd=tmp_path, check=True, capture_output=True)
    monkeypatch.setattr(config, "REPO_ROOT", site)
    assert config.git_commit() == f"none: installed rmlib {__version__}, not a git checkout"
    monkeypatch.setattr(config, "REPO_ROOT", tmp_path)  # the top, but rmlib not tracked
    assert config.git_commit().startswith("none: installed rmlib")


def test_provenance_is_dirty_only_when_code_changed(tmp_path, monkeypatch):
    """Edited chapters or results do not make a result's commit '+dirty'; edited code does."""
    import subprocess

    from rmlib import config

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                       cwd=tmp_path, check=True, capture_output=True)

    for name in ("rmlib/__init__.py", "rmlib/a.py", "book/a.ipynb", "data/results/r.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("0")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "first")
    monkeypatch.setattr(config, "REPO_ROOT", tmp_path)
    for name in ("book/a.ipynb", "data/results/r.json"):
        (tmp_path / name).write_text("1")
    assert not config.git_commit().endswith("+dirty")
    (tmp_path / "rmlib/a.py").write_text("1")
    assert config.git_commit().endswith("+dirty")


def test_backfill_order_policies_and_a_users_own_order(loo_file, tmp_path, capsys):
    path, a = loo_file
    out = {}
    for order in ("random", "oracle"):
        assert main(["backfill", str(path), "--order", order, "--json",
                     str(tmp_path / f"{order}.json")]) == 0
        out[order] = json.loads((tmp_path / f"{order}.json").read_text())
    assert out["oracle"]["provenance"]["config"]["order"] == "oracle"
    assert out["oracle"]["auc_mAP"] > out["random"]["auc_mAP"]
    # a user's own order, as text: the oracle's, reversed, is the worst case
    from rmlib.evaluation.emb_file import load_backfill_arrays
    from rmlib.evaluation.orders import policy_order

    worst = policy_order("oracle", load_backfill_arrays(path))[::-1]
    np.savetxt(tmp_path / "mine.txt", worst, fmt="%d")
    assert main(["backfill", str(path), "--order", str(tmp_path / "mine.txt"), "--json",
                 str(tmp_path / "mine.json")]) == 0
    mine = json.loads((tmp_path / "mine.json").read_text())
    assert mine["auc_mAP"] < out["random"]["auc_mAP"]
    # uncertainty learns from a training file in the same format (here: the same items)
    assert main(["backfill", str(path), "--order", "uncertainty", "--order-train",
                 str(path)]) == 0
    assert "backfill order uncertainty (seed 0)" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--order", "uncertainty"], "give --order-train"),
    (["--order", "oracle", "--order-train", "{path}"], "--order-train is for --order uncertainty"),
    (["--order", "{tmp}/missing.npy"], "missing.npy does not exist; give the path of a backf"),
    (["--order", "{tmp}/short.txt"], "short.txt must be a permutation of the 150 gallery items"),
    (["--order", "{tmp}/empty.txt"], "empty.txt is empty; a backfill order lists"),
    (["--order", "{tmp}"], "is a folder"),
    (["--order", "randm"], "unknown backfill order 'randm'; use one of random, uncertainty"),
    (["--order", "{tmp}/junk.npy"], "is not a backfill order"),
    (["--order", "uncertainty", "--order-train", "{tmp}/wide.npz"],
     "old_gallery has width 12 but the evaluation file's has 8"),
])
def test_bad_orders_are_one_line(argv, message, loo_file, tmp_path, capsys, recwarn):
    path, a = loo_file
    np.savetxt(tmp_path / "short.txt", np.arange(149), fmt="%d")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "junk.npy").write_text("not numpy")
    wide = np.concatenate([a["og"], a["og"][:, :4]], 1)
    write(tmp_path / "wide.npz", old_query=wide, old_gallery=wide, new_query=a["nq"],
          new_gallery=a["ng"], query_labels=a["qlab"])
    argv = [x.format(path=path, tmp=tmp_path) for x in argv]
    assert main(["backfill", str(path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err
    assert not [w for w in recwarn if "numpy" in str(w.filename)]  # one line, no warnings


def test_an_order_file_with_an_upper_case_npy_suffix_is_read_as_npy(loo_file, tmp_path):
    path, _ = loo_file
    np.save(tmp_path / "order.npy", np.arange(150)[::-1])
    (tmp_path / "order.npy").rename(tmp_path / "ORDER.NPY")
    assert main(["backfill", str(path), "--order", str(tmp_path / "ORDER.NPY")]) == 0


@pytest.fixture
def slow_file(tmp_path):
    """An evaluation file big enough that a backfill runs for several seconds."""
    labels, old = clustered(12_000, 32, 40, 1.0, seed=1)
    new = (old + 0.3 * np.random.default_rng(2).normal(size=old.shape)).astype("f4")
    return write(tmp_path / "big.npz", old_query=old, old_gallery=old, new_query=new,
                 new_gallery=new, query_labels=labels)


@pytest.mark.slow  # a process of its own
@pytest.mark.parametrize("delay", [0.3, 1.0, 2.5])
def test_ctrl_c_at_any_moment_is_one_line_and_status_130(delay, slow_file):
    """Before, during and after the 1.5 s import of torch (Python's own start-up, the
    first ~50 ms, is before any rmlib code runs)."""
    import signal
    import time

    job = subprocess.Popen([sys.executable, "-m", "rmlib", "backfill", str(slow_file)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    if job.poll() is not None:
        pytest.skip(f"the command finished within {delay} s")
    job.send_signal(signal.SIGINT)
    _, err = job.communicate(timeout=120)
    # interrupted (or, if the signal came as it was exiting, finished): never a traceback
    assert (job.returncode, err.strip()) in ((130, "rmlib: interrupted"), (0, ""))


@pytest.mark.slow  # a process of its own
def test_a_closed_pipe_is_a_quiet_exit_that_still_writes_the_results(slow_file, tmp_path):
    """`rmlib backfill ... | head -1`: the reader leaves; the --json file is still written."""
    out = tmp_path / "out.json"
    job = subprocess.Popen([sys.executable, "-m", "rmlib", "backfill", str(slow_file),
                            "--json", str(out)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    job.stdout.close()  # the reader is gone before the first line
    err = job.stderr.read().decode()
    assert job.wait(timeout=300) == 0, err
    assert err == "" and json.loads(out.read_text())["auc_mAP"] > 0
    out.unlink()  # `... 2>&1 | head`: the error stream goes into the same closed pipe
    job = subprocess.Popen([sys.executable, "-m", "rmlib", "backfill", str(slow_file),
                            "--json", str(out)], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
    job.stdout.close()
    assert job.wait(timeout=300) == 0 and json.loads(out.read_text())["auc_mAP"] > 0


def test_backfill_centres_each_system_on_a_training_file(loo_file, tmp_path, capsys):
    """--centre TRAIN_EMB.npz: each system moved by its own mean over the training file and
    re-normalised, as rmlib.evaluation.systems.centred does; wrong widths are one line."""
    import json

    from rmlib.evaluation.backfill import backfill_arrays
    from rmlib.evaluation.emb_file import load_backfill_arrays
    from rmlib.evaluation.systems import centred

    path, a = loo_file
    train = write(tmp_path / "train.npz", old_query=a["og"] + 1.0, old_gallery=a["og"] + 1.0,
                  new_query=a["ng"] - 2.0, new_gallery=a["ng"] - 2.0, query_labels=a["qlab"])
    out = tmp_path / "centred.json"
    assert main(["backfill", str(path), "--centre", str(train), "--json", str(out)]) == 0
    written = json.loads(out.read_text())
    expected, _ = backfill_arrays(centred(load_backfill_arrays(path), (a["og"] + 1).mean(0),
                                          (a["ng"] - 2).mean(0)))
    assert written["auc_mAP"] == pytest.approx(expected.auc("mAP"), abs=1e-6)
    assert written["provenance"]["config"]["centred_on"] == str(train)
    narrow = write(tmp_path / "narrow.npz", old_query=a["og"][:, :4], old_gallery=a["og"][:, :4],
                   new_query=a["ng"], new_gallery=a["ng"], query_labels=a["qlab"])
    capsys.readouterr()
    assert main(["backfill", str(path), "--centre", str(narrow)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the old system's centre has shape (4,)" in err
    # fit's TRAIN.npz (old, new, labels) gives the same centres as the EMB-format file
    fit_format = write(tmp_path / "fit_train.npz", old=a["og"] + 1.0, new=a["ng"] - 2.0,
                       labels=a["qlab"])
    again = tmp_path / "again.json"
    assert main(["backfill", str(path), "--centre", str(fit_format), "--json", str(again)]) == 0
    assert json.loads(again.read_text())["auc_mAP"] == written["auc_mAP"]
    # a learned order learns on the systems it orders: --order-train centred the same way
    from rmlib.evaluation.emb_file import centred_on
    from rmlib.evaluation.orders import policy_order

    learned = tmp_path / "learned.json"
    assert main(["backfill", str(path), "--centre", str(train), "--order", "uncertainty",
                 "--order-train", str(train), "--json", str(learned)]) == 0
    moved, moved_train = (centred_on(load_backfill_arrays(p), train) for p in (path, train))
    expected, _ = backfill_arrays(moved, order=policy_order("uncertainty", moved, 0, moved_train))
    assert json.loads(learned.read_text())["auc_mAP"] == pytest.approx(expected.auc("mAP"),
                                                                       abs=1e-9)
    broken = write(tmp_path / "broken.npz", old=a["og"], new=a["ng"][:, :0], labels=a["qlab"])
    for bad, message in ((broken, "new has width 0"), (tmp_path / "nothing.npz", "does not exist")):
        assert main(["backfill", str(path), "--centre", str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
