"""Provenance of a result: which code, profile, config and machine made it, and how long."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from typing import Any

import torch

from rmlib import __version__
from rmlib.config import REPO_ROOT

# What makes a result: the package, the scripts that run it, and the pinned environment.
# The book's chapters and the results themselves are outputs and do not count.
CODE_PATHS = ("rmlib", "scripts", "benchmarks", "pyproject.toml", "requirements.txt")


def git_commit() -> str:
    """The repository's HEAD commit, with '+dirty' when code (`CODE_PATHS`) has
    uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                *CODE_PATHS],
                               cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


_COMMIT_AT_START: str | None = None


def commit_at_start() -> str:
    """The commit of the code this process runs: read once, at the first call, so that a
    long run records the code it started with even if the repository moves on."""
    global _COMMIT_AT_START
    if _COMMIT_AT_START is None:
        # A copy of the tree without its .git (e.g. on a borrowed GPU machine) is told its
        # commit by whoever copied it.
        _COMMIT_AT_START = os.environ.get("RMLIB_COMMIT") or git_commit()
    return _COMMIT_AT_START


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


def provenance(config: dict, wall_time_s: float, profile: str | None = None) -> dict:
    return {"git_commit": commit_at_start(), "rmlib": __version__, "profile": profile,
            "config": config, "machine": machine(), "wall_time_s": round(wall_time_s, 2),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
