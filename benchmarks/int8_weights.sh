#!/usr/bin/env bash
# docs/int8_weights.md: LLaMA-7B with int8 weights (stochastic rounding), and what int8 weights
# and bf16 moments cost in quality at 60m. On one H200, in device calls of under 10 minutes:
#   bash benchmarks/int8_weights.sh 7b        # 7b peaks through the CLI, then `petra plan --gpu-mem 12GiB`
#   BLOCK=256 bash benchmarks/int8_weights.sh quality-a # 60m APOLLO-Mini, 2400 x 64 x 256: bf16 weights / int8
#                                                       # stochastic, 2 seeds (the first table: blocks of 256)
#   BLOCK=256 bash benchmarks/int8_weights.sh quality-b # the same: int8 round-to-nearest / bf16 moments, 2 seeds
#   TAG=x LIMIT=540 bash benchmarks/int8_weights.sh quality  # bf16 / int8 stochastic / int8 nearest (blocks
#                                                       # of 64), 2 seeds, 6 runs; again with the same TAG resumes
#   bash benchmarks/int8_weights.sh rounding-cpu       # CPU: stochastic vs nearest at a rate where updates are small
# .carry/prep: the prepared 60m corpus of docs/verdict.md (20.0M training tokens, 32000-token BPE).
# Every run of a part trains side by side with the others (one process each); runs in bf16
# weights are compiled, int8 ones run eagerly (the same numbers, slower).
set -uo pipefail
part=${1:?part: 7b, probe, quality-a, quality-b, quality or rounding-cpu}
OUT=${OUT:-/tmp/int8-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
tag=$$
common=(--data "${DATA:-.carry/prep}" --no-progress --set train.threads=2)
case $part in
  7b)
    seven=(--preset 7b --layerwise --grad-clip 0 --batch-size 1 --steps 6 --lr 1e-4 --log-every 1
           --set model.activation_checkpointing=true --set train.eval_every=1000 --set train.val_tokens=2048
           --set train.save_every=0)
    for spec in "apollo-mini8bit stochastic auto" "apollo-mini stochastic bf16"; do
      read -r m w mo <<< "$spec"
      name=7b-$m-$w-$mo
      timeout 200 python3 -m petra train "${seven[@]}" "${common[@]}" --method "$m" \
        --set method.int8_weights="$w" --set method.moments="$mo" --out "/tmp/$name-$tag" > "$OUT/$name.log" 2>&1
      echo "$name: exit $?; $(grep -E 'peak' "$OUT/$name.log" | tail -1)"
      cp "/tmp/$name-$tag/summary.json" "$OUT/$name.summary.json" 2>/dev/null
      cp "/tmp/$name-$tag/metrics.jsonl" "$OUT/$name.metrics.jsonl" 2>/dev/null
      rm -rf "/tmp/$name-$tag"
    done
    python3 -m petra estimate --preset 7b --method apollo-mini8bit,apollo-mini --layerwise --set train.grad_clip=0 \
      --set model.activation_checkpointing=true --set method.int8_weights=stochastic > "$OUT/7b-estimate.txt"
    timeout 240 python3 -m petra plan --preset 7b --batch-size 1 --gpu-mem 12GiB --methods apollo-mini8bit \
      > "$OUT/7b-plan-12GiB.txt" 2>&1
    echo "plan: exit $?"; cat "$OUT/7b-plan-12GiB.txt" | tail -15
    ;;
  probe)  # petra plan's probe of the 7b setting, uncapped and under the 12 GiB plan's cap
    for cap in none 11.5; do
      PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 150 python3 - "$cap" > "$OUT/7b-probe-$cap.txt" 2>&1 <<'PY'
import json, sys, traceback
import torch
from petra.config import build_config
from petra.plan import probe
cfg = build_config(overrides={"preset": "7b", "method.name": "apollo-mini8bit", "train.batch_size": 1,
    "method.layerwise": True, "train.grad_clip": 0.0, "model.activation_checkpointing": True,
    "method.int8_weights": "stochastic"})
