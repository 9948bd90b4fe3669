"""The live index in Milvus (Milvus Lite files): the same answers as faiss, a journal that
survives a killed process, and searches that never see a moving item twice."""

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pymilvus")

import rmlib.serving.parts as parts  # noqa: E402
from rmlib import RmlibError  # noqa: E402
from rmlib.evaluation.backfill import backfill_order, backfilled_count  # noqa: E402
from rmlib.serving.index import (  # noqa: E402
    OnlineBackfillIndex,
    creation_state,
    float32_tolerance,
)
from rmlib.serving.journal import BackfillJournal  # noqa: E402


def _load_worker():
    """scripts/backfill_worker.py, the job the serving chapter kills too (not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "scripts" / "backfill_worker.py"
    spec = importlib.util.spec_from_file_location("backfill_worker", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _load_worker()
WORKER = Path(worker.__file__)


def data(n=600, q=20, d_old=8, d_new=12, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d_old)).astype("f4"), rng.normal(size=(n, d_new)).astype("f4"),
            rng.normal(size=(q, d_old)).astype("f4"), rng.normal(size=(q, d_new)).astype("f4"))


@pytest.fixture
def milvus_index(tmp_path):
    """A factory of Milvus-backed indexes in this test's folder, closed at the end."""
    made = []

    def make(*args, **kwargs):
        kwargs.setdefault("uri", str(tmp_path / "gallery.db"))
        index = OnlineBackfillIndex(*args, backend="milvus", **kwargs)
        made.append(index)
        return index
    yield make
    for index in made:
        index.close()


def backfill_to(indexes, new_g, order, t, batch=150):
    n = len(order)
    while indexes[0].num_new < backfilled_count(t, n):
        ids = indexes[0].next_batch(order, min(batch, backfilled_count(t, n) - indexes[0].num_new))
        for index in indexes:
            index.backfill(ids, new_g[ids])


def assert_same_results(a, b):
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.parts, b.parts)
    np.testing.assert_allclose(a.distances, b.distances, rtol=1e-5, atol=1e-6)


def test_milvus_serves_what_faiss_serves(milvus_index):
    old_g, new_g, old_q, new_q = data()
    faiss_index = OnlineBackfillIndex(old_g, new_dim=12)
    milvus = milvus_index(old_g, new_dim=12)
    order = backfill_order(len(old_g), seed=1)
    for t in (0.0, 0.3, 0.75, 1.0):
        backfill_to([faiss_index, milvus], new_g, order, t)
        assert milvus.num_new == faiss_index.num_new
        assert_same_results(milvus.search(new_q, old_q, k=25),
                            faiss_index.search(new_q, old_q, k=25))
    milvus.backfill(order[:5], new_g[order[:5]] + 1.0)  # re-embedding items already new
    faiss_index.backfill(order[:5], new_g[order[:5]] + 1.0)
    assert milvus.stored() == {"old": 0, "new": len(old_g)}
    assert_same_results(milvus.search(new_q, old_q, k=25), faiss_index.search(new_q, old_q, k=25))


def test_a_large_batch_moves_in_journaled_steps(milvus_index, monkeypatch):
    """A batch larger than Milvus's step moves step by step, each written ahead."""
    monkeypatch.setattr(parts.MilvusParts, "max_batch", 30)
    begun = []
    begin = BackfillJournal.begin
    monkeypatch.setattr(BackfillJournal, "begin",
                        lambda self, ids: (begun.append(len(ids)), begin(self, ids))[1])
    old_g, new_g, old_q, new_q = data(n=200)
    milvus = milvus_index(old_g, new_dim=12)
    faiss_index = OnlineBackfillIndex(old_g, new_dim=12)
    batch = backfill_order(200, seed=4)[:100]
    for index in (milvus, faiss_index):
        index.backfill(batch, new_g[batch])
    assert begun == [30, 30, 30, 10]
    assert milvus.num_new == 100 and milvus.stored() == {"old": 100, "new": 100}
    assert_same_results(milvus.search(new_q, old_q, k=30), faiss_index.search(new_q, old_q, k=30))


@pytest.fixture(scope="module")
def cifar_rm_systems(tmp_path_factory):
    """The RM systems of the smoke profile on real CIFAR-100 (psi(rho(q)) and rho)."""
    from rmlib.config import Config
    from rmlib.methods.experiment import Experiment
    from rmlib.methods.registry import METHODS
    from tests.conftest import NO_DATA, real_data_root

    root = real_data_root()
    if root is None:
        pytest.skip(NO_DATA)
    tmp = tmp_path_factory.mktemp("rm")
    config = Config.from_env("smoke").with_paths(runs=tmp / "runs", results=tmp / "results",
                                                  data=root)
    return METHODS["RM"].systems(Experiment("cifar100", config, progress=False), 0)


