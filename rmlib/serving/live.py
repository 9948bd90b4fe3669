"""`python -m rmlib live`: backfill the gallery of an EMB.npz file in Milvus, resumably.

The journal's header records what the index was built from: a hash of the old and new
galleries and one of the backfill order, with the file, order, seed and batch named. A
run that would resume it from another file, or in another order, is refused: it would
serve a mix of two galleries, or move items that no order puts next. The order itself is
kept beside the journal (`<journal>.order.npy`): a resume with the same --order and
--seed continues in it as it was made, without training a learned policy again (whose
result may differ in the last bits on another CPU's BLAS).

Explained in the book: book/serving.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from rmlib import RmlibError
from rmlib.evaluation.backfill import backfill_order, backfilled_count
from rmlib.evaluation.emb_file import centred_on, load_backfill_arrays, readable_file
from rmlib.evaluation.systems import SystemPair
from rmlib.outputs import save_npy
from rmlib.serving.checks import check_dims
from rmlib.serving.index import OnlineBackfillIndex, live_scores
from rmlib.serving.location import check_location, journal_header
from rmlib.serving.parts import backend_spec


def fingerprint(*arrays: np.ndarray) -> str:
    """A hash of the arrays' types, shapes and bytes: the same data gives the same hash,
    whichever file it came from."""
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape};".encode())
        h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()


def source_record(arrays: SystemPair, order: np.ndarray, source: str | Path,
                  order_name: str, seed: int, batch: int, order_inputs: str = "",
                  centre: str | Path | None = None) -> dict:
    """What the journal keeps of a live index's source (its `meta`). `order_inputs`: a
    fingerprint of the files the order was made from (an order file, a learned policy's
    training file), so that a stored order is reused only for the same ones; `centre`: the
    training file each system was centred on (its name and a fingerprint of its bytes)."""
    return {"source": str(source), "gallery": fingerprint(arrays.old_gallery, arrays.new_gallery),
            "order": str(order_name), "seed": int(seed), "order_hash": fingerprint(order),
            "order_inputs": order_inputs, "batch": int(batch),
            "centred_on": str(centre or ""),
            "centre_hash": file_fingerprint(centre) if centre is not None else ""}


def file_fingerprint(*paths: str | Path) -> str:
    """A hash of the files' bytes ("" for none)."""
    if not paths:
        return ""
    h = hashlib.blake2b(digest_size=16)
    for path in paths:
        h.update(Path(path).read_bytes())
    return h.hexdigest()


def check_resume(meta: dict, asked: dict, uri: str, name: str) -> None:
    """Refuse to resume an index built from another gallery, or backfilled in another
    order, than this run's."""
    where = f"the live index {name!r} at {uri}"
    fix = "start it again with --overwrite, or give another --name or --uri"
    if "gallery" not in meta or "order_hash" not in meta:
        raise RmlibError(f"{where} does not record which file it was built from (an older "
                         f"rmlib, or Python without meta=, made it); {fix}")
    if meta.get("centre_hash", "") != asked["centre_hash"]:  # else its gallery differs too
        was = f"centred on {meta['centred_on']}" if meta.get("centre_hash") else "not centred"
        now = f"--centre {asked['centred_on']}" if asked["centre_hash"] else "no --centre"
        raise RmlibError(f"{where} was {was}, and this run asks for {now} (or that file "
                         f"has changed): resume it as it was made, or {fix}")
    if meta["gallery"] != asked["gallery"]:
        raise RmlibError(f"{where} holds another gallery than {asked['source']} (it was built "
                         f"from {meta.get('source', '?')}): resume it with that file, or {fix}")
    if meta["order_hash"] != asked["order_hash"]:
        raise RmlibError(f"{where} is backfilled in another order (--order "
                         f"{meta.get('order', '?')} --seed {meta.get('seed', '?')}) than "
                         f"--order {asked['order']} --seed {asked['seed']}: resume it with "
                         f"those, or {fix}")


def order_path(journal: Path) -> Path:
    """Where the backfill order of the index whose journal is `journal` is kept."""
    return journal.with_name(journal.name + ".order.npy")


