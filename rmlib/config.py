"""Paths, profiles and devices: the few settings every other module reads from one place."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, fields
from pathlib import Path

import torch

from rmlib import RmlibError

PACKAGE_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_ROOT.parent
PROFILES = ("smoke", "cpu", "paper")


# What each profile trains. `smoke` proves every line runs on a small real subset; `cpu`
# fits a 2-core CPU (fp32 unless the CPU has bf16 units), most epochs at 24 px
# (progressive resizing: the recipe benchmarks/backbone_recipes.py chose on a validation
# split); `paper` is ResNet-18 on one GPU.
# psi/rho: `transform_hidden` and `transform_epochs` are where the search starts; tau, the
# width and the epochs are then chosen from the grids on a validation split (rmlib.upgrade).
# The cpu width grid stops at 512: a 1024-wide psi/rho scores 0.6 pt more validation
# AUC_mAP than 512 but fits 2.1x slower (benchmarks/transform_recipes.py), and six fits
# plus the search must share the 60-minute budget with four backbones.
PROFILE_SETTINGS: dict[str, dict] = {
    "smoke": {"arch": "fast", "widths": (16, 32, 64), "epochs_old": 1, "epochs_new": 1,
              "batch_size": 128, "lr": 0.1, "train_per_class": 20, "test_per_class": 10,
              "transform_epochs": 2, "transform_hidden": 128, "tau_epochs": 1,
              "transform_hidden_grid": (64, 128), "transform_epochs_grid": (2, 3)},
    "cpu": {"arch": "fast", "widths": (32, 64, 128), "epochs_old": 10, "epochs_new": 11,
            "low_res_epochs_old": 8, "low_res_epochs_new": 9,
            "batch_size": 256, "lr": 0.2, "train_per_class": None, "test_per_class": None,
            "transform_epochs": 6, "transform_hidden": 512, "tau_epochs": 3,
            "transform_hidden_grid": (256, 512), "transform_epochs_grid": (6, 12)},
    "paper": {"arch": "resnet18", "widths": None, "epochs_old": 30, "epochs_new": 30,
              "batch_size": 256, "lr": 0.2, "train_per_class": None, "test_per_class": None,
              "transform_epochs": 20, "transform_hidden": 512, "tau_epochs": 10,
              "transform_hidden_grid": (256, 512, 1024), "transform_epochs_grid": (20, 40)},
}


# Market-1501 (person crops, re-id backbone). Time per epoch is measured by
# benchmarks/bench_train.py at each resolution; smoke runs on synthetic folders in tests.
MARKET_SETTINGS: dict[str, dict] = {
    "smoke": {"arch": "reid18", "image_size": (64, 32), "epochs_old": 1, "epochs_new": 1,
              "sampler": (4, 4), "lr": 0.05, "padding": 4, "erase": 0.5,
              "triplet_margin": 0.3},
    "cpu": {"arch": "reid18", "image_size": (128, 64), "epochs_old": 10, "epochs_new": 10,
            "sampler": (16, 4), "lr": 0.05, "padding": 8, "erase": 0.5,
            "triplet_margin": 0.3},
    "paper": {"arch": "reid50", "image_size": (256, 128), "epochs_old": 60, "epochs_new": 60,
              "sampler": (16, 4), "lr": 0.05, "padding": 10, "erase": 0.5,
              "triplet_margin": 0.3},
}


def config_key(config, keyed_only_when_set: tuple[str, ...] = ()) -> str:
    """The cache key of a config dataclass: a hash of all its fields, except those in
    `keyed_only_when_set` that hold their declared default (fields added after runs were
    cached, so that those runs keep their keys)."""
    values = asdict(config)
    defaults = {f.name: f.default for f in fields(config)}
    for name in keyed_only_when_set:
        if values[name] == defaults[name]:
            del values[name]
    text = json.dumps(values, sort_keys=True, default=list)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def profile_settings(name: str | None = None) -> dict:
    return dict(PROFILE_SETTINGS[name or profile_name()])


def _home() -> Path:
    """The repository's `data/` in a checkout; `~/.rmlib` when rmlib is installed as a package
    (e.g. on Colab), whose site-packages is no place for data."""
    if (REPO_ROOT / "pyproject.toml").exists():
        return REPO_ROOT / "data"
    return Path.home() / ".rmlib"


def data_root() -> Path:
    """`$RMLIB_DATA` if set, else the repository's `data/` (independent of the working dir)."""
    env = os.environ.get("RMLIB_DATA")
    return Path(env).expanduser().resolve() if env else _home()


def runs_root() -> Path:
    """The run cache: under the repository's `data/runs`, never under a read-only RMLIB_DATA."""
    env = os.environ.get("RMLIB_RUNS")
    return Path(env).expanduser().resolve() if env else _home() / "runs"


def results_root() -> Path:
    """Where results with provenance are written (committed for the cpu and paper profiles)."""
    env = os.environ.get("RMLIB_RESULTS")
    return Path(env).expanduser().resolve() if env else _home() / "results"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def profile_name() -> str:
    """`$RMLIB_PROFILE`, else `paper` on a GPU and `cpu` otherwise."""
    name = os.environ.get("RMLIB_PROFILE") or ("paper" if torch.cuda.is_available() else "cpu")
    if name not in PROFILES:
        choices = ", ".join(PROFILES)
        raise RmlibError(f"RMLIB_PROFILE={name!r} is not a profile; use one of {choices}")
    return name


def cpu_has_fast_bf16() -> bool:
    """True where bf16 matmuls run on hardware units (AMX or AVX512-BF16).

    Without them PyTorch emulates bf16 and it is slower than fp32, so the flag that
    autocast accepts bf16 is not enough to choose it.
    """
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    if amx:
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags
