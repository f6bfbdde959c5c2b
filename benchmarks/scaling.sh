#!/usr/bin/env bash
# Tokens/s per GPU and peak memory per GPU of every method that runs sharded, at 1, 2, 4 and 8
# GPUs (as many as the machine has), under FSDP2 and DDP, compiled, the same total batch:
#   PRESET=1b BATCH=64 bash benchmarks/scaling.sh          # a machine of several GPUs
# Rows go to $OUT/scaling-N.json as they finish; the table and ratios over all of them:
#   python benchmarks/bench.py --merge $OUT/scaling-*.json
# MODES picks the modes (default "fsdp ddp"); PLAIN=1 adds each method's plain path (no
# torchrun strategy) to the 1-GPU run, to set world-1 FSDP2 against it (docs/distributed.md):
#   PLAIN=1 MODES=fsdp PRESET=350m METHODS="apollo fira" bash benchmarks/scaling.sh
# (Written for issue 33; not yet run on several GPUs: no such machine was lent. Adam-mini and
# GaLore-Adafactor were added when they came to run under FSDP2.)
set -u
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-runs/scaling}; PRESET=${PRESET:-1b}; BATCH=${BATCH:-64}
mkdir -p "$OUT"
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
METHODS=${METHODS:-full galore galore8bit galore-adafactor apollo apollo-mini fira relora muon adam-mini}
impls=""; plain=""
for m in $METHODS; do
  plain="$plain,petra-$m:compile"
  for mode in ${MODES:-fsdp ddp}; do impls="$impls,petra-$m:compile@$mode"; done
done
impls=${impls#,}
for n in 1 2 4 8; do
  [ "$n" -le "$GPUS" ] || break
  run=$impls
  [ "$n" = 1 ] && [ -n "${PLAIN:-}" ] && run="${plain#,},$impls"
  python3 -m torch.distributed.run --standalone --nproc_per_node "$n" benchmarks/bench.py --presets "$PRESET" \
    --batch "$BATCH" --steps 8 --warmup 2 --impls "$run" --out "$OUT/scaling-$n.json" > "$OUT/scaling-$n.log" 2>&1
  echo "$n GPU(s): exit $?"
done
python3 benchmarks/bench.py --merge "$OUT"/scaling-*.json
