"""`python -m rmlib live --centre TRAIN_EMB.npz`: the index serves the centred systems, and
its journal records the centring, so that a resume cannot mix centred and raw embeddings."""

import re
from pathlib import Path

import numpy as np
import pytest

from rmlib.evaluation.backfill import backfill_order, simulate_backfill
from rmlib.evaluation.emb_file import load_backfill_arrays
from rmlib.evaluation.systems import centred
from rmlib.serving.index import OnlineBackfillIndex
from rmlib.serving.live import fingerprint
from tests.serving.test_milvus import files, save_emb

pytest.importorskip("pymilvus")


def test_live_serves_the_centred_systems_and_resumes_only_as_it_was_made(tmp_path, capsys):
    from rmlib.cli import main

    emb, train = save_emb(tmp_path / "emb.npz"), save_emb(tmp_path / "train.npz", seed=3)
    db = tmp_path / "g.db"

    def live(*extra: str) -> int:
        return main(["live", str(emb), "--uri", str(db), "--quiet", *extra])

    assert live("--centre", str(train), "--until", "0.5") == 0
    served = float(re.search(r"served now: mAP (\S+)", capsys.readouterr().out).group(1))
    t = load_backfill_arrays(train)
    expected = centred(load_backfill_arrays(emb), t.old_gallery.mean(0), t.new_gallery.mean(0))
    index = OnlineBackfillIndex.reopen(str(db))
    assert index.meta["centred_on"] == str(train) and index.meta["centre_hash"]
    assert index.meta["gallery"] == fingerprint(expected.old_gallery, expected.new_gallery)
    index.close()
    curve = simulate_backfill(expected.old_query, expected.old_gallery, expected.new_query,
                              expected.new_gallery, expected.protocol(),
                              order=backfill_order(40, 0), ts=np.array([0.5]))
    assert served == pytest.approx(100 * curve.mAP[0], abs=0.006)

    before = files(tmp_path)
    assert live("--until", "0.8") == 2  # raw embeddings into a centred index: refused
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"was centred on {train}" in err and "no --centre" in err
    other = save_emb(tmp_path / "other_train.npz", seed=4)
    assert live("--centre", str(other), "--until", "0.8") == 2
    assert f"--centre {other}" in capsys.readouterr().err
    assert files(tmp_path) == sorted(before + ["other_train.npz"])
    assert live("--centre", str(train), "--until", "0.8") == 0
    assert "t = 0.800" in capsys.readouterr().out


def test_live_refuses_a_missing_or_mismatched_centre_file_in_one_line(tmp_path, capsys):
    from rmlib.cli import main

    emb = save_emb(tmp_path / "emb.npz")
    narrow = save_emb(tmp_path / "narrow.npz", d_old=4)
    for centre, message in ((tmp_path / "none.npz", "does not exist"),
                            (narrow, "the old system's centre has shape (4,)")):
        before = files(tmp_path)
        assert main(["live", str(emb), "--uri", str(tmp_path / "g.db"), "--quiet",
                     "--centre", str(centre)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
        assert files(tmp_path) == before


def test_journals_from_before_centring_resume_as_not_centred(tmp_path, capsys):
    """A journal written before `centred_on` existed was not centred: it resumes without
    --centre (and refuses one)."""
    import json

    from rmlib.cli import main

    emb, db = save_emb(tmp_path / "emb.npz"), tmp_path / "g.db"
    assert main(["live", str(emb), "--uri", str(db), "--quiet", "--until", "0.5"]) == 0
    journal = Path(f"{db}.gallery.journal")
    lines = journal.read_text().splitlines()
    header = json.loads(lines[0])
    for key in ("centred_on", "centre_hash"):
        header["meta"].pop(key)
    journal.write_text("\n".join([json.dumps(header)] + lines[1:]) + "\n")
    assert main(["live", str(emb), "--uri", str(db), "--quiet", "--until", "0.75"]) == 0
    assert "t = 0.750" in capsys.readouterr().out
