# The speed issue's one-session table (docs/benchmarks.md, sixth session): every petra method
# and every peer package, compiled, at 60m / 350m / 1b, in two device calls of under 10
# minutes each: `bash benchmarks/speed_table.sh a` then `bash benchmarks/speed_table.sh b`.
# Rows are written as they finish ($OUT/*.json); the table and ratios over both calls:
#   python benchmarks/bench.py --merge docs/bench/session6/*.json
set -u
pip install -q --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
export PYTHONPATH=/tmp/site:src
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, peft, galore_torch, bitsandbytes, torchao; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__, 'torchao', torchao.__version__)"
B="python3 benchmarks/bench.py --steps 5 --warmup 2"
run() {  # name, seconds, bench arguments...
  local name=$1 limit=$2
  shift 2
  timeout "$limit" $B "$@" --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  echo "$name exit $?"
  grep -E '^\| (60m|350m|1b) \| [a-z]' "$OUT/$name.log" | grep -v ' x |' | head -40
}
P=petra-full:compile,petra-galore:compile,petra-galore8bit:compile,petra-galore8bit-lw:compile,petra-apollo:compile,petra-apollo-mini:compile,petra-fira:compile,petra-relora:compile
if [ "${1:-a}" = a ]; then
  run a-60m 100 --presets 60m --impls petra-full:compile,petra-galore:compile,galore-torch:compile
  run a-350m 440 --presets 350m --impls $P,hf-full:compile,galore-torch:compile,galore-torch-8bit:compile,apollo:compile,apollo-mini:compile,fira:compile,hf-adamw8bit:compile,hf-lora:compile
else  # call a's galore-torch rows failed (the wheel was not carried); they run here
  run b-1b-mb64 100 --presets 1b --micro 1b=64 --impls petra-full:compile
  run b-60m 60 --presets 60m --impls galore-torch:compile
  run b-350m 110 --presets 350m --impls galore-torch:compile,galore-torch-8bit:compile
  run b-1b 310 --presets 1b --impls ${P%,petra-relora:compile},hf-full:compile,galore-torch:compile,apollo:compile,\
apollo-mini:compile,hf-adamw8bit:compile,hf-full,galore-torch-8bit:compile,petra-relora:compile
fi
