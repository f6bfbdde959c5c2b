# The speed issue's one-session table (docs/benchmarks.md, eighth session): every petra method
# and the peer packages, compiled, at 60m / 350m / 1b, in three device calls of under 10
# minutes each on one lease: `bash benchmarks/speed_table.sh a`, then `b`, then `c`. Rows are
# written as they finish ($OUT/*.json); the table and ratios over all calls:
#   python benchmarks/bench.py --merge docs/bench/session8/*.json
# Parts d and e are the tenth session's (docs/bench/session10): Muon's whole step at 350m and 1b,
# and APOLLO / Fira updating in stacks at 350m.
# Parts f, g and h are the eleventh session's (docs/bench/session11): every method again after the
# low-rank step stopped waiting for its own skip flag, with the peers, at 60m / 350m (f), 1b (g)
# and the 350m peers (h). Part i measures what that session changed without a GPU. Part j is the
# twelfth session's (docs/bench/session12): liger-kernel's kernels against torch's. Parts l, m
# and n are the thirteenth session's (docs/bench/session13), described where they are.
# Call a also runs the CUDA tests of the optimizers and times layer-wise 8-bit before the
# stacked layer-wise update, from `.before/`:
#   rm -rf .before && mkdir .before && git archive 94dd883 src benchmarks | tar -x -C .before
# (The sixth session's two-call version of this script is `git show 21a720e:benchmarks/speed_table.sh`.)
set -u
pip install -q --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, peft, galore_torch, bitsandbytes, torchao; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__, 'torchao', torchao.__version__)"
B="benchmarks/bench.py --steps 8 --warmup 2"
run() {  # name, seconds, bench arguments... (a .before/ bench when the name starts with "before")
  local name=$1 limit=$2 root=.
  shift 2
  [ "${name#before}" != "$name" ] && root=.before
  timeout "$limit" python3 $root/$B "$@" --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  echo "$name exit $? at ${SECONDS}s"
  grep -E '^\| (60m|350m|1b) \| [a-z]' "$OUT/$name.log" | grep -v ' x |' | head -40
}
P=petra-full:compile,petra-galore:compile,petra-galore8bit:compile,petra-galore8bit-lw:compile,petra-apollo:compile
P=$P,petra-apollo-mini:compile,petra-fira:compile,petra-relora:compile,petra-muon:compile,petra-adam-mini:compile
case "${1:-a}" in
a)
  timeout 80 python3 -m pytest -q -p no:cacheprovider -p no:warnings tests/test_galore.py tests/test_skip.py \
    -k "cuda and (stack or skip)" 2>&1 | tail -3
  run a-60m 120 --presets 60m --impls petra-full:compile,petra-galore:compile,petra-galore8bit:compile,galore-torch:compile,galore-torch-8bit:compile
  run before-a-350m 95 --presets 350m --impls petra-galore8bit-lw:compile
  run a-350m 270 --presets 350m --impls $P
  ;;
b)
  run b-350m 320 --presets 350m --impls hf-full:compile,hf-adamw8bit:compile,galore-torch:compile,galore-torch-8bit:compile,apollo:compile,apollo-mini:compile,fira:compile,hf-lora:compile
  run b-350m-profile 60 --presets 350m --impls petra-full:compile --profile 2
  run b-1b-mb64 150 --presets 1b --micro 1b=64 --impls petra-full:compile --profile 2
  ;;
c)  # galore-torch and fira at 1b (an exact SVD refresh of about 40 s, three a row) are left out
  run c-1b 500 --presets 1b --impls petra-full:compile,petra-galore:compile,petra-galore8bit:compile,\
petra-galore8bit-lw:compile,hf-full:compile,petra-relora:compile,petra-apollo:compile,petra-apollo-mini:compile,\
petra-muon:compile,petra-adam-mini:compile,petra-fira:compile,hf-adamw8bit:compile,apollo-mini:compile,hf-lora:compile
  ;;
d)  # the tenth session (issue 35): Muon's whole step after the stacked Newton-Schulz, beside full rank
    # and the low-rank methods at 350m (profiled) and 1b
  L=petra-full:compile,petra-muon:compile,petra-galore:compile,petra-apollo-mini:compile,petra-fira:compile
  run d-350m 200 --presets 350m --impls $L,petra-relora:compile --profile 2
  run d-1b 330 --presets 1b --impls $L,petra-relora:compile
  ;;
e)  # APOLLO, APOLLO-Mini and Fira updating in stacks of one shape, beside full rank, at 350m
  run e-350m 170 --presets 350m --impls petra-full:compile,petra-apollo-mini:compile,petra-apollo:compile,petra-fira:compile
  ;;
f)  # 60m with galore-torch; 350m every petra method, profiled for one step (host syncs)
  run f-60m 150 --presets 60m --impls petra-full:compile,petra-galore:compile,petra-galore8bit:compile,\
petra-apollo-mini:compile,petra-fira:compile,galore-torch:compile,galore-torch-8bit:compile
  run f-350m 260 --presets 350m --impls $P --profile 1
  ;;
