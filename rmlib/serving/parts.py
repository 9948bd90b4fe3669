"""Where the two parts of a live index live: faiss indexes in this process, or two
collections of a Milvus vector database (Milvus Lite in a local file, a Milvus server, or
a cluster: the same `pymilvus` calls, chosen by the URI).

Every backend answers the requests of `PartStore` for a part ("old" or "new"): put
vectors under ids, delete ids, search the k nearest (squared Euclidean distances, ids,
padded with id -1 at distance inf) and count. A backend whose data outlives the process
(`DurableStore`: Milvus) also creates, opens and lists its parts, so that the journal and
`OnlineBackfillIndex.reopen` can finish a batch a killed process left. `OnlineBackfillIndex`
keeps the bookkeeping of which item is in which part and merges the two searches; the
parts know nothing of it. Each backend is a registered `Backend` (`BACKENDS`); a new one is
a class with these methods and one `register_backend(Backend(...))`.

Explained in the book: book/serving.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import faiss
import numpy as np

from rmlib import RmlibError
from rmlib.specs import Registry

PARTS = ("old", "new")
MILVUS_MAX_TOP_K = 16_384  # Milvus answers at most this many results per query
MILVUS_DIMS = (2, 32_768)  # the widths of a FLOAT_VECTOR field that Milvus accepts
MILVUS_REQUEST_ROWS = 5_000  # rows per insert or delete request (under gRPC's 64 MB)
_LITE_USERS: Counter[str] = Counter()  # open MilvusParts per URI in this process


class PartStore(Protocol):
    """What the live index asks of the store of its two parts, "old" and "new".
    `max_batch`: items moved per journaled step (None: any batch in one step);
    `max_top_k`: the most results a search may ask for (None: no limit)."""

    max_batch: int | None
    max_top_k: int | None

    def put(self, part: str, ids: np.ndarray, vectors: np.ndarray, replace: bool) -> None: ...
    def delete(self, part: str, ids: np.ndarray) -> None: ...
    def search(self, part: str, queries: np.ndarray, k: int
               ) -> tuple[np.ndarray, np.ndarray]: ...
    def count(self, part: str) -> int: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class DurableStore(PartStore, Protocol):
    """A store whose parts outlive the process: what the journal's recovery needs."""

    def exists(self) -> bool: ...
    def drop(self) -> None: ...
    def create(self, dims: dict[str, int], approximate: bool, nlist: int) -> None: ...
    def open(self) -> dict[str, int]: ...  # the widths of an existing index's parts
    def ids(self, part: str) -> np.ndarray: ...
    def contains(self, part: str, ids: np.ndarray) -> np.ndarray: ...


def _padded(distances: list, ids: list, k: int) -> tuple[np.ndarray, np.ndarray]:
    d = np.full((len(ids), k), np.inf, dtype=np.float32)
    i = np.full((len(ids), k), -1, dtype=np.int64)
    for row, (dist, found) in enumerate(zip(distances, ids, strict=True)):
        d[row, :len(found)] = dist
        i[row, :len(found)] = found
    return d, i


