"""Results record the code, machine and time they were made with."""

from rmlib import provenance as prov
from rmlib.config import Config


def test_a_run_records_the_commit_it_started_with(monkeypatch):
    monkeypatch.setattr(prov, "git_commit", lambda: "abc123")
    config = prov.pin_commit(Config.from_env("smoke", environ={}))
    monkeypatch.setattr(prov, "git_commit", lambda: "def456+dirty")  # the tree moves on
    assert prov.provenance({}, 1.0, "smoke", config.commit)["git_commit"] == "abc123"
    assert prov.provenance({}, 1.0, "smoke")["git_commit"] == "def456+dirty"  # unpinned: now
    copied = prov.pin_commit(Config.from_env("smoke", environ={"RMLIB_COMMIT": "copied"}))
    assert copied.commit == "copied"  # a tree without .git is told its commit
