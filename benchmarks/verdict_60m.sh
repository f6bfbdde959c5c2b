#!/usr/bin/env bash
# docs/verdict.md's 60m compare on one H200, in device calls of under 10 minutes each:
#   LIMIT=530 bash benchmarks/verdict_60m.sh search   # --tune (successive halving) of full, galore, fira,
#                                                    # apollo-mini, eager, 8 at once (stopped after its first rung)
#   LIMIT=465 bash benchmarks/verdict_60m.sh final    # every method, 2 seeds, 6 at once, at the rates chosen
#   RUN=/tmp/verdict-final-PID LIMIT=440 bash benchmarks/verdict_60m.sh final   # the same compare, resumed
# Each writes $OUT/cmp-PART.tgz: its runs' own files (config, summary, metrics; no checkpoints
# or tokenizers), from which the report can be made again anywhere (nothing is retrained).
# `final` then times one galore run alone, compiled and eager, for the side-by-side gain.
# .carry/prep: `petra data build` with the corpus extra, then
# `petra data prepare data/corpus --out .carry/prep --vocab-size 32000` (20.0M training tokens).
# PRESET, STEPS, DATA, JOBS override the settings for a smoke test on a CPU.
set -uo pipefail
part=${1:?part: search or final}
OUT=${OUT:-/tmp/verdict-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then  # adam-mini is not in the device image
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
FLAGS=(--preset "${PRESET:-60m}" --steps "${STEPS:-2400}" --batch-size 64 --data "${DATA:-.carry/prep}"
       --no-progress --set train.save_every=0 --set train.threads=2)
case $part in
  search)
    run=${RUN:-/tmp/verdict-search-$$}
    cmd=(--compile off --tune --tune-points 3 --seeds 2 --jobs "${JOBS:-8}" --methods full,galore,fira,apollo-mini) ;;
  final)
    run=${RUN:-/tmp/verdict-final-$$}
    cmd=(--compile on --seeds 2 --jobs "${JOBS:-6}" --methods full,galore,fira,apollo-mini,relora,muon,adam-mini
         --lrs full=1e-3,galore=1e-2,fira=5e-3,apollo-mini=5e-3) ;;
  *) echo "part must be search or final"; exit 2 ;;
esac
start=$(date +%s%N)
timeout -s TERM "${LIMIT:-560}" python3 -m petra compare "${FLAGS[@]}" "${cmd[@]}" --out "$run" >> "$OUT/$part.log" 2>&1
echo "compare $part: exit $?, $(( ($(date +%s%N) - start) / 1000000 )) ms wall"
tar czf "$OUT/cmp-$part.tgz" -C "$(dirname "$run")" --exclude=checkpoint.pt --exclude=tokenizer.json \
  --exclude=.petra.lock --transform "s,^$(basename "$run"),verdict-$part," "$(basename "$run")"
grep -E "^(compare|   |[a-z-]+: (chose|at step))" "$OUT/$part.log" | tail -30
if [ "$part" = final ]; then
  for c in on off; do  # one run alone, compiled and eager
    timeout 45 python3 -m petra train "${FLAGS[@]}" --compile $c --method galore --lr 1e-2 --stop-after 150 \
      --set train.eval_every=100000 --out "/tmp/alone-$c-$$" > "$OUT/alone-$c.log" 2>&1
    echo "galore alone, compile $c: $(grep -o '"step_ms": [0-9.]*' "/tmp/alone-$c-$$/metrics.jsonl" | tail -3 | tr '\n' ' ')"
  done
  grep -A6 "^## Verdict" "$run/comparison.md"
fi
