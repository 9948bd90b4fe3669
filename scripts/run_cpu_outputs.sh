#!/usr/bin/env bash
# After scripts/run_cpu_profile.sh: the benchmarks the book shows, then every chapter
# executed in the cpu profile (their outputs are what the published book renders).
# Everything expensive is cached, so only what changed is recomputed.
set -euo pipefail
cd "$(dirname "$0")/.."
export RMLIB_PROFILE=cpu PYTHONUNBUFFERED=1
python -m benchmarks.backbone_recipes
python -m benchmarks.transform_recipes
python -m benchmarks.bench_transform_step
python -m benchmarks.bench_serving --cifar100 cpu --nlist 100 --nprobe 8 --queries 1000
python -m benchmarks.bench_serving --n 1000000 --queries 500 --repeats 2
python scripts/execute_chapters.py
