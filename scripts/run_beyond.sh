#!/usr/bin/env bash
# The cpu-profile runs of the "Beyond the paper" chapter, whose results are committed under
# data/results/cifar100/cpu/ (order_policies.json, heterogeneous.json). Run after
# scripts/run_cpu_profile.sh: they reuse its cached backbones, transforms and embeddings.
set -euo pipefail
cd "$(dirname "$0")/.."
export RMLIB_PROFILE=cpu PYTHONUNBUFFERED=1
/usr/bin/time -v python -m rmlib study orders cifar100 --quiet
/usr/bin/time -v python -m rmlib study heterogeneous cifar100 --quiet
# "Beyond the paper, part two" (book/beyond_two): closed-form psi beside the trained ones,
# and the open-class protocol (its own old, new and BCT backbones: most of its time)
/usr/bin/time -v python -m rmlib study closed-form cifar100 --quiet
/usr/bin/time -v python -m rmlib study open-class cifar100 --quiet
# The upgrade chain: a third model (the better of two candidates, chosen on held-out training
# images) arriving when the first backfill is a quarter, half or three quarters done
/usr/bin/time -v python -m rmlib study chain cifar100 --quiet
