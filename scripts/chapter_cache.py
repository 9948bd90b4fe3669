"""Re-make the run cache that the chapters read, for results that are already committed:
the old and new backbones (`python -m rmlib train DATASET both` first) and the transforms the
chapters name, fitted with the settings the results were made with (no settings search).

    RMLIB_PROFILE=cpu python scripts/chapter_cache.py [rqt mcl mcl-rho ...]

Use it on a machine that has the committed results but not the run that made them, before
`scripts/execute_chapters.py`. It checks that each transform's configuration is the one the
results record, so the chapters show what their tables measured.
"""

from __future__ import annotations

import sys
import time

from rmlib.engine.transforms import TransformConfig
from rmlib.notebook import open_chapter

CHAPTER_TRANSFORMS = ("rqt", "mcl", "mcl-rho")  # named by the rqt, mcl, rho, serving chapters


def main() -> None:
    names = tuple(sys.argv[1:]) or CHAPTER_TRANSFORMS
    chapter = open_chapter()
    exp = chapter.experiment()  # NeedsRun if the backbones are not cached: train them first
    exp.progress = True
    recorded = chapter.provenance["config"]["transforms"]
    for name in names:
        start = time.time()
        fitted = exp.transform(name)
        if fitted.config.key() != TransformConfig(**recorded[name]).key():
            raise SystemExit(f"{name}: fitted {fitted.config}, but the results record "
                             f"{recorded[name]}")
        print(f"{name}: {fitted.config.key()} ready in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
