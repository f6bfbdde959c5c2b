# issue 21: a 60m model trained on the device (GaLore, the tuned 5e-3, 600 steps), then petra generate from it
set -u
common="--set data.source=.carry/prep --set data.cache_dir=/tmp/pc --no-progress"
python3 -m petra train --preset 60m --method galore --lr 5e-3 --steps 600 --batch-size 64 --set train.eval_every=200 \
  --set train.save_every=0 $common --out /tmp/g60 > $OUT/train.log 2>&1; echo "train exit $?"; tail -1 $OUT/train.log
for p in "In the beginning" "And Jesus said unto them" "To be, or not to be"; do
  /usr/bin/time -f "%e s" python3 -m petra generate /tmp/g60 --prompt "$p" --max-new-tokens 60 --temperature 0.8 --seed 0
  echo
done 2>&1 | tee $OUT/samples.txt
python3 -m petra generate /tmp/g60 --prompt "In the beginning" --max-new-tokens 60 --temperature 0 | tee -a $OUT/samples.txt
