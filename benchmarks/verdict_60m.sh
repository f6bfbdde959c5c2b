#!/usr/bin/env bash
# docs/verdict.md's 60m compare on one H200, in device calls of under 10 minutes each:
#   bash benchmarks/verdict_60m.sh a      # full, galore, fira, apollo-mini (tuned, 2 seeds)
#   bash benchmarks/verdict_60m.sh b      # relora, muon, adam-mini
#   bash benchmarks/verdict_60m.sh jobs   # a small compare's wall time with --jobs 1 and --jobs 4
# Each of a and b writes $OUT/cmp-PART.tgz: its runs' own files (config, summary, metrics;
# no checkpoints or tokenizers). The report of all seven is then made on any machine from
# those files, with the same flags and every method (nothing is retrained):
#   tar xzf cmp-a.tgz && tar xzf cmp-b.tgz && cp -r verdict-b/. verdict-a/
#   petra compare $FLAGS --methods full,galore,fira,apollo-mini,relora,muon,adam-mini --out verdict-a
# .carry/prep: `petra data build` with the corpus extra, then
# `petra data prepare data/corpus --out .carry/prep --vocab-size 32000` (20.0M training tokens).
# PRESET, STEPS, DATA, JOBS override the settings for a smoke test on a CPU.
set -uo pipefail
part=${1:?part: a, b or jobs}
OUT=${OUT:-/tmp/verdict-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then  # adam-mini is not in the device image
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
FLAGS=(--preset "${PRESET:-60m}" --steps "${STEPS:-2400}" --batch-size 64 --data "${DATA:-.carry/prep}" --compile off
       --no-progress --set train.save_every=0 --set train.threads=2)
TUNED=(--tune --tune-points 3 --seeds 2 --jobs "${JOBS:-8}")
case $part in
  a) methods=full,galore,fira,apollo-mini ;;
  b) methods=relora,muon,adam-mini ;;
  jobs)
    for j in 1 4; do
      start=$(date +%s%N)
      python3 -m petra compare "${FLAGS[@]}" --steps "${STEPS:-600}" --methods full,galore,apollo-mini,muon \
        --jobs $j --out "/tmp/jobs-$j-$$" > "$OUT/jobs-$j.log" 2>&1
      echo "compare of 4 methods, --jobs $j: exit $?, $(( ($(date +%s%N) - start) / 1000000 )) ms wall"
      grep -A8 "^## Cost" "/tmp/jobs-$j-$$/comparison.md"
    done
    exit 0 ;;
  *) echo "part must be a, b or jobs"; exit 2 ;;
esac
run=/tmp/verdict-$part-$$
start=$(date +%s%N)
timeout -s TERM "${LIMIT:-560}" python3 -m petra compare "${FLAGS[@]}" "${TUNED[@]}" --methods $methods --out "$run" \
  > "$OUT/$part.log" 2>&1
echo "compare $part: exit $?, $(( ($(date +%s%N) - start) / 1000000 )) ms wall"
tar czf "$OUT/cmp-$part.tgz" -C /tmp --exclude=checkpoint.pt --exclude=tokenizer.json --exclude=.petra.lock \
  --transform "s,^verdict-$part-$$,verdict-$part," "verdict-$part-$$"
grep -E "^(compare|[a-z-]+: (chose|at step))" "$OUT/$part.log" | tail -30
grep -A12 "^## Quality" "$run/comparison.md"
