"""Whether two results folders hold the same numbers: the check that a refactoring kept
behaviour. Every JSON file of the first folder is compared with the file of the same path
in the second, key by key, bit for bit, leaving out what differs between any two runs
(provenance, wall times, throughputs).

    python scripts/same_results.py BEFORE_RESULTS AFTER_RESULTS
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# what two runs of the same code on the same machine differ in
RUN_KEYS = {"provenance", "eval_seconds", "train_wall_time_s", "seconds", "images_per_s",
            "wall_time_s", "run"}


def differences(a: object, b: object, where: str = "") -> list[str]:
    """Paths at which `a` and `b` differ, RUN_KEYS left out."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = (set(a) | set(b)) - RUN_KEYS
        return [d for k in sorted(keys) for d in
                ([f"{where}/{k}: only on one side"] if (k in a) != (k in b) else
                 differences(a[k], b[k], f"{where}/{k}"))]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} items against {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b or (a != a and b != b) else [f"{where}: {a!r} against {b!r}"]  # NaN


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    files = sorted(p.relative_to(args.before) for p in args.before.rglob("*.json"))
    if not files:
        print(f"no results files under {args.before}", file=sys.stderr)
        return 2
    different = 0
    for name in files:
        other = args.after / name
        found = differences(json.loads((args.before / name).read_text()),
                            json.loads(other.read_text())) if other.is_file() else \
            ["missing on the second side"]
        different += bool(found)
        print(f"{name}: " + ("identical" if not found else
                             f"{len(found)} differences, first {found[:3]}"))
    return 1 if different else 0


if __name__ == "__main__":
    sys.exit(main())