def test_milvus_merged_top_k_equals_faiss_on_cifar100_rm_embeddings(cifar_rm_systems,
                                                                     milvus_index):
    rm = cifar_rm_systems
    faiss_index = OnlineBackfillIndex(rm.old_gallery, new_dim=rm.new_gallery.shape[1])
    milvus = milvus_index(rm.old_gallery, new_dim=rm.new_gallery.shape[1])
    order = backfill_order(len(rm.old_gallery), seed=0)
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        backfill_to([faiss_index, milvus], rm.new_gallery, order, t)
        got = milvus.search(rm.new_query, rm.old_query, k=20)
        want = faiss_index.search(rm.new_query, rm.old_query, k=20)
        tol = float32_tolerance(rm.old_gallery, rm.new_gallery, rm.old_query, rm.new_query)
        # the same ranking up to float32 ties (the smoke model's new embeddings lie so
        # close together that a third of the queries swap such ties; cpu-profile
        # embeddings swap in 1-2 of 10,000 queries, in the serving chapter)
        assert got.agrees_with(want, tol).all()


# --- crash safety ----------------------------------------------------------------------------

def run_worker(db: Path, stage: str, resume: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, str(WORKER), str(db), stage] + (["--resume"] if resume else [])
    env = os.environ | {"PYTHONPATH": str(WORKER.parents[1])}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env, start_new_session=True)


def wait_for(process: subprocess.Popen, marker: str, timeout: float = 120) -> None:
    timer = threading.Timer(timeout, process.kill)
    timer.start()
    try:
        for line in process.stdout:
            if line.strip() == marker:
                return
    finally:
        timer.cancel()
    raise AssertionError(f"the worker ended (rc {process.wait()}) without printing {marker}")


