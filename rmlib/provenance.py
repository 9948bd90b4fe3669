"""Provenance of a result: which code, profile, config and machine made it, and how long.

Explained in the book: book/table1.
"""

from __future__ import annotations

import datetime as _dt
import platform
from typing import Any

import torch

from rmlib import __version__


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


def provenance(config: dict, wall_time_s: float, *, commit: str,
               profile: str | None = None) -> dict:
    """What a results file records of how it was made. `commit`: the one its `Config`
    read when the run started (`Config.commit`), not the tree's commit now."""
    commit = commit or "unknown: the Config was not built by Config.from_env"
    return {"git_commit": commit, "rmlib": __version__, "profile": profile,
            "config": config, "machine": machine(), "wall_time_s": round(wall_time_s, 2),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
