"""The one configuration: the profile, the paths and the machine, built once at the edge.

`Config.from_env()` is the only place in rmlib that reads environment variables. The
command line and the chapters call it once and hand the result down; nothing below reads
a setting on its own, and nothing is read at import time.

Environment variables (all optional): RMLIB_PROFILE (smoke | cpu | paper; default paper
with a GPU, cpu otherwise), RMLIB_DATA (the data root), RMLIB_RUNS (the run cache),
RMLIB_RESULTS (results with provenance), RMLIB_DOWNLOAD (0 forbids downloads),
RMLIB_PRECISION (fp32 | bf16 forces the autocast mode), RMLIB_DEVICE (cpu | cuda | cuda:N:
where the runner trains and evaluates; default a GPU when there is one), RMLIB_COMMIT (the
commit of a tree copied without its .git; otherwise the checkout's commit is read when
the configuration is built, and results record it).

Explained in the book: book/intro.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from rmlib import RmlibError, __version__

PACKAGE_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_ROOT.parent


@dataclass(frozen=True)
class TransformRecipe:
    """psi/rho and the baselines' transforms: where the search starts and its grids.

    tau, then the width, then the epochs are chosen on a validation split of the training
    set (`val_per_class` items per class), never on the test set.
    """

    epochs: int
    hidden: int
    tau_epochs: int
    hidden_grid: tuple[int, ...]
    epochs_grid: tuple[int, ...]
    tau_grid: tuple[float, ...] = (0.05, 0.1, 0.2, 1.0)  # 1.0 is the paper's value
    val_per_class: int = 50
    # Each seed is a backfill order and an initialisation and batch order of the transforms;
    # the backbones keep one seed each (their variance is not covered by these).
    seeds: tuple[int, ...] = (0, 1, 2)
    # Caps on the TransformConfig fields an objective fixes itself (its own recipe, e.g.
    # ml-fct's 80 epochs of a 2048-wide MLP): the smoke profile only proves the code runs.
    fixed_caps: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class Profile:
    """How big a run is: `smoke` proves every line runs on a small real subset, `cpu` fits
    a 2-core CPU, `paper` is ResNet-18 on one GPU. Each data set brings its own backbone
    recipe for each profile (`rmlib.methods.recipes`); the transforms' recipe is shared."""

    name: str
    transforms: TransformRecipe
    backbone_seeds: tuple[int, ...] = (0, 1, 2)  # of the backbone-seeds study; 0: Table 1's


# The cpu width grid stops at 512: a 1024-wide psi/rho scores 0.6 pt more validation
# AUC_mAP than 512 but fits 2.1x slower (benchmarks/transform_recipes.py), and six fits
# plus the search must share the 60-minute budget with four backbones.
PROFILES: dict[str, Profile] = {
    "smoke": Profile("smoke", TransformRecipe(2, 128, 1, (64, 128), (2, 3),
                                              fixed_caps=(("epochs", 2), ("hidden", 64))),
                     backbone_seeds=(0, 1)),
    "cpu": Profile("cpu", TransformRecipe(6, 512, 3, (256, 512), (6, 12))),
    "paper": Profile("paper", TransformRecipe(20, 512, 10, (256, 512, 1024), (20, 40))),
}


def profile(name: str) -> Profile:
    if name not in PROFILES:
        raise RmlibError(f"{name!r} is not a profile; use one of {', '.join(PROFILES)}")
    return PROFILES[name]


@dataclass(frozen=True)
class Paths:
    """Where data is read, runs are cached and results with provenance are written."""

    data: Path
    runs: Path
    results: Path

    @classmethod
    def default(cls) -> Paths:
        """The repository's `data/` in a checkout; `~/.rmlib` when rmlib is installed as a
        package (e.g. on Colab), whose site-packages is no place for data."""
        home = REPO_ROOT / "data" if (REPO_ROOT / "pyproject.toml").exists() else \
            Path.home() / ".rmlib"
        return cls(home, home / "runs", home / "results")


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


@dataclass(frozen=True)
class Config:
    """Everything a run needs to know that is not an argument: the profile, the paths,
    and how this machine may run (downloads, precision, the commit of a copied tree)."""

    profile: Profile
    paths: Paths
    download: bool = True
    precision: str | None = None  # None: chosen per device (rmlib.engine.precision_mode)
    commit: str | None = None
    device: str | None = None  # None: a GPU when there is one, else the CPU

    @property
    def torch_device(self) -> torch.device:
        """Where the runner trains backbones and transforms and evaluates backfills: the
        one choice of device (the library's functions default to the same rule)."""
        return torch.device(self.device) if self.device else default_device()

    @property
    def name(self) -> str:
        return self.profile.name

    @classmethod
    def from_env(cls, profile_name: str | None = None,
                 environ: Mapping[str, str] | None = None) -> Config:
        """The configuration the environment asks for; `profile_name` overrides
        RMLIB_PROFILE. The only function in rmlib that reads the environment."""
        env = os.environ if environ is None else environ
        name = profile_name or env.get("RMLIB_PROFILE") or default_profile_name()
        default = Paths.default()

        def path(var: str, fallback: Path) -> Path:
            return Path(env[var]).expanduser().resolve() if env.get(var) else fallback

        data = path("RMLIB_DATA", default.data)
        paths = Paths(data, path("RMLIB_RUNS", default.runs),
                      path("RMLIB_RESULTS", default.results))
        precision = env.get("RMLIB_PRECISION") or None
        if precision not in (None, "fp32", "bf16"):
            raise RmlibError(f"RMLIB_PRECISION={precision!r}; use fp32 or bf16, or unset it")
        device = env.get("RMLIB_DEVICE") or None
        if device is not None:
            _check_device(device)
        # the commit is read once, here, so that a run's results record the code it started
        # with even if the repository moves on during an hour of training; a tree copied
        # without its .git (a borrowed GPU machine) is told it by RMLIB_COMMIT
        commit = env.get("RMLIB_COMMIT") or git_commit()
        return cls(profile(name), paths, env.get("RMLIB_DOWNLOAD", "1") not in
                   ("0", "false", "no"), precision, commit, device)

    def results_folder(self, dataset: str) -> Path:
        """Where this profile's results files of `dataset` live (table1.json, ...)."""
        return self.paths.results / dataset / self.name

    def with_paths(self, **paths: Path) -> Config:
        """The same configuration with some paths replaced (data=, runs=, results=)."""
        return replace(self, paths=replace(self.paths, **{k: Path(v) for k, v in paths.items()}))

    def with_profile(self, name: str) -> Config:
        return replace(self, profile=profile(name))


def default_profile_name() -> str:
    return "paper" if torch.cuda.is_available() else "cpu"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_device(name: str) -> None:
    """RMLIB_DEVICE names a device this machine has, or one line that says not."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RmlibError(f"RMLIB_DEVICE={name!r} is not a device; use cpu, cuda or cuda:N, "
                         "or unset it") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RmlibError(f"RMLIB_DEVICE={name!r} but this machine has no GPU that torch can "
                         "use; use cpu, or unset it")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise RmlibError(f"RMLIB_DEVICE={name!r} but this machine has "
                         f"{torch.cuda.device_count()} GPU(s), cuda:0 to cuda:"
                         f"{torch.cuda.device_count() - 1}")
    if device.type not in ("cpu", "cuda"):
        raise RmlibError(f"RMLIB_DEVICE={name!r}: rmlib runs on cpu or cuda")


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
