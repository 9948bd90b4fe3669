"""A serving backend is one class with the PartStore methods and one registry entry: an
in-memory durable store, defined here, serves what faiss serves, survives a failure in the
middle of a batch through the journal and `reopen`, and is a choice of `live`."""

import numpy as np
import pytest

from rmlib import RmlibError
from rmlib.serving import parts
from rmlib.serving.index import OnlineBackfillIndex, float32_tolerance

_DATABASES: dict[str, dict] = {}  # uri -> name -> parts: "outlives" an index object


class MemoryStore:
    """Both parts as dicts id -> vector, kept per uri and name in this process."""

    max_batch = 7  # small: a batch moves in several journaled steps
    max_top_k = None

    def __init__(self, uri: str, name: str, token: str = "", nprobe: int = 16):
        self._db, self._name = _DATABASES.setdefault(uri, {}), name

    def exists(self) -> bool:
        return self._name in self._db

    def drop(self) -> None:
        self._db.pop(self._name, None)

    def create(self, dims, approximate, nlist) -> None:
        self._db[self._name] = {"dims": dict(dims), "old": {}, "new": {}}

    def open(self) -> dict:
        if not self.exists():
            raise RmlibError(f"no index {self._name!r} in memory")
        return dict(self._db[self._name]["dims"])

    def put(self, part, ids, vectors, replace) -> None:
        store = self._db[self._name][part]
        for i, v in zip(ids.tolist(), vectors, strict=True):
            store[i] = np.array(v, dtype=np.float32)

    def delete(self, part, ids) -> None:
        for i in np.asarray(ids).tolist():
            self._db[self._name][part].pop(i, None)

    def search(self, part, queries, k):
        store = self._db[self._name][part]
        ids = np.array(sorted(store), dtype=np.int64)
        d = np.full((len(queries), k), np.inf, dtype=np.float32)
        i = np.full((len(queries), k), -1, dtype=np.int64)
        if len(ids):
            vectors = np.stack([store[j] for j in ids.tolist()]).astype(np.float64)
            dist = ((queries[:, None, :].astype(np.float64) - vectors[None]) ** 2).sum(-1)
            top = np.argsort(dist, axis=1, kind="stable")[:, :k]
            d[:, :top.shape[1]] = np.take_along_axis(dist, top, 1)
            i[:, :top.shape[1]] = ids[top]
        return d, i

    def count(self, part) -> int:
        return len(self._db[self._name][part])

    def ids(self, part) -> np.ndarray:
        return np.array(sorted(self._db[self._name][part]), dtype=np.int64)

    def contains(self, part, ids) -> np.ndarray:
        return np.array([i in self._db[self._name][part] for i in np.asarray(ids).tolist()])

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture
def memory_backend(monkeypatch):
    monkeypatch.setattr(parts, "BACKENDS", parts.BACKENDS.copy())  # undone after the test
    _DATABASES.clear()
    return parts.register_backend(parts.Backend("memory", connect=MemoryStore))


def _gallery(n=60, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 5)).astype("f4"), rng.normal(size=(n, 7)).astype("f4"),
            rng.permutation(n), rng.normal(size=(9, 5)).astype("f4"),
            rng.normal(size=(9, 7)).astype("f4"))


def _agree(a: OnlineBackfillIndex, b: OnlineBackfillIndex, q_old, q_new, old, new) -> bool:
    ra, rb = a.search(q_new, q_old, k=15), b.search(q_new, q_old, k=15)
    return bool(ra.agrees_with(rb, float32_tolerance(old, new, q_old, q_new)).all())


