#!/usr/bin/env bash
# Step time of `petra train` for two source trees in one device session, alternating:
#   git worktree add /tmp/old <rev> && mkdir -p .carry/old && cp -r /tmp/old/src .carry/old/
#   ROUNDS="1 2" bash benchmarks/steptime.sh      (on the device; wheels from .whl/ go to /tmp/site)
# Writes $OUT/steptime.log: each run's 20-step windows and their median (docs/architecture/steptime.log).
set -u
OUT=${OUT:-.}
pip install -q --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
for round in ${ROUNDS:-1 2}; do
for v in old new; do
  if [ $v = old ]; then src=.carry/old/src; else src=src; fi
  for spec in "60m galore" "350m full" "60m galore8bit --layerwise"; do
    set -- $spec
    d=/tmp/st_${v}_$1_$2_$round; rm -rf $d
    PYTHONPATH=/tmp/site:$src timeout 200 python3 -m petra train --preset $1 --method $2 ${3:-} --steps 120 --batch-size 64 --log-every 20 --eval-every 1000 --save-every 0 --no-progress --set data.cache_dir=/tmp/pc --out $d > $d.log 2>&1 || tail -5 $d.log
    python3 -c "
import json,statistics
r=[json.loads(l) for l in open('$d/metrics.jsonl') if 'step_ms' in l]
ms=[x['step_ms'] for x in r][2:]
print('round $round $v $1 $2 ${3:-}: step_ms windows', ms, 'median', statistics.median(ms), 'peak', r[-1]['peak_mem_gib'])" | tee -a $OUT/steptime.log
  done
done
done
PYTHONPATH=/tmp/site:src python3 -m pytest -q -x tests/test_galore.py tests/test_adamw.py tests/test_model.py -k "cuda or compiled" 2>&1 | tail -3 | tee -a $OUT/steptime.log
