"""Repository-wide pytest set-up: chapters run under nbval in the smoke profile, offline.

Environment variables set here reach the notebook kernels that nbval starts.
"""

import os

os.environ.setdefault("RMLIB_PROFILE", "smoke")
os.environ.setdefault("RMLIB_DOWNLOAD", "0")
os.environ.setdefault("MPLBACKEND", "Agg")
for _var in ("RMLIB_DATA", "RMLIB_RUNS", "RMLIB_RESULTS"):  # kernels run inside book/
    if os.environ.get(_var):
        os.environ[_var] = os.path.abspath(os.environ[_var])

collect_ignore_glob = ["_build/*", "data/*", "benchmarks/*"]
