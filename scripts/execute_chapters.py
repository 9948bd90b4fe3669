"""Execute the book's chapters in place, so that the committed notebooks carry real outputs.

    RMLIB_PROFILE=cpu python scripts/execute_chapters.py [--keep-uncomputable] [book/X.ipynb ...]

Without chapter arguments, every chapter listed in _toc.yml. Run it after the profile's
results exist (`python -m rmlib reproduce ...`): chapters then read the cache and run quickly.

--keep-uncomputable: a cell that cannot run here because the profile's run cache is missing
(it raises rmlib.notebook.NeedsRun, or fails on a name such a cell defines) keeps the outputs
committed with it, but only if its source is unchanged since that commit; any other error,
or a changed cell that cannot run, stops the script. Every kept cell is listed.
"""

from __future__ import annotations

import re
import subprocess
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


def committed_outputs(path: Path) -> dict[str, list]:
    """Outputs of each code cell of the committed chapter (HEAD), keyed by the cell's source."""
    shown = subprocess.run(["git", "show", f"HEAD:{path.relative_to(ROOT)}"], cwd=ROOT,
                           capture_output=True, text=True)
    if shown.returncode != 0:
        return {}
    nb = nbformat.reads(shown.stdout, as_version=4)
    return {c.source: c.outputs for c in nb.cells if c.cell_type == "code"}


def keep_uncomputable(nb, path: Path) -> list[int]:
    """Give the cells that failed for want of the run cache their committed outputs back: a
    cell that raised NeedsRun, and after one, a cell that failed on a name such a cell
    defines (NameError). The cell must be unchanged and its committed outputs error-free."""
    before, kept = committed_outputs(path), []
    for i, cell in enumerate(nb.cells):
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        if not errors:
            continue
        name = errors[0]["ename"]
        uncomputable = name == "NeedsRun" or (name == "NameError" and kept)
        old = before.get(cell.source)
        if not uncomputable or old is None or any(o.get("output_type") == "error" for o in old):
            raise SystemExit(f"{path.name}, cell {i}: {name}: {errors[0]['evalue'][:300]}")
        cell.outputs = old
        kept.append(i)
    return kept


def main() -> None:
    args = sys.argv[1:]
    keep = "--keep-uncomputable" in args
    paths = [Path(p).resolve() for p in args if p != "--keep-uncomputable"] or chapters()
    for path in paths:
        start = time.time()
        nb = nbformat.read(path, as_version=4)
        NotebookClient(nb, timeout=3600, kernel_name="python3", allow_errors=keep,
                       resources={"metadata": {"path": str(path.parent)}}).execute()
        kept = keep_uncomputable(nb, path) if keep else []
        nb.metadata.pop("widgets", None)  # progress bars are for readers, not the record
        nbformat.write(nb, path)
        note = f"; cells {kept} keep their committed outputs (no run cache here)" if kept else ""
        print(f"{path.relative_to(ROOT)}: executed in {time.time() - start:.0f} s{note}")


if __name__ == "__main__":
    main()