def kill(process: subprocess.Popen) -> None:
    """SIGKILL the worker and everything it started (Milvus Lite's server process too)."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def check_every_item_once(index: OnlineBackfillIndex) -> tuple[np.ndarray, np.ndarray]:
    old, new = index._parts.ids("old"), index._parts.ids("new")
    assert len(np.intersect1d(old, new)) == 0, "an item is in both parts"
    np.testing.assert_array_equal(np.sort(np.concatenate([old, new])), np.arange(worker.GALLERY))
    np.testing.assert_array_equal(np.flatnonzero(index.part_of(np.arange(worker.GALLERY))),
                                  np.sort(new))
    return old, new


@pytest.mark.parametrize("stage, moved, insert_done", [
    ("begun", 0, False), ("insert", 40, False), ("inserted", 100, True),
    ("delete", 100, True), ("deleted", 100, True), ("upsert", 0, False)])
def test_a_backfill_killed_mid_batch_resumes_with_every_item_in_exactly_one_part(
        tmp_path, stage, moved, insert_done):
    db = tmp_path / "gallery.db"
    process = run_worker(db, stage)
    wait_for(process, "PAUSED")
    kill(process)  # in the second batch of 100, at `stage`
    pending = BackfillJournal(f"{db}.gallery.journal").pending()
    assert pending is not None and len(pending[0]) == worker.BATCH
    assert pending[1] == insert_done  # the journal knows whether the insert finished

    index = OnlineBackfillIndex.reopen(str(db))
    try:
        old, new = check_every_item_once(index)
        assert len(new) == worker.BATCH + moved  # what reached the new part stays there
        assert BackfillJournal(f"{db}.gallery.journal").pending() is None
        old_g, new_g, order = worker.systems()
        if stage == "upsert":  # the first request of the re-embedding reached the database
            new_g[order[:40]] += 1.0
        # what it serves now is what faiss serves with the same items in each part
        reference = OnlineBackfillIndex(old_g, worker.NEW_DIM)
        reference.backfill(np.sort(new), new_g[np.sort(new)])
        q_old, q_new = old_g[:30] + 0.1, new_g[:30] + 0.1
        full = index.search(q_new, q_old, k=worker.GALLERY)
        assert all(sorted(row) == list(range(worker.GALLERY)) for row in full.ids.tolist())
        assert_same_results(index.search(q_new, q_old, k=20), reference.search(q_new, q_old, k=20))
    finally:
        index.close()

    process = run_worker(db, "none", resume=True)  # the job, restarted, finishes the backfill
    wait_for(process, "DONE")
    assert process.wait(timeout=60) == 0
    index = OnlineBackfillIndex.reopen(str(db))
    try:
        old, new = check_every_item_once(index)
        assert len(new) == worker.GALLERY and index.ratio == 1.0
        full_new = OnlineBackfillIndex(worker.systems()[0], worker.NEW_DIM)
        full_new.backfill(np.arange(worker.GALLERY), new_g)
        q = worker.systems()[1][:30] + 0.1
        assert_same_results(index.search(q, q[:, :worker.OLD_DIM], k=20),
                            full_new.search(q, q[:, :worker.OLD_DIM], k=20))
    finally:
        index.close()


# --- searches during a batch -------------------------------------------------------------

@pytest.mark.parametrize("backend", ["faiss", "milvus"])
def test_a_search_in_the_middle_of_a_batch_sees_every_item_once(backend, tmp_path, monkeypatch):
    """A search between any two writes of a batch (for Milvus: between any two of its
    requests) ranks every gallery item exactly once."""
    old_g, new_g, old_q, new_q = data(n=300)
    kwargs = {"backend": backend, "uri": str(tmp_path / "g.db")} if backend == "milvus" else {}
    monkeypatch.setattr(parts, "MILVUS_REQUEST_ROWS", 20)
    index = OnlineBackfillIndex(old_g, new_dim=12, **kwargs)
    seen = []

    def search_everything():
        ids = index.search(new_q, old_q, k=300).ids
        seen.append(index._insert_done)
        assert all(sorted(row) == list(range(300)) for row in ids.tolist())

    target = index._parts._client if backend == "milvus" else index._parts
    for method in ("insert", "upsert", "delete") if backend == "milvus" else ("put", "delete"):
        original = getattr(target, method)

        def request(*args, _original=original, **kwargs):
            out = _original(*args, **kwargs)
            search_everything()
            return out
        monkeypatch.setattr(target, method, request)
    order = backfill_order(300, seed=2)
    index.backfill(order[:50], new_g[order[:50]])
    index.backfill(order[20:120], new_g[order[20:120]])  # some moving, some re-embedded
    assert False in seen and True in seen  # searched before and after the insert completed
    assert index.num_new == 120
    index.close()


def test_searches_from_another_thread_never_see_an_item_twice(milvus_index, monkeypatch):
    monkeypatch.setattr(parts, "MILVUS_REQUEST_ROWS", 25)
    old_g, new_g, old_q, new_q = data(n=400)
    index = milvus_index(old_g, new_dim=12)
    stop, errors, searches = threading.Event(), [], [0]

    def searcher():
        while not stop.is_set():
            ids = index.search(new_q, old_q, k=400).ids
            searches[0] += 1
            if not all(len(set(row)) == 400 for row in ids.tolist()):
                errors.append(ids)

    thread = threading.Thread(target=searcher)
    thread.start()
    try:
        backfill_to([index], new_g, backfill_order(400, seed=3), 1.0, batch=60)
    finally:
        stop.set()
        thread.join()
    assert not errors and searches[0] > 3


# --- refusals ----------------------------------------------------------------------------------

def test_an_existing_index_is_never_overwritten_by_accident(milvus_index, tmp_path):
    old_g, new_g, _, _ = data(n=50)
    first = milvus_index(old_g, new_dim=12)
    first.backfill(np.arange(10), new_g[:10])
    first.close()
    with pytest.raises(RmlibError, match="already holds a live index named 'gallery'.*reopen"):
        milvus_index(old_g, new_dim=12)
    again = OnlineBackfillIndex.reopen(str(tmp_path / "gallery.db"))
    assert again.num_new == 10
    again.close()
    fresh = milvus_index(old_g, new_dim=12, overwrite=True)
    assert fresh.num_new == 0 and fresh.stored() == {"old": 50, "new": 0}


def test_reopen_refuses_a_missing_malformed_or_unfinished_journal(tmp_path, milvus_index):
    db = str(tmp_path / "gallery.db")
    with pytest.raises(RmlibError, match="no backfill journal"):
        OnlineBackfillIndex.reopen(db)
    index = milvus_index(data(n=30)[0], new_dim=12)
    index.close()
    journal = Path(f"{db}.gallery.journal")
    header = json.loads(journal.read_text().splitlines()[0])
    journal.write_text(json.dumps(header | {"complete": False}) + "\n")
    with pytest.raises(RmlibError, match="did not finish.*overwrite=True"):
        OnlineBackfillIndex.reopen(db)
    journal.write_text("{not json\n")
    with pytest.raises(RmlibError, match="not a backfill journal"):
        OnlineBackfillIndex.reopen(db)
    with pytest.raises(RmlibError, match="needs journal=PATH"):
        OnlineBackfillIndex(data(n=30)[0], 12, backend="milvus", uri="http://localhost:1")
    with pytest.raises(RmlibError, match="unknown backend"):
        OnlineBackfillIndex(data(n=30)[0], 12, backend="annoy")


def test_a_failed_request_stops_the_index_until_reopen_finishes_the_batch(milvus_index, tmp_path,
                                                                           monkeypatch):
    old_g, new_g, old_q, new_q = data(n=80)
    index = milvus_index(old_g, new_dim=12)
    client = index._parts._client

    def lost_connection(*args, **kwargs):
        raise ConnectionError("connection reset")
    monkeypatch.setattr(client, "delete", lost_connection)
    with pytest.raises(RmlibError, match="interrupted.*close this index.*reopen"):
        index.backfill(np.arange(10), new_g[:10])
    with pytest.raises(RmlibError, match="interrupted.*close this index.*reopen"):
        index.backfill(np.arange(10, 20), new_g[10:20])
    monkeypatch.undo()
    index.close()
    again = OnlineBackfillIndex.reopen(str(tmp_path / "gallery.db"))
    assert again.num_new == 10 and again.stored() == {"old": 70, "new": 10}
    again.close()


def test_milvus_refuses_more_results_than_it_can_return(milvus_index, monkeypatch):
    old_g, new_g, old_q, new_q = data(n=40)
    index = milvus_index(old_g, new_dim=12)
    monkeypatch.setattr(parts.MilvusParts, "max_top_k", 30)
    with pytest.raises(RmlibError, match="at most 30 results per query.*not k=35"):
        index.search(new_q, old_q, k=35)
    monkeypatch.setattr(parts, "MILVUS_MAX_TOP_K", 30)
    with pytest.raises(RmlibError, match="at most 30 results per query, 34 were asked"):
        index._parts.search("old", old_q, 34)


# --- the command line ---------------------------------------------------------------------

def test_the_live_command_resumes_and_serves_the_evaluators_curve(tmp_path, capsys):
    import re

    from rmlib.cli import main
    from rmlib.evaluation.backfill import simulate_backfill
    from rmlib.evaluation.retrieval import Protocol

    rng = np.random.default_rng(7)
    labels = rng.integers(0, 6, 240)
    old = (rng.normal(size=(6, 8))[labels] + rng.normal(size=(240, 8))).astype("f4")
    new = (rng.normal(size=(6, 12))[labels] + 0.6 * rng.normal(size=(240, 12))).astype("f4")
    emb = tmp_path / "emb.npz"
    np.savez(emb, old_query=old, old_gallery=old, new_query=new, new_gallery=new,
             query_labels=labels)
    live = ["live", str(emb), "--uri", str(tmp_path / "g.db"), "--batch", "25", "--quiet"]
    assert main(live + ["--until", "0.3"]) == 0
    assert "created the live index" in capsys.readouterr().out
    assert main(live + ["--until", "0.6"]) == 0  # a second run resumes where the first ended
    out = capsys.readouterr().out
    assert "resumed the live index 'gallery'" in out and "t = 0.300" in out
    assert "t = 0.600: 96 items in the old part, 144 in the new part" in out
    served = float(re.search(r"served now: mAP (\S+)", out).group(1))
    curve = simulate_backfill(old, old, new, new, Protocol.leave_one_out(labels),
                              order=backfill_order(240, 0), ts=np.array([0.6]))
    assert served == pytest.approx(100 * curve.mAP[0], abs=0.006)

    np.savez(tmp_path / "other.npz", old_query=old[:100], old_gallery=old[:100],
             new_query=new[:100], new_gallery=new[:100], query_labels=labels[:100])
    assert main(["live", str(tmp_path / "other.npz"), "--uri", str(tmp_path / "g.db")]) == 2
    assert "holds another gallery" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(live + ["--until", "1.5"])
    assert usage.value.code == 2 and "more than 1" in capsys.readouterr().err


def test_a_stage_change_waits_for_searches_in_flight_and_new_searches_wait_for_it():
    """The gate, deterministically: a batch cannot change which part serves its moving
    items while a search is in flight, and a search that arrives while the batch waits
    goes after it (so a stream of searches cannot stall the backfill)."""
    old_g, new_g, old_q, new_q = data(n=60)
    index = OnlineBackfillIndex(old_g, new_dim=12)
    inside, release, searched = threading.Event(), threading.Event(), []
    search = index._parts.search

    def held_search(part, queries, k):
        if not inside.is_set():
            inside.set()
            release.wait(10)
        searched.append(part)
        return search(part, queries, k)
    index._parts.search = held_search
    first = threading.Thread(target=index.search, args=(new_q, old_q, 5))
    first.start()
    assert inside.wait(10)
    batch = threading.Thread(target=index.backfill, args=(np.arange(10), new_g[:10]))
    batch.start()
    batch.join(0.3)
    assert batch.is_alive() and len(index._moving) == 0  # waiting: nothing changed yet
    late = threading.Thread(target=index.search, args=(new_q, old_q, 5))
    late.start()
    late.join(0.3)
    assert late.is_alive() and searched == []  # the late search waits behind the batch
    release.set()
    for thread in (first, batch, late):
        thread.join(10)
    assert index.num_new == 10 and len(searched) >= 2


def test_reopen_keeps_the_new_entry_of_an_item_found_in_both_parts(milvus_index, tmp_path):
    """An insert applied after its sender died (on a Milvus server) leaves an item in both
    parts with no batch in the journal; reopen keeps its new entry."""
    old_g, new_g, _, _ = data(n=50)
    index = milvus_index(old_g, new_dim=12)
    index._parts.put("new", np.array([3, 4]), new_g[[3, 4]], replace=False)  # behind its back
    index.close()
    again = OnlineBackfillIndex.reopen(str(tmp_path / "gallery.db"))
    assert again.part_of(np.array([3, 4, 5])).tolist() == [1, 1, 0]
    assert again.stored() == {"old": 48, "new": 2}
    again.close()


def test_a_second_process_cannot_open_an_index_that_is_open(milvus_index, tmp_path):
    old_g, _, _, _ = data(n=20)
    milvus_index(old_g, new_dim=12)  # open, holding the journal's lock
    code = (f"from rmlib.serving.index import OnlineBackfillIndex\n"
            f"OnlineBackfillIndex.reopen({str(tmp_path / 'gallery.db')!r})\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": str(WORKER.parents[1])}, timeout=120)
    assert done.returncode != 0 and "another process has this live index open" in done.stderr


def test_a_creation_killed_midway_is_created_again(tmp_path):
    db = tmp_path / "gallery.db"
    process = run_worker(db, "create")
    wait_for(process, "PAUSED")
    kill(process)
    with pytest.raises(RmlibError, match="did not finish"):
        OnlineBackfillIndex.reopen(str(db))
    process = run_worker(db, "none", resume=True)  # resuming creates it again, then backfills
    wait_for(process, "DONE")
    assert process.wait(timeout=60) == 0
    index = OnlineBackfillIndex.reopen(str(db))
    try:
        old, new = check_every_item_once(index)
        assert len(new) == worker.GALLERY
    finally:
        index.close()


def test_a_failed_insert_leaves_the_batch_whole_in_the_old_part(milvus_index, tmp_path,
                                                                monkeypatch):
    old_g, new_g, _, _ = data(n=80)
    index = milvus_index(old_g, new_dim=12)

    def refused(*args, **kwargs):
        raise ConnectionError("connection reset")
    monkeypatch.setattr(index._parts._client, "insert", refused)
    with pytest.raises(RmlibError, match="interrupted.*close this index.*reopen"):
        index.backfill(np.arange(10), new_g[:10])
    monkeypatch.undo()
    index.close()
    again = OnlineBackfillIndex.reopen(str(tmp_path / "gallery.db"))
    assert again.num_new == 0 and again.stored() == {"old": 80, "new": 0}
    again.close()


def test_the_live_command_killed_at_any_moment_resumes_to_the_end(tmp_path):
    rng = np.random.default_rng(9)
    n = 3000
    labels = rng.integers(0, 30, n)
    old = (rng.normal(size=(30, 8))[labels] + rng.normal(size=(n, 8))).astype("f4")
    new = (rng.normal(size=(30, 12))[labels] + 0.6 * rng.normal(size=(n, 12))).astype("f4")
    emb = tmp_path / "emb.npz"
    np.savez(emb, old_query=old, old_gallery=old, new_query=new, new_gallery=new,
             query_labels=labels)
    db = tmp_path / "g.db"
    cmd = [sys.executable, "-m", "rmlib", "live", str(emb), "--uri", str(db), "--batch", "15",
           "--quiet"]
    env = os.environ | {"PYTHONPATH": str(WORKER.parents[1])}
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                           env=env, start_new_session=True)
    wait_for(job, f"created the live index 'gallery' at {db}: {n:,} items in the old part")
    threading.Event().wait(1.5)  # somewhere in the middle of the backfill
    kill(job)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed the live index" in done.stdout and "t = 1.000" in done.stdout
    index = OnlineBackfillIndex.reopen(str(db))
    try:
        assert index.stored() == {"old": 0, "new": n} and index.ratio == 1.0
    finally:
        index.close()


def test_agreement_allows_swaps_of_float_ties_only():
    from rmlib.serving.index import SearchResult

    def result(d, ids):
        d, ids = np.array([d], dtype="f4"), np.array([ids])
        return SearchResult(d, ids, np.zeros_like(ids))
    tol = float32_tolerance(np.ones((3, 4)) / 10)  # squared norms 0.04
    assert tol == pytest.approx(4e-7)
    base = result([0.0, 0.5, 0.5000001, 0.9], [1, 2, 3, 4])
    assert base.agrees_with(result([0.0003, 0.5000001, 0.5, 0.9], [1, 3, 2, 4]), tol).all()
    assert not base.agrees_with(result([0.0, 0.5, 0.52, 0.9], [1, 3, 2, 4]), tol).any()
    assert not base.agrees_with(result([0.0, 0.5, 0.5000001, np.inf], [1, 2, 3, -1]), tol).any()


# --- the live command's refusals: one line, exit 2, nothing left behind ---------------------

HEADER = {"journal": 1, "name": "gallery", "num_items": 40, "id_sum": 780, "old_dim": 8,
          "new_dim": 12, "complete": True}


def save_emb(path: Path, n: int = 40, d_old: int = 8, d_new: int = 12, seed: int = 0) -> Path:
    """A small EMB.npz: n items of 4 classes, scored leave-one-out."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    old = (rng.normal(size=(4, d_old))[labels] + rng.normal(size=(n, d_old))).astype("f4")
    new = (rng.normal(size=(4, d_new))[labels] + 0.5 * rng.normal(size=(n, d_new))).astype("f4")
    np.savez(path, old_query=old, old_gallery=old, new_query=new, new_gallery=new,
             query_labels=labels)
    return path


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def journal_of(*records):
    """A setup that leaves a journal of these records where `live --uri g.db` looks."""
    def setup(tmp: Path) -> list[str]:
        (tmp / "g.db.gallery.journal").write_text("".join(json.dumps(r) + "\n" for r in records))
        return []
    return setup


