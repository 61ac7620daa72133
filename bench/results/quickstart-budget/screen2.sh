#!/usr/bin/env bash

while pgrep -f qsx/screen.sh >/dev/null; do sleep 10; done
. .venv/bin/activate
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 NUMBA_NUM_THREADS=1
D=runs/qs/hopper-medium-sim-v4.hdf5
printf 'learning_rate: 1.0e-3\n' > runs/qsx/lr10.yaml
printf 'learning_rate: 6.0e-4\n' > runs/qsx/lr6.yaml
run() {
  local n=$1; shift
  [ -f runs/qsx/$n.done ] && return
  rm -rf runs/qsx/$n
  local t0=$(date +%s)
  dmm train --dataset $D --store runs/qsx/$n --updates ${U:-2000} --seed 0 --eval-episodes 0 --no-progress "$@" > runs/qsx/$n.train.log 2>&1
  local t1=$(date +%s)
  for m in window recurrent; do
    dmm eval --store runs/qsx/$n --name hopper-medium-sim-v4 --episodes 20 --mode $m --target-return 3600 2>/dev/null | tail -1 > runs/qsx/$n.$m.txt
  done
  echo "$n train_s=$((t1-t0)) $(cat runs/qsx/$n.window.txt) | $(cat runs/qsx/$n.recurrent.txt)" >> runs/qsx/summary.txt
  touch runs/qsx/$n.done
}
run cos-lr10 --lr-schedule cosine --config runs/qsx/lr10.yaml
run cos-lr6 --lr-schedule cosine --config runs/qsx/lr6.yaml
U=4000 run u4k-cos-lr6 --lr-schedule cosine --config runs/qsx/lr6.yaml
U=4000 run u4k-cos-lr10 --lr-schedule cosine --config runs/qsx/lr10.yaml
