"""The book builds strictly (-W --keep-going): a broken reference or chapter fails here."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("jupyter-book") is None, reason="jupyter-book not installed")
def test_book_builds_strictly(tmp_path):
    done = subprocess.run(
        ["jupyter-book", "build", str(ROOT), "-W", "--keep-going", "--path-output", str(tmp_path)],
        capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    html = tmp_path / "_build" / "html"
    assert (html / "book" / "intro.html").is_file()
    assert (html / "book" / "own_upgrade.html").is_file()