def read_only_folder(tmp: Path) -> list[str]:
    (tmp / "ro").mkdir(mode=0o555)
    return ["--uri", str(tmp / "ro" / "g.db")]


def _deny_writes_in(folder: Path, monkeypatch) -> None:
    """The probe of `folder` fails as it does for a user without write permission."""
    import errno
    import tempfile

    from rmlib.serving import location

    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == folder:
            raise PermissionError(errno.EACCES, "Permission denied", str(folder))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(location.tempfile, "mkstemp", mkstemp)


def a_file_as_folder(tmp: Path) -> list[str]:
    (tmp / "file.txt").write_text("not a folder")
    return ["--uri", str(tmp / "file.txt" / "g.db")]


def width(d_old: int, d_new: int):
    def setup(tmp: Path) -> list[str]:
        save_emb(tmp / "emb.npz", n=6, d_old=d_old, d_new=d_new)
        return []
    return setup


BAD_LIVE = [
    pytest.param(journal_of({"begin": "abc"}), "no version-1 header", id="journal-batch-only"),
    pytest.param(journal_of([1, 2]), "every line must be a JSON object", id="journal-list"),
    pytest.param(journal_of([]), "every line must be a JSON object", id="journal-header-[]"),
    pytest.param(journal_of({"journal": 1, "name": "gallery"}), "'num_items' is not",
                 id="journal-header-missing-keys"),
    pytest.param(journal_of(HEADER | {"old_dim": "8"}), "'old_dim' is not of type int",
                 id="journal-header-wrong-type"),
    pytest.param(journal_of(HEADER, {"begin": ["a", 1.5]}), "'begin' is not a list of ids",
                 id="journal-begin-not-ids"),
    pytest.param(lambda tmp: ["--uri", "/proc/g.db"], "cannot write in /proc", id="uri-in-proc"),
    pytest.param(a_file_as_folder, "does not exist or is not a folder", id="uri-under-a-file"),
    pytest.param(lambda tmp: ["--uri", str(tmp / "missing" / "g.db")], "does not exist",
                 id="uri-in-a-missing-folder"),
    pytest.param(read_only_folder, "cannot write in", id="uri-in-a-read-only-folder"),
    pytest.param(lambda tmp: ["--uri", str(tmp / "g.sqlite")], "neither a Milvus Lite file",
                 id="uri-not-db"),
    pytest.param(lambda tmp: ["--journal", str(tmp)], "is a folder", id="journal-a-folder"),
    pytest.param(lambda tmp: ["--name", "my-gallery"], "cannot name a live index", id="name-dash"),
    pytest.param(lambda tmp: ["--name", ""], "cannot name a live index", id="name-empty"),
    pytest.param(lambda tmp: ["--name", "g" * 252], "cannot name a live index", id="name-252"),
    pytest.param(lambda tmp: ["--name", "1st"], "cannot name a live index", id="name-digit"),
    pytest.param(width(1, 12), "old embeddings have 1", id="width-1"),
    pytest.param(width(8, 40_000), "new embeddings have 40000", id="width-40000"),
]


