# GPU bench rows of issue 19: APOLLO, APOLLO-Mini and Fira against apollo-torch and fira, eager and compiled
# (the 350m rows of petra and fira were measured by the same command with --presets 350m in an earlier call)
set -u
pip install -q --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
export PYTHONPATH=/tmp/site:src
I=petra-apollo,apollo,petra-apollo-mini,apollo-mini,petra-fira,fira
timeout 150 python3 benchmarks/bench.py --presets 350m --impls apollo,apollo-mini,apollo:compile,apollo-mini:compile \
  --steps 8 --warmup 3 --out $OUT/bench-350m-apollo.json > $OUT/bench-350m-apollo.log 2>&1
grep -E "^\| 350m" $OUT/bench-350m-apollo.log
timeout 420 python3 benchmarks/bench.py --presets 1b --impls $I,$(echo $I | sed 's/,/:compile,/g'):compile \
  --steps 8 --warmup 3 --out $OUT/bench-1b.json > $OUT/bench-1b.log 2>&1
echo "bench exit $?"
grep -E "^\|" $OUT/bench-1b.log
