"""Results record the code, machine and time they were made with."""

from rmlib import config as config_module
from rmlib import provenance as prov
from rmlib.config import Config


def test_a_run_records_the_commit_it_started_with(monkeypatch):
    monkeypatch.setattr(config_module, "git_commit", lambda: "abc123")
    config = Config.from_env("smoke", environ={})
    monkeypatch.setattr(config_module, "git_commit", lambda: "def456+dirty")  # tree moves on
    assert prov.provenance({}, 1.0, commit=config.commit)["git_commit"] == "abc123"
    assert Config.from_env("smoke", environ={}).commit == "def456+dirty"  # a later run: now
    copied = Config.from_env("smoke", environ={"RMLIB_COMMIT": "copied"})
    assert copied.commit == "copied"  # a tree without .git is told its commit
