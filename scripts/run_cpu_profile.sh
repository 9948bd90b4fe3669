#!/usr/bin/env bash
# The cpu-profile run whose results are committed under data/results/cifar100/cpu/.
# Backbones first (issue: old+new budget), then everything else Table 1 needs, then the
# spread over backbone seeds that the Table 1 chapter shows beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
export RMLIB_PROFILE=cpu PYTHONUNBUFFERED=1
/usr/bin/time -v python -m rmlib train cifar100 both --quiet
/usr/bin/time -v python -m rmlib reproduce cifar100 --quiet
/usr/bin/time -v python -m rmlib study backbone-seeds cifar100 --quiet