@pytest.mark.parametrize("setup, message", BAD_LIVE)
def test_the_live_command_refuses_bad_input_in_one_line_and_leaves_nothing(tmp_path, capsys,
                                                                           setup, message,
                                                                           monkeypatch):
    from rmlib.cli import main

    emb = save_emb(tmp_path / "emb.npz")
    extra = setup(tmp_path)
    if (tmp_path / "ro").exists() and os.geteuid() == 0:  # root writes in a 0o555 folder:
        _deny_writes_in(tmp_path / "ro", monkeypatch)    # deny it as the kernel would
    before = files(tmp_path)
    try:
        rc = main(["live", str(emb), "--uri", str(tmp_path / "g.db"), "--quiet", *extra])
    finally:
        if (tmp_path / "ro").exists():
            (tmp_path / "ro").chmod(0o755)
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.startswith("rmlib: error: ") and err.count("\n") == 1 and message in err, err
    assert files(tmp_path) == before  # no lock, .tmp, journal or Milvus Lite file


def test_the_live_command_resumes_only_from_its_own_file_and_order(tmp_path, capsys):
    from rmlib.cli import main

    a, b = save_emb(tmp_path / "a.npz"), save_emb(tmp_path / "b.npz", seed=1)  # one shape
    db = tmp_path / "g.db"

    def live(emb: Path, *extra: str) -> int:
        return main(["live", str(emb), "--uri", str(db), "--quiet", *extra])

    assert live(a, "--until", "0.5") == 0
    capsys.readouterr()
    before = files(tmp_path)
    assert live(b, "--until", "0.8") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds another gallery than" in err
    assert str(a) in err and str(b) in err and "--overwrite" in err and "--name" in err
    assert live(a, "--until", "0.8", "--seed", "1") == 2
    err = capsys.readouterr().err
    assert "another order (--order random --seed 0) than --order random --seed 1" in err
    assert files(tmp_path) == before
    assert live(a, "--until", "0.8", "--batch", "7") == 0  # the same file resumes
    out = capsys.readouterr().out
    assert "resumed the live index 'gallery'" in out and "t = 0.500" in out
    assert "t = 0.800: 8 items in the old part, 32 in the new part" in out
    index = OnlineBackfillIndex.reopen(str(db))
    assert index.meta["source"] == str(a) and index.meta["order"] == "random"
    assert (index.meta["seed"], index.meta["batch"]) == (0, 10_000)  # as created
    index.close()

    journal = Path(f"{db}.gallery.journal")  # as an older rmlib wrote it: no record
    header = json.loads(journal.read_text())
    journal.write_text(json.dumps({k: v for k, v in header.items() if k != "meta"}) + "\n")
    assert live(a) == 2
    err = capsys.readouterr().err
    assert "does not record which file it was built from" in err and "--overwrite" in err
    assert live(b, "--overwrite", "--until", "0.25") == 0
    assert "created the live index" in capsys.readouterr().out



