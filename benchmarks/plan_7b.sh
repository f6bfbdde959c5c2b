#!/usr/bin/env bash
# petra plan at 7b on the device (issue 21): the 7b rows of plan_validation's grid, then
# `petra plan` end to end for a 16 GiB card, its probe capped at 16 GiB on the H100.
set -u
OUT=${OUT:-.}
pip install -q --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
export PYTHONPATH=/tmp/site:src
cp docs/plan/probes.json $OUT/probes.json
timeout 330 python3 benchmarks/plan_validation.py --probe --presets 7b --probe-out $OUT/probes.json > $OUT/validation_7b.md 2>&1
echo "validation exit $?"; head -3 $OUT/validation_7b.md | cut -c1-300
timeout 240 python3 -m petra plan --preset 7b --gpu-mem 16GiB --batch-size 2 > $OUT/plan_7b_16gib.txt 2>&1
echo "plan exit $?"; cut -c1-260 $OUT/plan_7b_16gib.txt
