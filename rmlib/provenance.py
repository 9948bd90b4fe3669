"""Provenance of a result: which code, profile, config and machine made it, and how long.

Explained in the book: book/table1.
"""

from __future__ import annotations

import datetime as _dt
import platform
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from rmlib import __version__
from rmlib.config import REPO_ROOT, Config

# What makes a result: the package, the scripts that run it, and the pinned environment.
# The book's chapters and the results themselves are outputs and do not count.
CODE_PATHS = ("rmlib", "scripts", "benchmarks", "pyproject.toml", "requirements.txt")


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=10)


def _is_rmlib_checkout() -> bool:
    """Whether REPO_ROOT is the top of a git work tree that tracks rmlib's own source.

    rmlib installed as a package (site-packages) may sit inside some other repository,
    whose HEAD says nothing about rmlib's code.
    """
    top = _git("rev-parse", "--show-toplevel")
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != Path(REPO_ROOT).resolve():
        return False
    return _git("ls-files", "--error-unmatch", "rmlib/__init__.py").returncode == 0


def git_commit() -> str:
    """The repository's HEAD commit, with '+dirty' when code (`CODE_PATHS`) has
    uncommitted changes; outside a checkout of rmlib, the installed version."""
    installed = f"none: installed rmlib {__version__}, not a git checkout"
    try:
        if not _is_rmlib_checkout():
            return installed
        head = _git("rev-parse", "HEAD").stdout.strip()
        dirty = _git("status", "--porcelain", "--untracked-files=no", "--",
                     *CODE_PATHS).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def pin_commit(config: Config) -> Config:
    """`config` with the commit of the code it runs, read now: a run calls this once, at
    its start, so that its results record the code it started with even if the
    repository moves on during an hour of training. A copy of the tree without its .git
    (e.g. on a borrowed GPU machine) is given its commit by whoever copied it
    (RMLIB_COMMIT, already in `config.commit`)."""
    return config if config.commit else replace(config, commit=git_commit())


def machine() -> dict[str, Any]:
    info = {"platform": platform.platform(), "processor": platform.processor() or "unknown",
            "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def provenance(config: dict, wall_time_s: float, profile: str | None = None,
               commit: str | None = None) -> dict:
    """What a results file records of how it was made. `commit`: the run's pinned commit
    (`pin_commit`); None reads it now."""
    return {"git_commit": commit or git_commit(), "rmlib": __version__, "profile": profile,
            "config": config, "machine": machine(), "wall_time_s": round(wall_time_s, 2),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
