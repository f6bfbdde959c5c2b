#!/usr/bin/env bash
# One GPU: petra's plain path against the distributed path at world size 1 (torchrun with
# one process, DDP and FSDP2), per method, same config. Prints tokens/s and peak memory.
#   PRESET=60m STEPS=60 CACHE=~/.cache/petra bash benchmarks/parallel_overhead.sh
set -euo pipefail
PRESET=${PRESET:-60m}; STEPS=${STEPS:-60}; OUT=${OUT:-runs/parallel}; CACHE=${CACHE:-~/.cache/petra}
METHODS=${METHODS:-full galore relora}; MODES=${MODES:-plain ddp fsdp}
common=(--preset "$PRESET" --steps "$STEPS" --batch-size 64 --eval-every 100000 --save-every 0 --log-every 10
        --no-progress --set "data.cache_dir=$CACHE")
mkdir -p "$OUT"
for method in $METHODS; do
  for mode in $MODES; do
    out=$OUT/$method-$mode
    rm -rf "$out"
    if [ "$mode" = plain ]; then
      python3 -m petra train "${common[@]}" --method "$method" --out "$out" > "$out.log" 2>&1
    else
      python3 -m torch.distributed.run --standalone --nproc_per_node 1 -m petra train "${common[@]}" \
        --method "$method" --set "train.parallel=$mode" --out "$out" > "$out.log" 2>&1
    fi
  done
done
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
rows = {}
for s in sorted(Path(sys.argv[1]).glob("*/summary.json")):
    method, mode = s.parent.name.rsplit("-", 1)
    rows.setdefault(method, {})[mode] = json.loads(s.read_text())
print("| method | mode | tokens/s | vs plain | peak GiB | optimizer state MiB |")
print("|---|---|---|---|---|---|")
for method, modes in rows.items():
    base = modes.get("plain", {}).get("tokens_per_s")
    for mode, s in modes.items():
        ratio = f"{s['tokens_per_s'] / base:.3f}" if base else ""
        print(f"| {method} | {mode} | {s['tokens_per_s']:,.0f} | {ratio} | {s['peak_mem_gib']:.2f} | "
              f"{s['optimizer_state_bytes'] / 2**20:.1f} |")
PY