cap = None if sys.argv[1] == "none" else float(sys.argv[1])
try:
    print(json.dumps(probe(cfg, cap)))
except torch.OutOfMemoryError:
    traceback.print_exc()
print(torch.cuda.memory_summary(abbreviated=True))
PY
      echo "probe cap $cap: $(grep -E '^\{|OutOfMemory' "$OUT/7b-probe-$cap.txt" | head -2 | cut -c1-300)"
    done
    ;;
  quality-a | quality-b | quality)
    # int8 runs at the block of $BLOCK (default 64; the first table's runs: BLOCK=256). Runs live in
    # /tmp/q-NAME-SEED-$TAG and save every 300 steps: past $LIMIT seconds they are stopped (SIGTERM:
    # they save), and the same command with the same TAG on a warm machine resumes them.
    case $part in
      quality-a) specs=("bf16 off auto on" "int8sr stochastic auto off") ;;
      quality-b) specs=("int8rtn nearest auto off" "bf16moments off bf16 on") ;;
      quality) specs=("bf16 off auto on" "int8sr stochastic auto off" "int8rtn nearest auto off") ;;
    esac
    tag=${TAG:-$tag}
    pids=()
    for spec in "${specs[@]}"; do
      read -r name w mo c <<< "$spec"
      for seed in 0 1; do
        d=/tmp/q-$name-$seed-$tag
        if [ -f "$d/checkpoint.pt" ]; then
          where=(--resume "$d")
        else
          where=(--out "$d" --preset "${PRESET:-60m}" --method apollo-mini --lr 5e-3 --steps "${STEPS:-2400}"
                 --batch-size 64 --seed $seed --compile $c --set method.int8_weights=$w
                 --set method.int8_block="${BLOCK:-64}" --set method.moments=$mo --set train.save_every=300
                 --set train.eval_every=300 "${common[@]}")
        fi
        timeout -s TERM "${LIMIT:-100000}" python3 -m petra train "${where[@]}" >> "$OUT/60m-$name-$seed.log" 2>&1 &
        pids+=($!)
      done
    done
    start=$(date +%s)
    for p in "${pids[@]}"; do wait "$p"; echo "run $p exit $?"; done
    echo "wall $(( $(date +%s) - start )) s"
    for spec in "${specs[@]}"; do
      read -r name _ <<< "$spec"
      for seed in 0 1; do
        d=/tmp/q-$name-$seed-$tag
        cp "$d/summary.json" "$OUT/60m-$name-$seed.summary.json" 2>/dev/null
        cp "$d/metrics.jsonl" "$OUT/60m-$name-$seed.metrics.jsonl" 2>/dev/null
        echo "$name seed $seed: $(tail -1 "$OUT/60m-$name-$seed.log")"
      done
    done
    ;;
  rounding-cpu)  # CPU: the tiny preset, APOLLO-Mini, 300 x 16 x 128, at lr 1e-3 and 1e-4: fp32 weights,
    # int8 stochastic, int8 nearest (blocks of 64); at the low rate most updates are below half a step
    for lr in 1e-3 1e-4; do
      for w in off stochastic nearest; do
        python3 -m petra train --preset tiny --method apollo-mini --lr $lr --steps 300 --batch-size 16 --threads 1 \
          --no-progress --set method.int8_weights=$w --set train.save_every=0 --out "/tmp/r-$lr-$w-$tag" \
          > "$OUT/tiny-$lr-$w.log" 2>&1
        echo "lr $lr, int8_weights $w: $(tail -1 "$OUT/tiny-$lr-$w.log" | cut -d';' -f1)"
        rm -rf "/tmp/r-$lr-$w-$tag"
      done
    done
    ;;
  *) echo "part must be 7b, probe, quality-a, quality-b, quality or rounding-cpu"; exit 2 ;;
esac
