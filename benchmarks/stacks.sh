# Low-rank matrices of one shape updated as one stack (GaLoreOptimizer._shape_batches) against
# one at a time, in one lease: `.before/` holds the source before stacking
#   rm -rf .before && mkdir .before && git archive 16419aa src benchmarks | tar -x -C .before
# then on the device (wheels from .whl/ go to /tmp/site; results in $OUT):
#   bash benchmarks/stacks.sh      (tests, sync points, before/after at 60m and 350m)
#   bash benchmarks/stacks.sh b    (layer-wise 8-bit against the plain step at 350m, then 1b)
set -u
pip install -q --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
T="timeout 150 python3 -m pytest -q -p no:cacheprovider -p no:warnings"
if [ "${1:-a}" = b ]; then
  $T tests/test_skip.py tests/test_galore.py -k "cuda" --tb=short 2>&1 | tail -4
  timeout 40 python3 benchmarks/sync_points.py --kind 8bit 2>&1 | tail -8
  B="python3 benchmarks/bench.py --steps 8 --warmup 2"
  timeout 130 $B --presets 350m --impls petra-galore8bit:compile,petra-galore8bit-lw:compile --out "$OUT/lw.json" \
    > "$OUT/lw.log" 2>&1
  echo "lw exit $?"
  timeout 120 $B --presets 1b --impls petra-full:compile,petra-galore:compile --out "$OUT/1b.json" > "$OUT/1b.log" 2>&1
  echo "1b exit $?"
  python3 benchmarks/bench.py --merge "$OUT"/*.json 2>&1 | head -8
  exit 0
fi
$T tests/test_galore.py -k "cuda" 2>&1 | tail -3
$T tests/test_skip.py -k "cuda" --tb=short 2>&1 | tail -40
for kind in 8bit galore; do timeout 60 python3 benchmarks/sync_points.py --kind $kind 2>&1 | tail -30; done
B="benchmarks/bench.py --steps 8 --warmup 2 --presets 60m,350m"
IMPLS=petra-galore:compile,petra-galore8bit:compile
timeout 190 python3 .before/$B --impls $IMPLS --out "$OUT/before.json" > "$OUT/before.log" 2>&1
echo "before exit $?"
timeout 240 python3 $B --impls $IMPLS,petra-full:compile,galore-torch:compile,galore-torch-8bit:compile \
  --out "$OUT/after.json" > "$OUT/after.log" 2>&1
echo "after exit $?"
python3 benchmarks/bench.py --merge "$OUT/before.json" "$OUT/after.json" | head -16
