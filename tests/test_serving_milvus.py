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
from rmlib.serving.index import OnlineBackfillIndex, float32_tolerance  # noqa: E402
from rmlib.serving.journal import BackfillJournal  # noqa: E402
from tests import backfill_worker as worker  # noqa: E402

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
    from tests.conftest import real_data_root

    root = real_data_root()
    if root is None:
        pytest.skip("real CIFAR-100 not available (set RMLIB_DATA)")
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
