# The device-side skip of non-finite steps (GaLoreOptimizer.step(found_inf=...)) against the
# host check it replaces, in one lease: `.before/` holds the earlier source
#   rm -rf .before && mkdir .before && git archive <commit> src benchmarks | tar -x -C .before
# then on the device (wheels from .whl/ go to /tmp/site; results in $OUT):
#   bash benchmarks/skip_regression.sh
set -u
pip install -q --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"
# the CUDA variants of the skip and optimizer tests (CI runs the CPU ones)
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_skip.py tests/test_galore.py -k cuda 2>&1 | tail -4
B="benchmarks/bench.py --steps 10 --warmup 2 --presets 60m,350m"
IMPLS=petra-galore:compile,petra-galore8bit:compile
timeout 200 python3 .before/$B --impls $IMPLS --out "$OUT/before.json" > "$OUT/before.log" 2>&1
echo "before exit $?"
timeout 200 python3 $B --impls $IMPLS,petra-full:compile,galore-torch:compile --out "$OUT/after.json" \
  > "$OUT/after.log" 2>&1
echo "after exit $?"
timeout 60 python3 benchmarks/bench.py --steps 3 --warmup 2 --presets 60m --impls petra-galore:compile --profile 3 \
  --out "$OUT/profile.json" > "$OUT/profile.log" 2>&1
echo "profile exit $?"
python3 benchmarks/bench.py --merge "$OUT/before.json" "$OUT/after.json" | head -20
grep -A 24 "host time ==" "$OUT/profile.log" | cut -c1-150
