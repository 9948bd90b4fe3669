"""Execute the book's chapters in place, so that the committed notebooks carry real outputs.

    RMLIB_PROFILE=cpu python scripts/execute_chapters.py [book/chapter.ipynb ...]

Without arguments, every chapter listed in _toc.yml. Run it after the profile's results
exist (`python -m rmlib reproduce ...`): chapters then read the cache and run quickly.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def chapters() -> list[Path]:
    toc = (ROOT / "_toc.yml").read_text()
    return [ROOT / f"{name}.ipynb" for name in re.findall(r"file:\s*(\S+)", toc)
            if (ROOT / f"{name}.ipynb").exists()]


def main() -> None:
    paths = [Path(p).resolve() for p in sys.argv[1:]] or chapters()
    for path in paths:
        start = time.time()
        nb = nbformat.read(path, as_version=4)
        NotebookClient(nb, timeout=3600, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
        nb.metadata.pop("widgets", None)  # progress bars are for readers, not the record
        nbformat.write(nb, path)
        print(f"{path.relative_to(ROOT)}: executed in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