def stored_order(journal: Path, meta: dict, order_name: str, seed: int,
                 order_inputs: str = "") -> np.ndarray | None:
    """The order the index was created with, when this run asks for the same policy, seed
    and input files and the file beside the journal still holds it (same hash); else None
    (compute it, and let `check_resume` compare)."""
    path = order_path(journal)
    asked = (str(order_name), int(seed), order_inputs)
    if (meta.get("order"), meta.get("seed"), meta.get("order_inputs", "")) != asked or \
            not path.is_file():
        return None
    try:
        order = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None  # damaged: computed again and checked against the recorded hash
    return order if fingerprint(order) == meta.get("order_hash") else None


def check_widths(arrays: SystemPair, backend: str = "milvus") -> None:
    """Refuse widths the durable `backend` cannot store before an order policy trains on
    the arrays."""
    check_dims({"old": arrays.old_gallery.shape[1], "new": arrays.new_gallery.shape[1]},
               backend_spec(backend, durable=True))


def run_live(source: str | Path, order_for: Callable[[SystemPair], np.ndarray | None], *,
             uri: str, name: str, journal: str | Path | None, batch: int, until: float,
             seed: int, order_name: str, overwrite: bool, quiet: bool,
             backend: str = "milvus", order_inputs: str = "",
             centre: str | Path | None = None) -> int:
    """Create (or resume) the live index of the gallery of the EMB file `source` at `uri`,
    backfill it in `order_for(arrays)` (None: the seeded random order) until the fraction
    `until`, and print what it then serves. Everything that is cheap to check (where the
    index lives, the widths) is checked before the order is made (a learned one trains).
    `order_inputs`: `file_fingerprint` of the files the order is made from; `centre`: a
    TRAIN_EMB.npz to centre each system on (`centred_on`), before the order is made and
    the index is filled. Returns the exit status, 0."""
    from tqdm.auto import tqdm

    journal_file = check_location(uri, name, journal,
                                  backend_spec(backend, durable=True).local_files)
    if centre is not None:
        readable_file(centre, "a TRAIN.npz of the two systems' embeddings of training items")
    arrays = load_backfill_arrays(source)
    check_widths(arrays, backend)
    if centre is not None:
        arrays = centred_on(arrays, centre)
    n = len(arrays.old_gallery)
    # --overwrite starts again whatever the journal holds, even a damaged one
    header = None if overwrite else journal_header(uri, name, journal)
    resuming = header is not None and header["complete"]
    meta = header.get("meta", {}) if resuming else {}
    order = stored_order(journal_file, meta, order_name, seed, order_inputs) if resuming \
        else None
    if order is None:
        order = order_for(arrays)
        order = backfill_order(n, seed) if order is None else np.asarray(order, dtype=np.int64)
    asked = source_record(arrays, order, source, order_name, seed, batch, order_inputs,
                          centre)
    if resuming:
        check_resume(meta, asked, uri, name)
        index = OnlineBackfillIndex.reopen(uri, name, journal, backend=backend)
        print(f"resumed the live index {name!r} at {uri}: t = {index.ratio:.3f}")
    else:
        if header is not None and not header["complete"]:
            print(f"the creation of {name!r} at {uri} was interrupted: creating it again")
        index = OnlineBackfillIndex(arrays.old_gallery, arrays.new_gallery.shape[1],
                                    backend=backend, uri=uri, name=name, journal=journal,
                                    overwrite=overwrite or header is not None, meta=asked)
        print(f"created the live index {name!r} at {uri}: {n:,} items in the old part")
    try:
        if not resuming or not order_path(journal_file).is_file():
            save_npy(order_path(journal_file), order)  # a resume continues in it
        target = backfilled_count(until, n)
        with tqdm(total=max(target - index.num_new, 0), unit="item", disable=quiet,
                  desc="backfill") as bar:
            while index.num_new < target:
                ids = index.next_batch(order, min(batch, target - index.num_new))
                index.backfill(ids, arrays.new_gallery[ids])
                bar.update(len(ids))
        print(f"t = {index.ratio:.3f}: {index.num_old:,} items in the old part, "
              f"{index.num_new:,} in the new part")
        limit = index.max_top_k  # the whole merged ranking, as the evaluator scores it:
        if limit is None or n <= limit:
            served = live_scores(index, arrays.new_query, arrays.old_query,
                                 arrays.protocol()).summary()
            print(f"served now: mAP {100 * served['mAP']:.2f}  top-1 {100 * served['top1']:.2f}"
                  f"  top-5 {100 * served['top5']:.2f}")
    finally:
        index.close()
    return 0
