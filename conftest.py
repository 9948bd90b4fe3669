"""Repository-wide pytest set-up: chapters run under nbval in the smoke profile, offline.

Environment variables set here reach the notebook kernels that nbval starts.
"""

import os

os.environ.setdefault("RMLIB_PROFILE", "smoke")
os.environ.setdefault("RMLIB_DOWNLOAD", "0")
os.environ.setdefault("MPLBACKEND", "Agg")

collect_ignore_glob = ["_build/*", "data/*", "benchmarks/*"]
