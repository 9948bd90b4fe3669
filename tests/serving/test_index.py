import numpy as np
import pytest
import torch

from rmlib import RmlibError
from rmlib.evaluation.backfill import backfill_order, backfilled_count
from rmlib.evaluation.retrieval import euclidean_distances, rank_keys
from rmlib.serving.index import OnlineBackfillIndex


def data(n=400, q=30, d_old=8, d_new=12, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d_old)).astype("f4"), rng.normal(size=(n, d_new)).astype("f4"),
            rng.normal(size=(q, d_old)).astype("f4"), rng.normal(size=(q, d_new)).astype("f4"))


def offline_top_k(old_g, new_g, old_q, new_q, is_new, k):
    """The offline evaluator's merged ranking (rank keys), truncated to k."""
    d_old = euclidean_distances(torch.as_tensor(old_q), torch.as_tensor(old_g))
    d_new = euclidean_distances(torch.as_tensor(new_q), torch.as_tensor(new_g))
    merged = torch.where(torch.as_tensor(is_new)[None, :], d_new, d_old)
    return torch.argsort(rank_keys(merged), dim=1)[:, :k].numpy()


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_merged_top_k_equals_the_offline_ranking(t):
    old_g, new_g, old_q, new_q = data()
    n = len(old_g)
    index = OnlineBackfillIndex(old_g, new_dim=new_g.shape[1])
    order = backfill_order(n, seed=1)
    done = order[: backfilled_count(t, n)]
    for batch in np.array_split(done, 3):  # in several backfill batches
        if len(batch):
            index.backfill(batch, new_g[batch])
    is_new = np.zeros(n, bool)
    is_new[done] = True
    res = index.search(new_q, old_q, k=10)
    np.testing.assert_array_equal(res.ids, offline_top_k(old_g, new_g, old_q, new_q, is_new, 10))
    np.testing.assert_array_equal(res.parts, is_new[res.ids].astype(int))
    assert index.num_old + index.num_new == n and index.ratio == pytest.approx(len(done) / n)


def test_items_are_always_in_exactly_one_part_and_re_adds_replace():
    old_g, new_g, old_q, new_q = data(n=50)
    index = OnlineBackfillIndex(old_g, new_dim=12)
    index.backfill(np.array([3, 7]), new_g[[3, 7]])
    index.backfill(np.array([7]), new_g[[7]] * 0 + 100.0)  # re-embedding item 7
    assert index.num_new == 2 and index.num_old == 48
    assert index.part_of(np.array([3, 7, 8])).tolist() == [1, 1, 0]
    res = index.search(new_q, old_q, k=50)
    assert sorted(res.ids[0].tolist()) == list(range(50))  # every item once
    assert res.ids[0, -1] == 7  # its new embedding is far away now


def test_bad_batches_change_nothing():
    old_g, new_g, old_q, new_q = data(n=40)
    index = OnlineBackfillIndex(old_g, new_dim=12)
    before = index.search(new_q, old_q, k=5).ids
    with pytest.raises(RmlibError, match="unknown id"):
        index.backfill(np.array([1, 99]), new_g[:2])
    with pytest.raises(RmlibError, match="repeats an id"):
        index.backfill(np.array([1, 1]), new_g[:2])
    with pytest.raises(RmlibError, match="shape"):
        index.backfill(np.array([1]), new_g[:1, :5])
    with pytest.raises(RmlibError, match="NaN"):
        index.backfill(np.array([1]), new_g[:1] * np.nan)
    assert index.num_new == 0
    np.testing.assert_array_equal(index.search(new_q, old_q, k=5).ids, before)


def test_approximate_index_finds_most_exact_neighbours():
    old_g, new_g, old_q, new_q = data(n=3000, q=50, seed=2)
    exact = OnlineBackfillIndex(old_g, new_dim=12)
    approx = OnlineBackfillIndex(old_g, new_dim=12, approximate=True, nlist=32, nprobe=8,
                                 new_training_sample=new_g)
    half = np.arange(0, 3000, 2)
    for index in (exact, approx):
        index.backfill(half, new_g[half])
    e = exact.search(new_q, old_q, k=10).ids
    a = approx.search(new_q, old_q, k=10).ids
    recall = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(e, a, strict=True)])
    assert recall > 0.8


