"""Outputs are never lost or half-written, and bad output paths fail before any work."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from rmlib import RmlibError
from rmlib.cli import main
from rmlib.outputs import atomic_write, check_output, check_outputs, save_npz, write_json
from tests.conftest import clustered


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_write_that_fails_half_way_leaves_the_previous_file_and_no_partial(tmp_path):
    path = write_json(tmp_path / "r.json", {"auc": 1})

    def half_then_fail(tmp):
        tmp.write_text('{"auc": 2, "curve": [0.1, ')  # a truncated file, as a full disk leaves
        raise OSError(28, "No space left on device")

    with pytest.raises(RmlibError, match="No space left on device.*previous content"):
        atomic_write(path, half_then_fail)
    assert json.loads(path.read_text()) == {"auc": 1}
    assert _leftovers(tmp_path) == []


def test_an_interrupted_torch_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "compat.pt"
    atomic_write(path, lambda tmp: torch.save({"w": torch.ones(3)}, tmp))
    before = path.read_bytes()

    def killed(obj, f, *args, **kwargs):
        open(f, "wb").write(b"PK\x03\x04 fragment")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, lambda tmp: torch.save({"w": torch.zeros(3)}, tmp))
    assert path.read_bytes() == before and _leftovers(tmp_path) == []


def test_written_files_keep_the_usual_permissions(tmp_path):
    path = save_npz(tmp_path / "x", {"a": np.zeros(2)})
    assert path.name == "x"  # exactly the name given: np.savez would have written x.npz
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("case", ["folder", "parent is a file", "figure extension",
                                  "no extension", "same as input", "unwritable",
                                  "character device", "fifo", "symlink", "symlink loop",
                                  "under a dangling link", "name too long"])
def test_bad_output_paths_are_refused(case, tmp_path):
    source = tmp_path / "in.npz"
    source.write_bytes(b"x")
    (tmp_path / "afile").write_text("x")
    path, kwargs, message = {
        "folder": (tmp_path, {}, "is a folder"),
        "parent is a file": (tmp_path / "afile" / "out.json", {}, "is a file, not a folder"),
        "figure extension": (tmp_path / "c.pnx", {"figure": True}, "cannot save a figure as 'pnx'"),
        "no extension": (tmp_path / "c", {"figure": True}, "no extension"),
        "same as input": (tmp_path / "." / "in.npz", {"inputs": [source]}, "input file"),
        "unwritable": ("/proc/rmlib-test/out.json", {}, "cannot write in"),
        "character device": ("/dev/null", {}, "is a character device"),
        "fifo": (tmp_path / "fifo", {}, "is a FIFO"),
        "symlink": (tmp_path / "link.json", {}, "is a symbolic link"),
        "symlink loop": (tmp_path / "loop", {}, "is a symbolic link"),
        "under a dangling link": (tmp_path / "dangling" / "out.json", {}, "link to nowhere"),
        # its temporary name (14 bytes longer) would not fit in the folder, after the work
        "name too long": (tmp_path / ("n" * 245 + ".json"), {}, "the file name is 250 bytes"),
    }[case]
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link.json").symlink_to(tmp_path / "afile")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    before = sorted(tmp_path.rglob("*"))
    if case == "unwritable" and not os.path.isdir("/proc/self"):
        pytest.skip("needs Linux /proc, a folder nobody may write in (not even root)")
    with pytest.raises(RmlibError, match=message):
        check_output(path, "--out", **kwargs)
    assert source.read_bytes() == b"x"
    assert sorted(tmp_path.rglob("*")) == before  # nothing created, nothing replaced
    assert (tmp_path / "link.json").is_symlink()


def test_a_failed_check_creates_no_folders(tmp_path):
    with pytest.raises(RmlibError, match="is a folder"):
        check_outputs({"--json": tmp_path / "new" / "deep" / "out.json", "--plot": tmp_path},
                      figures=["--plot"])
    assert not (tmp_path / "new").exists()


def test_atomic_write_refuses_a_device_or_a_link(tmp_path):
    (tmp_path / "target").write_text("kept")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    for path in (Path("/dev/null"), tmp_path / "link"):
        with pytest.raises(RmlibError, match="will not write"):
            write_json(path, {"a": 1})
    assert (tmp_path / "link").is_symlink() and (tmp_path / "target").read_text() == "kept"


@pytest.fixture
def emb(tmp_path):
    labels, old = clustered(120, 8, 6, 1.0, seed=1)
    new = (1.5 * old + 0.3 * np.random.default_rng(2).normal(size=old.shape)).astype("f4")
    path = tmp_path / "emb.npz"
    np.savez(path, old_query=old, old_gallery=old, new_query=new, new_gallery=new,
             query_labels=labels)
    return path


@pytest.mark.parametrize("args,message", [
    (["--json", "{emb}"], "is the input file"),
    (["--plot", "{tmp}/curves.pnx"], "cannot save a figure"),
    (["--json", "{tmp}/emb.npz/out.json"], "is a file, not a folder"),
    (["--json", "{tmp}"], "is a folder"),
    (["--json", "{tmp}/a.png", "--plot", "{tmp}/a.png"], "are the same file"),
])
def test_backfill_checks_its_outputs_before_the_work(args, message, emb, tmp_path, capsys,
                                                     monkeypatch):
    from rmlib.evaluation import backfill

    def no_work(*a, **k):
        raise AssertionError("the evaluation ran before the output paths were checked")

    monkeypatch.setattr(backfill, "backfill_arrays", no_work)
    before = emb.read_bytes()
    argv = ["backfill", str(emb)] + [a.format(emb=emb, tmp=tmp_path) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err
    assert emb.read_bytes() == before


def test_backfill_json_that_fails_to_write_keeps_the_previous_result(emb, tmp_path, capsys,
                                                                    monkeypatch):
    from rmlib import outputs

    out = tmp_path / "r.json"
    assert main(["backfill", str(emb), "--json", str(out)]) == 0
    before = out.read_text()
    real = outputs.atomic_write

    def full_disk(path, write):
        def partial(tmp):
            tmp.write_text(before[:40])
            raise OSError(28, "No space left on device")
        return real(path, partial)

    monkeypatch.setattr(outputs, "atomic_write", full_disk)
    assert main(["backfill", str(emb), "--json", str(out), "--seed", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "No space left on device" in err
    assert "previous content is unchanged" in err
    assert out.read_text() == before and _leftovers(tmp_path) == []


@pytest.mark.parametrize("out,message", [("{tmp}/train.npz", "is the input file"),
                                         ("{tmp}/train.npz/c.pt", "is a file, not a folder"),
                                         ("{tmp}", "is a folder")])
def test_fit_checks_out_before_fitting(out, message, tmp_path, capsys, monkeypatch):
    from rmlib import own_upgrade

    labels, old = clustered(80, 6, 4, 1.0, seed=3)
    np.savez(tmp_path / "train.npz", old=old, new=old, labels=labels)
    monkeypatch.setattr(own_upgrade, "fit_compat", lambda *a, **k: pytest.fail("fitted first"))
    assert main(["fit", str(tmp_path / "train.npz"), "--out", out.format(tmp=tmp_path)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "reproduce"])
def test_training_commands_check_their_results_folder_first(command, tmp_path, capsys,
                                                            monkeypatch):
    """An unwritable results folder fails in a second, not after an hour of training."""
    from dataclasses import replace

    from rmlib.methods import setups

    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("RMLIB_RESULTS", str(tmp_path / "afile"))
    never = replace(setups.DATASETS["cifar100"], setup=lambda c: pytest.fail("worked"))
    monkeypatch.setitem(setups.DATASETS, "cifar100", never)
    argv = [command, "cifar100", *(["both"] if command == "train" else []), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is a file, not a folder" in err


def test_a_damaged_results_file_is_one_line(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "results" / "cifar100" / "smoke"
    folder.mkdir(parents=True)
    (folder / "backbones.json").write_text('{"old": ')
    monkeypatch.setenv("RMLIB_RESULTS", str(tmp_path / "results"))
    assert main(["train", "cifar100", "old", "--profile", "smoke", "--quiet"]) == 2
    assert "backbones.json is not a readable results file" in capsys.readouterr().err
