#!/usr/bin/env bash
# petra plan on the device (issue 21): probes of configurations the memory model was not fitted
# on, the estimate against them and every measured peak in docs/, then `petra plan` end to end.
#   bash benchmarks/plan_device.sh          (wheels from .whl/ go to /tmp/site; results in $OUT)
set -u
OUT=${OUT:-.}
pip install -q --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
export PYTHONPATH=/tmp/site:src
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
FITTED="docs/bench/session4_h100.json docs/bench/session5_h100.json docs/bench/h100_60m_350m_peers.json
  docs/bench/h100_350m_apollo_bnb.json docs/bench_new_methods/bench-350m.json docs/bench_new_methods/bench-1b.json"
timeout ${VALIDATION_S:-500} python3 benchmarks/plan_validation.py --probe --probe-out $OUT/probes.json $FITTED \
  --out $OUT/validation.json > $OUT/validation.md 2>&1; echo "validation exit $?"
tail -14 $OUT/validation.md
