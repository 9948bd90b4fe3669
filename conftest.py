"""Repository-wide pytest set-up: chapters run under nbval in the smoke profile.

The data are found the way rmlib finds them (`RMLIB_DATA`, else this repository's `data/`),
for the tests and for the chapters' kernels alike. When CIFAR-100 is not there and
downloads are allowed (`RMLIB_DOWNLOAD` unset or 1), it is fetched once, here, before any
test (md5-checked, unpacked atomically, with a progress bar); the tests and chapters
themselves never download. Without the data (no copy and no network, or
`RMLIB_DOWNLOAD=0`), the chapters that need it (notebook metadata `rmlib.needs_data`) are
skipped with one line that says how to provide it, and everything else runs.

Environment variables set here reach the notebook kernels that nbval starts.
"""

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("RMLIB_PROFILE", "smoke")
os.environ.setdefault("MPLBACKEND", "Agg")
for _var in ("RMLIB_DATA", "RMLIB_RUNS", "RMLIB_RESULTS"):  # kernels run inside book/
    if os.environ.get(_var):
        os.environ[_var] = os.path.abspath(os.environ[_var])

collect_ignore_glob = ["_build/*", "data/*", "benchmarks/*"]

_MISSING: dict[str, str] = {}  # dataset -> why it is not available


def _provide_cifar100(config: pytest.Config) -> None:
    """Find CIFAR-100 (or fetch it once), then point every test and kernel at its root."""
    from rmlib import RmlibError
    from rmlib.config import Config
    from rmlib.data import cifar100_dir, fetch_cifar100

    try:
        settings = Config.from_env("smoke")
    except RmlibError as exc:  # a bad RMLIB_* variable: one line, not an INTERNALERROR
        pytest.exit(f"rmlib: error: {exc}", returncode=2)
    root = settings.paths.data.resolve()
    folder = cifar100_dir(root)
    if folder.is_dir() and not (folder / "test").is_file():  # a broken copy: never fetched over
        _MISSING["cifar100"] = (f"{folder} is incomplete (no test file); remove it to download "
                                "it again, or set RMLIB_DATA to a complete copy")
    elif not folder.is_dir():
        if settings.download:
            capture = config.pluginmanager.getplugin("capturemanager")
            with capture.global_and_fixture_disabled():  # the progress bar is seen
                print(f"\nCIFAR-100 is not at {root}: downloading it once (about 170 MB)")
                try:
                    fetch_cifar100(root)
                except RmlibError as exc:
                    _MISSING["cifar100"] = str(exc)
                    print(f"{exc}\n(the chapters that need it are skipped)")
        else:
            _MISSING["cifar100"] = (
                f"CIFAR-100 is not at {cifar100_dir(root)} and RMLIB_DOWNLOAD=0; set "
                "RMLIB_DATA to a folder that holds cifar-100-python/, or allow the download")
    os.environ["RMLIB_DATA"] = str(root)
    os.environ["RMLIB_DOWNLOAD"] = "0"  # fetched above if at all: no test downloads


def pytest_sessionstart(session: pytest.Session) -> None:
    _provide_cifar100(session.config)


def _needs_data(notebook: Path) -> list[str]:
    try:
        metadata = json.loads(notebook.read_text())["metadata"]
    except (OSError, ValueError, KeyError):
        return []
    return list(metadata.get("rmlib", {}).get("needs_data", []))


# Markers by where a test lives (pyproject.toml registers them): `-m "not slow"` is the
# fast loop of unit tests; the README's test command runs everything.
_MARKERS_BY_FILE = {
    "tests/book/test_book.py": ("book",),
    "tests/book/test_browser.py": ("book", "browser"),
    "tests/serving/test_milvus.py": ("milvus",),
}
_SLOW_MARKERS = {"book", "browser", "milvus"}
_SLOW_FIXTURES = {"cifar_root", "smoke_config"}  # trains or embeds on real CIFAR-100


def _mark(item: pytest.Item, root: Path) -> None:
    path = Path(str(item.fspath))
    names = ("book",) if path.suffix == ".ipynb" else \
        _MARKERS_BY_FILE.get(path.relative_to(root).as_posix(), ())
    for name in names:
        item.add_marker(name)
    if _SLOW_MARKERS & set(names) or _SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
        item.add_marker("slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test by where it lives and what it needs; skip, with one line, the cells
    of chapters whose data is missing."""
    verdicts: dict[Path, pytest.MarkDecorator | None] = {}
    for item in items:
        _mark(item, config.rootpath)
        path = Path(str(item.fspath))
        if path.suffix != ".ipynb":
            continue
        if path not in verdicts:
            missing = [_MISSING[d] for d in _needs_data(path) if d in _MISSING]
            verdicts[path] = pytest.mark.skip(reason=f"chapter needs data: {missing[0]}") \
                if missing else None
        if verdicts[path] is not None:
            item.add_marker(verdicts[path])