def test_a_resume_continues_in_the_stored_order_without_making_it_again(tmp_path):
    """A learned order is made once, kept beside the journal, and read back on resume (a
    second training might differ in the last bits on another BLAS); a damaged copy is made
    again and checked against the journal's hash."""
    from rmlib.serving.live import order_path, run_live

    emb, db = save_emb(tmp_path / "a.npz"), tmp_path / "g.db"
    made = []

    def learned(arrays):
        made.append(len(arrays.old_gallery))
        return np.random.default_rng(5).permutation(len(arrays.old_gallery))

    def live(order_for, until):
        return run_live(emb, order_for, uri=str(db), name="gallery", journal=None, batch=10,
                        until=until, seed=0, order_name="learned", overwrite=False, quiet=True)

    assert live(learned, 0.5) == 0 and made == [40]
    stored = order_path(Path(f"{db}.gallery.journal"))
    np.testing.assert_array_equal(np.load(stored), np.random.default_rng(5).permutation(40))
    assert live(lambda arrays: pytest.fail("the order was made again"), 0.75) == 0
    index = OnlineBackfillIndex.reopen(str(db))
    first = np.load(stored)[:30]  # 0.75 of 40 items, in the stored order
    assert index.num_new == 30 and index.part_of(first).all()
    index.close()
    stored.write_bytes(b"not an array")
    assert live(learned, 1.0) == 0 and made == [40, 40]  # made again, the same: accepted
    stored.write_bytes(b"not an array")
    with pytest.raises(RmlibError, match="is backfilled in another order"):
        live(lambda arrays: np.arange(40), 1.0)
    stored.unlink()  # a journal from before the order was kept: written on the next resume
    assert live(learned, 1.0) == 0 and stored.is_file()


