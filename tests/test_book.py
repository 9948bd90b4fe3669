"""The book builds strictly (-W --keep-going) and every chapter of _toc.yml is in it."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
