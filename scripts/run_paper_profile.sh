#!/usr/bin/env bash
# The paper-profile run (ResNet-18, one GPU), as one script: the backbones first (their
# results file is complete before anything else starts), then every Table 1 row.
# Results: data/results/cifar100/paper/. With COPY_TO set, each results file is copied
# there as soon as it exists (a borrowed machine returns only what is in that folder).
set -uo pipefail
cd "$(dirname "$0")/.."
export RMLIB_PROFILE=paper PYTHONUNBUFFERED=1
results=data/results/cifar100/paper
copy() { [ -n "${COPY_TO:-}" ] && cp -f "$results"/*.json "$COPY_TO"/ 2>/dev/null; true; }
python -c "import torch; assert torch.cuda.is_available(), 'no GPU: the paper profile needs one'"
start=$(date +%s)
python -m rmlib train cifar100 both --quiet || exit 1
echo "backbones: $(( $(date +%s) - start )) s"; copy
python -m rmlib reproduce cifar100 --quiet; status=$?
echo "total: $(( $(date +%s) - start )) s"; copy
exit $status
