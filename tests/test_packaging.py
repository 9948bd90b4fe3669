"""The package declares what it imports."""

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_pyproject_declares_every_third_party_import_of_rmlib():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_name(r) for r in project["dependencies"]}
    declared |= {_name(r) for extra in project["optional-dependencies"].values() for r in extra}
    distributions = packages_distributions()
    missing = set()
    for path in (ROOT / "rmlib").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for top in {n.split(".")[0] for n in names}:
                if top in sys.stdlib_module_names or top == "rmlib":
                    continue
                dists = {_name(d) for d in distributions.get(top, [top])}
                if not dists & declared:
                    missing.add(f"{top} ({path.relative_to(ROOT)})")
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"


def test_every_module_names_the_chapter_that_explains_it():
    """As d2l's code names its chapter: a reader of rmlib finds the page, and a reader of
    the book the code."""
    toc = (ROOT / "_toc.yml").read_text()
    for path in sorted((ROOT / "rmlib").rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        named = re.findall(r"book/(\w+)", doc.split("Explained in the book:")[-1])
        assert "Explained in the book:" in doc and named, path.relative_to(ROOT)
        for chapter in named:
            assert f"book/{chapter}" in toc, f"{path.relative_to(ROOT)} names book/{chapter}"


def test_the_device_is_chosen_once_by_the_configuration():
    from rmlib import RmlibError
    from rmlib.config import Config

    assert Config.from_env("smoke", environ={"RMLIB_DEVICE": "cpu"}).torch_device.type == "cpu"
    assert Config.from_env("smoke", environ={}).device is None  # a GPU when there is one
    for bad, message in (("tpu", "not a device"), ("cuda:0", "no GPU")):
        try:
            import torch

            if bad.startswith("cuda") and torch.cuda.is_available():
                continue
            Config.from_env("smoke", environ={"RMLIB_DEVICE": bad})
        except RmlibError as exc:
            assert message in str(exc)
        else:
            raise AssertionError(f"RMLIB_DEVICE={bad} was accepted")