def test_a_new_backend_serves_what_faiss_serves(memory_backend, tmp_path):
    old, new, order, q_old, q_new = _gallery()
    mem = OnlineBackfillIndex(old, 7, backend="memory", uri="memory://a",
                              journal=tmp_path / "a.journal")
    ref = OnlineBackfillIndex(old, 7)
    for size in (20, 1, 25, 14):  # 20 items: three journaled steps of at most 7
        batch = mem.next_batch(order, size)
        mem.backfill(batch, new[batch])
        ref.backfill(batch, new[batch])
        assert _agree(mem, ref, q_old, q_new, old, new)
        assert mem.stored() == {"old": ref.num_old, "new": ref.num_new}
    assert mem.ratio == 1.0 and len(mem.next_batch(order, 5)) == 0
    mem.close()


def test_a_new_backend_recovers_a_failed_batch_through_the_journal(memory_backend, tmp_path,
                                                                     monkeypatch):
    old, new, order, q_old, q_new = _gallery(seed=1)
    journal = tmp_path / "b.journal"
    index = OnlineBackfillIndex(old, 7, backend="memory", uri="memory://b", journal=journal)
    index.backfill(order[:10], new[order[:10]])
    real_delete = MemoryStore.delete

    def failing_delete(self, part, ids):  # the process "dies" halfway through the deletes
        real_delete(self, part, ids[: len(ids) // 2])
        raise ConnectionError("the store went away")

    monkeypatch.setattr(MemoryStore, "delete", failing_delete)
    with pytest.raises(RmlibError, match="a backfill batch was interrupted"):
        index.backfill(order[10:20], new[order[10:20]])
    index.close()
    monkeypatch.setattr(MemoryStore, "delete", real_delete)
    index = OnlineBackfillIndex.reopen("memory://b", journal=journal, backend="memory")
    store = MemoryStore("memory://b", "gallery")
    in_old, in_new = store.ids("old"), store.ids("new")
    assert len(np.intersect1d(in_old, in_new)) == 0  # no item in both parts
    np.testing.assert_array_equal(np.union1d(in_old, in_new), np.arange(len(old)))
    assert index.num_new == len(in_new) >= 10 + 1  # the first batch, and the failed step's
    rest = index.next_batch(order, len(old))  # finish the backfill, then compare with faiss
    index.backfill(rest, new[rest])
    ref = OnlineBackfillIndex(old, 7)
    ref.backfill(order, new[order])
    assert _agree(index, ref, q_old, q_new, old, new)
    index.close()


def test_live_runs_on_a_registered_durable_backend(memory_backend, tmp_path, capsys):
    from rmlib.cli import main

    old, new, _, _, _ = _gallery(seed=2)
    labels = np.arange(len(old)) % 6
    np.savez(tmp_path / "emb.npz", old_query=old, old_gallery=old, new_query=new,
             new_gallery=new, query_labels=labels)
    argv = ["live", str(tmp_path / "emb.npz"), "--backend", "memory", "--uri", "memory://c",
            "--journal", str(tmp_path / "c.journal"), "--batch", "9", "--quiet"]
    assert main([*argv, "--until", "0.5"]) == 0
    assert main([*argv, "--until", "1"]) == 0
    out = capsys.readouterr().out
    assert "created the live index" in out and "resumed the live index" in out
    assert "t = 1.000" in out and "served now: mAP" in out
    with pytest.raises(SystemExit):
        main([*argv[:2], "--backend", "faiss"])  # not durable: not a choice of live


def test_live_overwrite_starts_again_over_a_damaged_journal(memory_backend, tmp_path, capsys):
    from rmlib.cli import main

    old, new, _, _, _ = _gallery(seed=3)
    np.savez(tmp_path / "emb.npz", old_query=old, old_gallery=old, new_query=new,
             new_gallery=new, query_labels=np.arange(len(old)) % 6)
    (tmp_path / "d.journal").write_text('{"begin": "abc"}\n')
    argv = ["live", str(tmp_path / "emb.npz"), "--backend", "memory", "--uri", "memory://d",
            "--journal", str(tmp_path / "d.journal"), "--quiet"]
    assert main(argv) == 2  # a damaged journal is refused, in one line
    assert "is not a backfill journal" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0  # and --overwrite is the way out
    assert "t = 1.000" in capsys.readouterr().out
