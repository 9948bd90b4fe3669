"""Shared fixtures. Tests never download (the repository's conftest.py fetches the data
once, before them, when it may), and caches go to a temp folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def real_data_root() -> Path | None:
    """The folder holding real CIFAR-100, found as rmlib and the chapters find it
    (RMLIB_DATA, else the repository's data/), or None."""
    from rmlib.config import Config

    root = Config.from_env("smoke").paths.data
    return root if (root / "cifar-100-python" / "test").is_file() else None


NO_DATA = ("real CIFAR-100 not available: set RMLIB_DATA to a folder that holds "
           "cifar-100-python/ (or run once with a network to download it)")


@pytest.fixture
def cifar_root() -> Path:
    root = real_data_root()
    if root is None:
        pytest.skip(NO_DATA)
    return root


@pytest.fixture(autouse=True)
def _isolated_runs(tmp_path, monkeypatch):
    """Runs and results of a test go to its own folder (for commands run in a subprocess
    or through the CLI, which build their configuration from the environment)."""
    monkeypatch.setenv("RMLIB_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("RMLIB_RESULTS", str(tmp_path / "results"))


@pytest.fixture
def config_of(tmp_path):
    """A profile's configuration with this test's own runs and results folders."""
    from rmlib.config import Config

    def make(profile: str):
        return Config.from_env(profile).with_paths(runs=tmp_path / "runs",
                                                   results=tmp_path / "results")
    return make


@pytest.fixture
def smoke_config(cifar_root, config_of):
    """The smoke profile on the real CIFAR-100."""
    return config_of("smoke").with_paths(data=cifar_root)


def clustered(n: int, dim: int, classes: int, noise: float, seed: int, scale: float = 1.0):
    """Labels and embeddings with class structure, for evaluator tests."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, dim))
    x = scale * (centres[labels] + noise * rng.normal(size=(n, dim)))
    return labels, x.astype(np.float32)


@pytest.fixture(scope="session")
def built_book(tmp_path_factory) -> Path:
    """The book built once per session, strictly (-W --keep-going): its HTML folder."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("jupyter_book") is None:
        pytest.skip("jupyter-book is not installed in this interpreter "
                    "(pip install -r requirements.txt)")
    out = tmp_path_factory.mktemp("book")
    root = Path(__file__).resolve().parents[1]
    # through this interpreter, not whichever jupyter-book is first on PATH
    cli = "from jupyter_book.cli.main import main; main()"
    done = subprocess.run(
        [sys.executable, "-c", cli, "build", str(root), "-W", "--keep-going", "--path-output",
         str(out)], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out / "_build" / "html"