@pytest.mark.parametrize("protocol_name", ["leave_one_out", "camera"])
def test_live_scores_reproduce_the_offline_backfill_curve(protocol_name):
    """What the live index serves, scored over the whole merged ranking, is the evaluator's
    mAP and top-1 at the same backfill states."""
    from rmlib.evaluation.backfill import simulate_backfill
    from rmlib.evaluation.retrieval import Protocol
    from rmlib.serving.index import live_scores

    rng = np.random.default_rng(3)
    n, classes = 120, 8
    labels = rng.integers(0, classes, n)
    centres_old, centres_new = rng.normal(size=(classes, 8)), rng.normal(size=(classes, 12))
    old = (centres_old[labels] + rng.normal(size=(n, 8))).astype("f4")
    new = (centres_new[labels] + 0.7 * rng.normal(size=(n, 12))).astype("f4")
    if protocol_name == "camera":
        cams = rng.integers(0, 3, n)
        protocol = Protocol.camera(labels[:40], labels, cams[:40], cams)
        old_q, new_q = old[:40] + 0.1, new[:40] + 0.1
    else:
        protocol = Protocol.leave_one_out(labels)
        old_q, new_q = old, new
    order = backfill_order(n, seed=0)
    ts = np.array([0.0, 0.25, 0.5, 1.0])
    curve = simulate_backfill(old_q, old, new_q, new, protocol, order=order, ts=ts)
    index = OnlineBackfillIndex(old, new_dim=12)
    for j, t in enumerate(ts):
        done = order[: backfilled_count(t, n)]
        todo = done[index.num_new:]
        if len(todo):
            index.backfill(todo, new[todo])
        live = live_scores(index, new_q, old_q, protocol, chunk=16).summary()
        assert live["mAP"] == pytest.approx(curve.mAP[j], abs=1e-6)
        assert live["top1"] == pytest.approx(curve.top1[j], abs=1e-6)


def test_live_scores_refuse_a_protocol_of_another_gallery():
    from rmlib.evaluation.retrieval import Protocol
    from rmlib.serving.index import live_scores

    old_g, new_g, old_q, new_q = data(n=40)
    index = OnlineBackfillIndex(old_g, new_dim=12)
    with pytest.raises(RmlibError, match="gallery items"):
        live_scores(index, new_q, old_q, Protocol.leave_one_out(np.zeros(30, int)))


def test_a_policy_order_drives_the_live_backfill_and_matches_the_offline_curve():
    """The live index re-embeds the items an order policy puts first (next_batch), and
    what it serves is the evaluator's curve under that same order."""
    from rmlib.evaluation.backfill import simulate_backfill
    from rmlib.evaluation.orders import policy_order
    from rmlib.evaluation.systems import SystemPair
    from rmlib.serving.index import live_scores

    rng = np.random.default_rng(5)
    n, classes = 100, 5
    labels = rng.integers(0, classes, n)
    old = (rng.normal(size=(classes, 8))[labels] + rng.normal(size=(n, 8))).astype("f4")
    new = (rng.normal(size=(classes, 12))[labels] + 0.5 * rng.normal(size=(n, 12))).astype("f4")
    arrays = SystemPair(old, old, new, new, labels)
    order = policy_order("oracle", arrays)
    ts = np.array([0.0, 0.3, 0.6, 1.0])
    curve = simulate_backfill(old, old, new, new, arrays.protocol(), order=order, ts=ts)
    index = OnlineBackfillIndex(old, new_dim=12)
    for j, t in enumerate(ts):
        while index.num_new < backfilled_count(t, n):
            batch = index.next_batch(order, min(7, backfilled_count(t, n) - index.num_new))
            assert not index.part_of(batch).any()  # only items still in the old part
            index.backfill(batch, new[batch])
        assert sorted(np.flatnonzero(index.part_of(np.arange(n)))) == \
            sorted(order[: backfilled_count(t, n)].tolist())
        live = live_scores(index, new, old, arrays.protocol(), chunk=16).summary()
        assert live["mAP"] == pytest.approx(curve.mAP[j], abs=1e-6)
    with pytest.raises(RmlibError, match="every gallery id once"):
        index.next_batch(order[:-1], 5)


# --- refusals of the Python API: one line each, nothing changed --------------------------------

def test_counts_take_numpy_integers_and_refuse_other_types():
    old_g, new_g, old_q, new_q = data(n=40)
    index = OnlineBackfillIndex(old_g, new_dim=np.int64(12))
    np.testing.assert_array_equal(index.search(new_q, old_q, k=np.int64(3)).ids,
                                  index.search(new_q, old_q, k=3).ids)
    order = backfill_order(40, seed=0)
    np.testing.assert_array_equal(index.next_batch(order, np.int32(5)), order[:5])
    approx = OnlineBackfillIndex(old_g, new_dim=12, approximate=True, nlist=np.int64(4),
                                 nprobe=np.int64(2), new_training_sample=new_g)
    assert approx.search(new_q, old_q, k=np.uint8(2)).ids.shape == (30, 2)
    for k, message in [(2.5, "k must be an integer, not 2.5"), ("3", "k must be an integer"),
                       (True, "k must be an integer"), (0, "k is at least 1, not 0")]:
        with pytest.raises(RmlibError, match=message):
            index.search(new_q, old_q, k=k)
    with pytest.raises(RmlibError, match="size must be an integer"):
        index.next_batch(order, 2.0)
    with pytest.raises(RmlibError, match="nprobe is at least 1"):
        OnlineBackfillIndex(old_g, new_dim=12, nprobe=0)


