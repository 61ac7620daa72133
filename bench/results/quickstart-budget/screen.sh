#!/usr/bin/env bash
# quickstart-budget candidates on the quickstart's 100k-transition set
. .venv/bin/activate
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 NUMBA_NUM_THREADS=1
D=runs/qs/hopper-medium-sim-v4.hdf5
printf 'learning_rate: 3.0e-4\n' > runs/qsx/lr3.yaml
run() { # name, args...
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
run cos --lr-schedule cosine
run cos-ema99 --lr-schedule cosine --ema-decay 0.99
run cos-lr3 --lr-schedule cosine --config runs/qsx/lr3.yaml
run cos-lr3-ema99 --lr-schedule cosine --ema-decay 0.99 --config runs/qsx/lr3.yaml
run cos-lr3-ef5 --lr-schedule cosine --config runs/qsx/lr3.yaml --episode-fraction 0.5
