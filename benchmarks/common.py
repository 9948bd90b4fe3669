"""What every benchmark shares: its command line, the configuration, and its result file
(with provenance, written atomically under `<results>/benchmarks/`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rmlib.config import Config
from rmlib.outputs import check_output, write_json
from rmlib.provenance import provenance


def parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by the first line of the benchmark's docstring, with --out."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--out", type=Path, help="the result file (default: under "
                   "<results>/benchmarks/, the folder RMLIB_RESULTS names)")
    return p


class Benchmark:
    """One benchmark run: its configuration (from the environment, once), its clock, and
    where its result goes."""

    def __init__(self, name: str, out: Path | None = None, profile: str | None = None):
        self.config = Config.from_env(profile)  # with the commit of the code it started with
        self.path = out or self.config.paths.results / "benchmarks" / f"{name}.json"
        check_output(self.path, "--out")  # before the measurement, not after it
        self.profile = profile
        self.start = time.time()

    def write(self, result: dict, config: dict) -> Path:
        """`result` with its provenance (`config`: what was measured, and how)."""
        result["provenance"] = provenance(config, time.time() - self.start,
                                          commit=self.config.commit, profile=self.profile)
        write_json(self.path, result)
        print(f"wrote {self.path}")
        return self.path
