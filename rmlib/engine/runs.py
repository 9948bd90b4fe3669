"""Cached runs: every expensive step is a function of its config, stored under a key of it.

A run lives in `<runs>/<dataset>/<profile>/<name>-<key>/` (`rmlib.outputs.cached` computes
a value once and reads it back afterwards). The key hashes every field of the config together with
`CACHE_VERSION`, a salt to bump whenever a change in the code changes what the same
config produces, so that stale runs are never reused.

Explained in the book: book/models.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

CACHE_VERSION = "rmlib-runs-2"


def config_key(config: Any) -> str:
    """A short hash of a config dataclass and the cache version."""
    text = json.dumps({"cache_version": CACHE_VERSION, **asdict(config)}, sort_keys=True,
                      default=list)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def run_dir(runs: Path, dataset: str, profile: str, name: str, config: Any) -> Path:
    """The folder of the run of `config` (not created)."""
    return Path(runs) / dataset / profile / f"{name}-{config_key(config)}"
