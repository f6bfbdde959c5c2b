# 7b peak memory of APOLLO-Mini layer-wise (8-bit and fp32 moments), and its quality at 60m
set -u
pip install -q --no-deps --target /tmp/site .whl/torchao*.whl > /dev/null 2>&1
export PYTHONPATH=/tmp/site:src
common="--set data.source=.carry/prep --set data.cache_dir=/tmp/pc --set train.save_every=0 --no-progress"
for m in apollo-mini8bit apollo-mini; do
  timeout 200 python3 -m petra train --preset 7b --method $m --layerwise --steps 6 --batch-size 1 --log-every 1 \
    --set train.grad_clip=0 --set model.activation_checkpointing=true --set train.eval_every=1000 \
    --set train.val_tokens=2048 $common --out /tmp/7b-$m > $OUT/7b-$m.log 2>&1
  echo "$m exit $?"; grep -E "peak|done|Error" $OUT/7b-$m.log | tail -3
  cp /tmp/7b-$m/summary.json $OUT/7b-$m.summary.json; cp /tmp/7b-$m/metrics.jsonl $OUT/7b-$m.metrics.jsonl
  rm -rf /tmp/7b-$m
done
timeout 150 python3 -m petra train --preset 60m --method apollo-mini8bit --layerwise --steps 300 --batch-size 64 \
  --lr 0.00125 --set train.grad_clip=0 --set train.compile=off --set train.eval_every=100 $common \
  --out /tmp/q60 > $OUT/60m-apollo-mini8bit-layerwise.log 2>&1
echo "60m exit $?"; tail -2 $OUT/60m-apollo-mini8bit-layerwise.log; cp /tmp/q60/summary.json $OUT/60m-apollo-mini8bit-layerwise.summary.json
