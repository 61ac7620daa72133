#!/usr/bin/env bash
# Short-budget candidates on the quick start's 100k-transition set, one after another (run from the
# repository root); each line of summary.txt: a setting, its wall time, window and recurrent scores.
. .venv/bin/activate
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 NUMBA_NUM_THREADS=1
D=runs/qs/hopper-medium-sim-v4.hdf5
for lr in 3.0e-4 6.0e-4 1.0e-3; do printf 'learning_rate: %s\n' $lr > runs/qsx/lr-$lr.yaml; done
run() { # name, flags...
  local n=$1; shift
  rm -rf runs/qsx/$n
  local t0=$(date +%s)
  dmm train --dataset $D --store runs/qsx/$n --updates ${U:-2000} --seed 0 --eval-episodes 0 --no-progress "$@" \
    > runs/qsx/$n.train.log 2>&1
  local t1=$(date +%s)
  for m in window recurrent; do
    dmm eval --store runs/qsx/$n --name hopper-medium-sim-v4 --episodes 20 --mode $m --target-return 3600 \
      2>/dev/null | tail -1 > runs/qsx/$n.$m.txt
  done
  echo "$n train_s=$((t1-t0)) $(cat runs/qsx/$n.window.txt) | $(cat runs/qsx/$n.recurrent.txt)" >> runs/qsx/summary.txt
}
mkdir -p runs/qsx
run cos --lr-schedule cosine
run cos-ema99 --lr-schedule cosine --ema-decay 0.99
run cos-lr3 --lr-schedule cosine --config runs/qsx/lr-3.0e-4.yaml
run cos-lr3-ema99 --lr-schedule cosine --ema-decay 0.99 --config runs/qsx/lr-3.0e-4.yaml
run cos-lr3-ef5 --lr-schedule cosine --config runs/qsx/lr-3.0e-4.yaml --episode-fraction 0.5
run cos-lr10 --lr-schedule cosine --config runs/qsx/lr-1.0e-3.yaml
run cos-lr6 --lr-schedule cosine --config runs/qsx/lr-6.0e-4.yaml
U=4000 run u4k-cos-lr6 --lr-schedule cosine --config runs/qsx/lr-6.0e-4.yaml
U=4000 run u4k-cos-lr10 --lr-schedule cosine --config runs/qsx/lr-1.0e-3.yaml