class FaissParts:
    """Both parts as faiss indexes in memory: exact (flat) or IVF (approximate)."""

    max_batch = None  # any batch moves in one step
    max_top_k = None

    def __init__(self, dims: dict[str, int], approximate: bool = False,
                 training: dict[str, np.ndarray] | None = None, nlist: int = 1024,
                 nprobe: int = 16):
        self._index = {}
        for part in PARTS:
            if not approximate:
                self._index[part] = faiss.IndexIDMap2(faiss.IndexFlatL2(dims[part]))
                continue
            sample = training[part]
            ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(dims[part]), dims[part],
                                     min(nlist, len(sample)), faiss.METRIC_L2)
            ivf.train(sample)
            ivf.nprobe = nprobe
            self._index[part] = ivf  # IVF lists carry ids and support removal themselves
        self._lock = threading.Lock()  # faiss indexes are not safe to change while searched

    def put(self, part: str, ids: np.ndarray, vectors: np.ndarray, replace: bool) -> None:
        with self._lock:
            if replace:
                self._index[part].remove_ids(ids)
            self._index[part].add_with_ids(vectors, ids)

    def delete(self, part: str, ids: np.ndarray) -> None:
        with self._lock:
            self._index[part].remove_ids(ids)

    def search(self, part: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            d, i = self._index[part].search(queries, k)
        return np.where(i < 0, np.inf, d), i

    def count(self, part: str) -> int:
        return int(self._index[part].ntotal)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _milvus_client(uri: str, token: str):
    try:
        with warnings.catch_warnings():  # milvus-lite imports the deprecated pkg_resources
            warnings.simplefilter("ignore", UserWarning)
            from pymilvus import MilvusClient
            return MilvusClient(uri=uri, token=token)
    except ImportError:
        raise RmlibError("the Milvus backend needs pymilvus and milvus-lite: "
                         "pip install pymilvus milvus-lite (see requirements.txt)") from None
    except Exception as e:  # pymilvus raises its own exception types, one per failure
        raise RmlibError(f"cannot open Milvus at {uri!r} ({e}); check the URI, that the "
                         "server runs, or that no other process has the Milvus Lite file open"
                         ) from None


class MilvusParts:
    """Both parts as two collections `<name>_old` and `<name>_new` of one Milvus database.

    Exact search by default (FLAT); `approximate=True` builds IVF_FLAT indexes. Every
    collection uses Strong consistency, so a search sees every write acknowledged before
    it: what the live index's bookkeeping needs.
    """

    max_batch = 4_096  # items moved per journaled step (searches ask for k + this)
    max_top_k = MILVUS_MAX_TOP_K - max_batch  # what a search may ask for, even mid-batch

    def __init__(self, uri: str, name: str, token: str = "", nprobe: int = 16):
        self.uri, self.name, self.nprobe = uri, name, nprobe
        self._client = _milvus_client(uri, token)
        _LITE_USERS[uri] += 1
        self._collection = {part: f"{name}_{part}" for part in PARTS}

    # --- collections -----------------------------------------------------------------------
    def exists(self) -> bool:
        return any(self._client.has_collection(c) for c in self._collection.values())

    def drop(self) -> None:
        for collection in self._collection.values():
            self._client.drop_collection(collection)

    def create(self, dims: dict[str, int], approximate: bool, nlist: int) -> None:
        from pymilvus import DataType, MilvusClient

        for part, collection in self._collection.items():
            schema = MilvusClient.create_schema(auto_id=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dims[part])
            index = self._client.prepare_index_params()
            index.add_index("vector", index_type="IVF_FLAT" if approximate else "FLAT",
                            metric_type="L2", params={"nlist": nlist} if approximate else {})
            self._client.create_collection(collection, schema=schema, index_params=index,
                                           consistency_level="Strong")

    def open(self) -> dict[str, int]:
        """Load both collections of an existing index; their dimensions."""
        dims = {}
        for part, collection in self._collection.items():
            if not self._client.has_collection(collection):
                raise RmlibError(f"Milvus at {self.uri!r} has no collection {collection!r}, "
                                 f"so no live index named {self.name!r}: check the URI and "
                                 "name, or create the index again with overwrite=True")
            self._client.load_collection(collection)
            field = next(f for f in self._client.describe_collection(collection)["fields"]
                         if f["name"] == "vector")
            dims[part] = int(field["params"]["dim"])
        return dims

    # --- the four requests -----------------------------------------------------------------
    def put(self, part: str, ids: np.ndarray, vectors: np.ndarray, replace: bool) -> None:
        write = self._client.upsert if replace else self._client.insert
        for start in range(0, len(ids), MILVUS_REQUEST_ROWS):
            rows = slice(start, start + MILVUS_REQUEST_ROWS)
            write(self._collection[part], [{"id": i, "vector": v} for i, v in
                                           zip(ids[rows].tolist(), vectors[rows], strict=True)])

    def delete(self, part: str, ids: np.ndarray) -> None:
        for start in range(0, len(ids), MILVUS_REQUEST_ROWS):
            self._client.delete(self._collection[part],
                                ids=ids[start:start + MILVUS_REQUEST_ROWS].tolist())

    def search(self, part: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k > MILVUS_MAX_TOP_K:
            raise RmlibError(f"Milvus answers at most {MILVUS_MAX_TOP_K} results per query, "
                             f"{k} were asked for; search with a smaller k")
        hits = self._client.search(
            self._collection[part], data=queries, limit=k, output_fields=[],
            search_params={"metric_type": "L2", "params": {"nprobe": self.nprobe}})
        return _padded([h.distances for h in hits], [h.ids for h in hits], k)

    def flush(self) -> None:
        """Seal what was written into indexed segments (Milvus does it as segments fill)."""
        for collection in self._collection.values():
            self._client.flush(collection)

    def count(self, part: str) -> int:
        rows = self._client.query(self._collection[part], filter="",
                                  output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    # --- what recovery needs ----------------------------------------------------------------
    def ids(self, part: str) -> np.ndarray:
        """Every id in a part (paged: a part may hold millions)."""
        return np.fromiter(self._iter_ids(part), dtype=np.int64)

    def _iter_ids(self, part: str) -> Iterator[int]:
        log = logging.getLogger("pymilvus")  # Milvus Lite has no MVCC timestamps to page
        level = log.level                     # by, and pymilvus warns so on every page
        log.setLevel(logging.ERROR)
        pages = self._client.query_iterator(self._collection[part], batch_size=MILVUS_MAX_TOP_K,
                                            output_fields=["id"])
        try:
            while page := pages.next():
                yield from (row["id"] for row in page)
        finally:
            pages.close()
            log.setLevel(level)

    def contains(self, part: str, ids: np.ndarray) -> np.ndarray:
        """Which of `ids` are in a part."""
        found: set[int] = set()
        for start in range(0, len(ids), MILVUS_REQUEST_ROWS):
            rows = self._client.query(self._collection[part],
                                      ids=ids[start:start + MILVUS_REQUEST_ROWS].tolist(),
                                      output_fields=["id"])
            found.update(row["id"] for row in rows)
        return np.isin(ids, np.fromiter(found, dtype=np.int64, count=len(found)))

    def close(self) -> None:
        if self._client is None:
            return
        self._client.close()
        self._client = None
        _LITE_USERS[self.uri] -= 1
        if "://" not in self.uri and not _LITE_USERS[self.uri]:
            # the last user stops Milvus Lite's server, which holds the file's lock
            from milvus_lite.server_manager import server_manager_instance
            server_manager_instance.release_server(self.uri)


@dataclass(frozen=True)
class Backend:
    """A place for the two parts. In-process backends are made by `build(dims, approximate,
    training, nlist, nprobe)`; durable ones by `connect(uri, name, token, nprobe)`, and are
    journaled and reopenable. `dims`: the widths it stores (None: any). `local_files`: a
    uri that is not a URL names a local file the backend creates (Milvus Lite)."""

    name: str
    build: Callable[..., PartStore] | None = None
    connect: Callable[[str, str, str, int], DurableStore] | None = None
    dims: tuple[int, int] | None = None
    local_files: bool = False

    @property
    def durable(self) -> bool:
        return self.connect is not None


BACKENDS = Registry("serving backend")


def register_backend(backend: Backend) -> Backend:
    """Add `backend` to `BACKENDS` (a name is registered once; exactly one of build or
    connect)."""
    if (backend.build is None) == (backend.connect is None):
        raise RmlibError(f"backend {backend.name!r}: give build (in-process) or connect "
                         "(durable), one of them")
    return BACKENDS.register(backend)


def backend_spec(name: str, durable: bool = False) -> Backend:
    """The registered backend `name` (a durable one where `durable`), or one line."""
    spec = BACKENDS.get(name)
    if spec is None or (durable and not spec.durable):
        names = [n for n, b in BACKENDS.items() if b.durable or not durable]
        kind = "durable backend" if durable else "backend"
        raise RmlibError(f"unknown {kind} {name!r}: use {' or '.join(map(repr, names))}")
    return spec


register_backend(Backend("faiss", build=FaissParts))
register_backend(Backend("milvus", connect=MilvusParts, dims=MILVUS_DIMS, local_files=True))
