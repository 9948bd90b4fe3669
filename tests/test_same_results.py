"""scripts/same_results.py: the check that a refactoring kept every number."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "same_results.py"


def _write(folder: Path, auc: float, wall: float) -> None:
    (folder / "cifar100" / "smoke").mkdir(parents=True)
    body = {"rows": {"RM": {"auc_mAP": auc, "mAP": [0.1, float("nan")], "eval_seconds": wall}},
            "provenance": {"wall_time_s": wall, "git_commit": str(wall)}}
    (folder / "cifar100" / "smoke" / "table1.json").write_text(json.dumps(body))


def _compare(a: Path, b: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(a), str(b)], capture_output=True,
                          text=True)


def test_runs_that_differ_only_in_time_and_provenance_are_the_same(tmp_path):
    _write(tmp_path / "a", 0.25, 1.0)
    _write(tmp_path / "b", 0.25, 2.0)
    done = _compare(tmp_path / "a", tmp_path / "b")
    assert done.returncode == 0 and "table1.json: identical" in done.stdout


def test_a_number_that_moved_in_the_last_bit_is_a_difference(tmp_path):
    _write(tmp_path / "a", 0.25, 1.0)
    _write(tmp_path / "b", 0.25 + 2 ** -54, 1.0)
    done = _compare(tmp_path / "a", tmp_path / "b")
    assert done.returncode == 1 and "/rows/RM/auc_mAP: 0.25 against 0.25000000000000006" in \
        done.stdout
