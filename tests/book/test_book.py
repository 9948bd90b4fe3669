"""The book builds strictly (-W --keep-going) and every chapter of _toc.yml is in it."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_book_builds_strictly_with_every_chapter(built_book):
    chapters = re.findall(r"file:\s*(\S+)", (ROOT / "_toc.yml").read_text())
    for chapter in chapters + ["book/intro"]:
        assert (built_book / f"{chapter}.html").is_file(), chapter


def test_committed_chapters_carry_outputs_and_no_errors():
    import json

    for path in sorted((ROOT / "book").glob("*.ipynb")):
        nb = json.loads(path.read_text())
        outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"]]
        assert outputs, f"{path.name} was committed without outputs: run it first"
        assert not [o for o in outputs if o["output_type"] == "error"], path.name


def test_every_chapter_has_a_colab_launch_and_cites_rmlib_code():
    import json

    config = (ROOT / "_config.yml").read_text()
    assert "colab_url" in config and "repository:" in config
    for path in sorted((ROOT / "book").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        sources = ["".join(c["source"]) for c in cells]
        assert any("google.colab" in s for s in sources), f"{path.name}: no Colab install cell"


def test_committed_outputs_carry_no_progress_bars_or_widget_warnings():
    import json

    for path in sorted((ROOT / "book").glob("*.ipynb")):
        nb = json.loads(path.read_text())
        assert "widgets" not in nb.get("metadata", {}), f"{path.name}: widget state committed"
        for cell in nb["cells"]:
            for out in cell.get("outputs", []):
                text = "".join(out.get("text", "")) + json.dumps(out.get("data", {}))
                assert "IProgress not found" not in text, path.name
                assert "widget-view+json" not in text, f"{path.name}: a progress bar committed"
                assert "it/s]" not in text, f"{path.name}: a text progress bar committed"


def test_the_colab_cell_clones_the_repository_so_results_and_scripts_come_with_it():
    import json

    for path in sorted((ROOT / "book").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        colab = next("".join(c["source"]) for c in cells if "google.colab" in "".join(c["source"]))
        assert "git clone" in colab and "--depth 1" in colab, path.name
        assert "pip install" in colab, path.name


def test_chapters_run_commands_with_the_kernels_interpreter():
    """`!python -m rmlib` would run whichever python is first on PATH (perhaps one without
    rmlib); `!{sys.executable} -m rmlib` runs the kernel's own, activated or not."""
    import json

    for path in sorted((ROOT / "book").glob("*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] != "code":
                continue
            for line in "".join(cell["source"]).splitlines():
                assert not re.match(r"\s*!\s*python3?\s", line), f"{path.name}: {line.strip()}"


def test_chapters_that_need_data_say_so():
    """The repository's conftest.py skips a chapter without its data only if the chapter's
    metadata names it; a chapter that opens CIFAR-100's experiments must."""
    import json

    for path in sorted((ROOT / "book").glob("*.ipynb")):
        nb = json.loads(path.read_text())
        code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
        opens_cifar = re.search(r"open_chapter\(|load_cifar100\(", code) is not None
        declared = "cifar100" in nb["metadata"].get("rmlib", {}).get("needs_data", [])
        assert declared or not opens_cifar, f"{path.name} needs CIFAR-100 but does not say so"


def test_without_the_data_a_chapter_that_needs_it_is_skipped_with_one_line(tmp_path):
    """A fresh clone without CIFAR-100 and without a network: the test command stays green,
    and says how to provide the data."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "RMLIB_DATA": str(tmp_path), "RMLIB_DOWNLOAD": "0"}
    done = subprocess.run([sys.executable, "-m", "pytest", "book/rho.ipynb", "-q",
                           "-p", "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:]
    assert re.search(r"\d+ skipped", done.stdout) and "passed" not in done.stdout
    reasons = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    assert reasons and all("chapter needs data: CIFAR-100 is not at" in r and
                           "set RMLIB_DATA" in r for r in reasons)
    assert list(tmp_path.iterdir()) == []  # nothing downloaded, nothing made