@pytest.mark.parametrize("old_gallery, new_dim, message", [
    (np.empty((0, 8), "f4"), 12, "old_gallery must be a non-empty array"),
    (np.empty((5, 0), "f4"), 12, "old_gallery must be a non-empty array"),
    (np.ones(8, "f4"), 12, r"old_gallery must be a non-empty array \(n, d\).*\(8,\)"),
    (np.ones((5, 8), "f4"), 0, "new_dim is at least 1, not 0"),
    (np.ones((5, 8), "f4"), -3, "new_dim is at least 1, not -3"),
    (np.ones((5, 8), "f4"), 12.0, "new_dim must be an integer, not 12.0"),
    (np.ones((5, 8), "f4"), "12", "new_dim must be an integer"),
])
def test_an_empty_gallery_or_a_bad_width_is_refused_at_construction(old_gallery, new_dim,
                                                                     message):
    with pytest.raises(RmlibError, match=message) as refused:
        OnlineBackfillIndex(old_gallery, new_dim=new_dim)
    assert "\n" not in str(refused.value)


def test_an_empty_batch_is_a_no_op():
    old_g, new_g, old_q, new_q = data(n=30)
    index = OnlineBackfillIndex(old_g, new_dim=12)
    order = backfill_order(30, seed=0)
    index.backfill(order, new_g[order])
    batch = index.next_batch(order, 10)  # everything is moved: an empty batch
    assert batch.shape == (0,)
    before = index.search(new_q, old_q, k=5)
    index.backfill(batch, new_g[batch])
    index.backfill([], np.empty((0, 12)))
    assert index.num_new == 30
    np.testing.assert_array_equal(index.search(new_q, old_q, k=5).ids, before.ids)


def test_a_closed_index_says_so_and_closes_twice_harmlessly():
    old_g, new_g, old_q, new_q = data(n=20)
    index = OnlineBackfillIndex(old_g, new_dim=12, meta={"built from": "test"})
    assert index.meta == {"built from": "test"}
    index.close()
    index.close()
    for call in (lambda: index.search(new_q, old_q, k=3),
                 lambda: index.backfill(np.arange(2), new_g[:2]),
                 lambda: index.next_batch(np.arange(20), 2)):
        with pytest.raises(RmlibError, match="this index is closed; build a new one"):
            call()


def test_meta_must_survive_a_journal():
    old_g = data(n=10)[0]
    for meta in ([1], {"when": object()}, {1: "int key"}, {"t": (1, 2)}):
        with pytest.raises(RmlibError, match="meta must be a dict of JSON values"):
            OnlineBackfillIndex(old_g, new_dim=12, meta=meta)


@pytest.mark.parametrize("text, problem", [
    ('{"begin": "abc"}\n', "no version-1 header"),
    ("[1, 2]\n", "every line must be a JSON object"),
    ("[]\n", "every line must be a JSON object"),
    ("", "every line must be a JSON object"),
    ('{"journal": 1, "name": "gallery"}\n', "'num_items' is not of type int"),
    ('{"journal": 1, "name": "g", "num_items": "4", "id_sum": 6, "old_dim": 2, "new_dim": 2, '
     '"complete": true}\n', "'num_items' is not of type int"),
    ('{"journal": 1, "name": "g", "num_items": 4, "id_sum": 6, "old_dim": 2, "new_dim": 2, '
     '"complete": 1}\n', "'complete' is not of type bool"),
    ('{"journal": 1, "name": "g", "num_items": 4, "id_sum": 6, "old_dim": 2, "new_dim": 2, '
     '"complete": true, "meta": []}\n', "'meta' is not an object"),
    ('{"journal": 1, "name": "g", "num_items": 4, "id_sum": 6, "old_dim": 2, "new_dim": 2, '
     '"complete": true}\n{"begin": [1.5, "a"]}\n', "'begin' is not a list of ids"),
    ('{"journal": 1, "name": "g", "num_items": 4, "id_sum": 6, "old_dim": 2, "new_dim": 2, '
     '"complete": true}\n{"begin": [1]}\n{"inserted": 1}\n', "third line"),
    ("\xff\n", "not a backfill journal"),
])
def test_a_journal_of_wrong_records_is_refused_in_one_line(tmp_path, text, problem):
    from rmlib.serving.journal import BackfillJournal

    path = tmp_path / "j.journal"
    path.write_bytes(text.encode("latin-1") if text == "\xff\n" else text.encode())
    for read in (lambda j: j.header(), lambda j: j.pending()):
        with pytest.raises(RmlibError, match="is not a backfill journal") as refused:
            read(BackfillJournal(path))
        assert problem in str(refused.value) and "\n" not in str(refused.value)


def test_a_journal_lock_is_removed_when_nothing_was_created(tmp_path):
    from rmlib.serving.journal import BackfillJournal

    journal = BackfillJournal(tmp_path / "j.journal")
    journal.lock()
    journal.unlock()
    assert list(tmp_path.iterdir()) == []
    journal.lock()
    journal.start({"name": "g"})
    journal.unlock()  # a journal exists: its lock file stays, for the next process
    assert sorted(p.name for p in tmp_path.iterdir()) == ["j.journal", "j.journal.lock"]