def test_a_resume_with_a_changed_order_file_is_refused_not_continued(tmp_path, capsys):
    from rmlib.cli import main

    emb, db = save_emb(tmp_path / "a.npz"), tmp_path / "g.db"
    order = tmp_path / "order.npy"
    np.save(order, np.arange(40)[::-1])
    live = ["live", str(emb), "--uri", str(db), "--order", str(order), "--quiet"]
    assert main(live + ["--until", "0.5"]) == 0
    np.save(order, np.arange(40))  # the same path, another order
    capsys.readouterr()
    assert main(live + ["--until", "0.8"]) == 2
    assert "is backfilled in another order" in capsys.readouterr().err

def test_milvus_refusals_in_python_leave_no_file(tmp_path):
    old_g, new_g, old_q, new_q = data(n=20)
    db = str(tmp_path / "g.db")
    for name in ("my-gallery", "", "9lives", "g" * 252, None):
        with pytest.raises(RmlibError, match="cannot name a live index"):
            OnlineBackfillIndex(old_g, 12, backend="milvus", uri=db, name=name)
        with pytest.raises(RmlibError, match="cannot name a live index"):
            OnlineBackfillIndex.reopen(db, name=name)
        with pytest.raises(RmlibError, match="cannot name a live index"):
            creation_state(db, name)
    with pytest.raises(RmlibError, match="old embeddings have 1"):
        OnlineBackfillIndex(old_g[:, :1], 12, backend="milvus", uri=db)
    with pytest.raises(RmlibError, match="new embeddings have 32769"):
        OnlineBackfillIndex(old_g, 32_769, backend="milvus", uri=db)
    with pytest.raises(RmlibError, match="is a folder"):
        OnlineBackfillIndex(old_g, 12, backend="milvus", uri=db, journal=tmp_path)
    with pytest.raises(RmlibError, match="longer than the 255 bytes"):  # g.db.ggg...g.journal
        OnlineBackfillIndex(old_g, 12, backend="milvus", uri=db, name="g" * 251)
    assert files(tmp_path) == []
    journal = tmp_path / "g.journal"
    index = OnlineBackfillIndex(old_g, 12, backend="milvus", uri=db, name="g" * 251,
                                journal=journal, meta={"from": "a test"})
    assert index.search(new_q, old_q, k=np.int64(3)).ids.shape == (20, 3)
    index.close()
    index.close()
    with pytest.raises(RmlibError, match="this index is closed; open it again with .*reopen"):
        index.search(new_q, old_q, k=3)
    with pytest.raises(RmlibError, match="this index is closed"):
        index.backfill(np.arange(2), new_g[:2])
    with pytest.raises(RmlibError, match="no milvus database file at"):
        OnlineBackfillIndex.reopen(str(tmp_path / "other.db"), name="g" * 251, journal=journal)
    again = OnlineBackfillIndex.reopen(db, name="g" * 251, journal=journal)
    assert again.meta == {"from": "a test"}
    again.close()