g)  # 1b: every petra method, ReLoRA also at the ReLoRA paper's rank 128 (its 1.3B run)
  run g-1b 540 --presets 1b --impls $P,petra-relora+r128:compile
  ;;
h)  # the 350m peers beside petra's full rank
  run h-350m 400 --presets 350m --impls petra-full:compile,hf-full:compile,hf-adamw8bit:compile,\
galore-torch:compile,galore-torch-8bit:compile,apollo:compile,apollo-mini:compile,fira:compile,hf-lora:compile
  ;;
i)  # what the eleventh session changed without a GPU: Adam-mini in multi-tensor kernels, Adam-mini's
    # and Muon's device-side skip, Fira's back-projections in bf16; against the tree before them in
    # .before/ (git archive 85d1b2c src benchmarks); peft LoRA at 350m, which call h did not reach.
    # The FSDP2 stacks: PLAIN=1 MODES=fsdp PRESET=350m bash benchmarks/scaling.sh
  run i-350m 200 --presets 350m --impls petra-full:compile,petra-adam-mini:compile,petra-muon:compile,petra-fira:compile,hf-lora:compile
  run before-i-350m 120 --presets 350m --impls petra-full:compile,petra-adam-mini:compile,petra-fira:compile
  run i-1b 200 --presets 1b --impls petra-full:compile,petra-fira:compile,petra-apollo:compile
  ;;
j)  # the twelfth session: full rank with liger-kernel's Triton kernels (train.kernels=liger) beside
    # torch's, compiled both, profiled (GPU time by kind of kernel); the liger tests first
  timeout 150 python3 -m pytest -q -p no:cacheprovider -p no:warnings tests/test_kernels.py 2>&1 | tail -3
  run j-1b 300 --presets 1b --micro 1b=64 --impls petra-full:compile,petra-full+liger:compile --profile 2
  run j-350m 200 --presets 350m --impls petra-full:compile,petra-full+liger:compile,petra-galore:compile,\
petra-galore+liger:compile --profile 1
  ;;
k)  # the twelfth session: where Fira's and ReLoRA's step goes at 1b (micro-batch 64, beside part j's
    # profiled full rank in the same lease)
  run k-1b 190 --presets 1b --micro 1b=64 --impls petra-relora:compile,petra-fira:compile --profile 1
  ;;
l)  # the thirteenth session (docs/bench/session13): every petra method and galore-torch at 60m, and
    # the GaLore family at 350m, after the norms stacked ('+nostack': one at a time, in the same
    # call); each profiled for a step, GPU busy time against the step (host-bound or not)
  run l-60m 230 --presets 60m --impls petra-full:compile,petra-galore:compile,petra-galore+nostack:compile,\
petra-galore8bit:compile,petra-apollo:compile,petra-apollo-mini:compile,petra-apollo-mini+nostack:compile,\
petra-fira:compile,petra-relora:compile,petra-muon:compile,petra-adam-mini:compile,galore-torch:compile,\
galore-torch-8bit:compile --profile 1
  run l-350m 250 --presets 350m --impls petra-full:compile,petra-galore:compile,petra-galore+nostack:compile,\
petra-apollo:compile,petra-apollo-mini:compile,petra-apollo-mini+nostack:compile,petra-fira:compile,\
petra-relora:compile --profile 1
  ;;
m)  # the thirteenth session: 1b, every petra method (ReLoRA also at rank 128), each profiled for a step
  run m-1b 560 --presets 1b --impls petra-full:compile,petra-fira:compile,petra-relora:compile,petra-apollo:compile,\
petra-apollo-mini:compile,petra-galore:compile,petra-galore8bit:compile,petra-muon:compile,petra-adam-mini:compile,\
petra-galore8bit-lw:compile,petra-relora+r128:compile --profile 1
  ;;
n)  # the thirteenth session: the rest of 350m's petra methods and the 350m peers beside full rank
  run n-350m 420 --presets 350m --impls petra-full:compile,petra-galore8bit:compile,petra-muon:compile,\
petra-adam-mini:compile,hf-full:compile,galore-torch:compile,apollo:compile,apollo-mini:compile,fira:compile,\
hf-lora:compile,hf-adamw8bit:compile,galore-torch-8bit:compile,petra-galore8bit-lw:compile
  ;;
o)  # the thirteenth session: APOLLO's and Fira's element-wise update compiled ('+fuse') against op by
    # op in the same call, at 1b; the fused update's tests on the GPU first. (As run there, the
    # default was fused and the suffix '+nofuse': the rows are named so in docs/bench/session13.)
  timeout 100 python3 -m pytest -q -p no:cacheprovider -p no:warnings tests/test_apollo.py -k fused 2>&1 | tail -30
  run o-1b 300 --presets 1b --impls petra-full:compile,petra-apollo+fuse:compile,petra-apollo:compile,\
petra-fira+fuse:compile,petra-fira:compile,petra-apollo-mini+fuse:compile --profile 1
  ;;
esac
python3 benchmarks/bench.py --merge "$OUT"/*.json 2>&1 | grep -v ' x |' | tail -30
