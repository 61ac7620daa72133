#!/usr/bin/env bash
# Install the project, collect a small Hopper dataset, train DMM on it and evaluate it.
# About 15 minutes on a 2-core CPU (install included); a 4,000-update model is a start (about 50 normalized),
# not the best policy this project trains (docs/training.md).
set -euo pipefail
cd "$(dirname "$0")/.."

# 1. a virtual environment at .venv with the package, its serving and training extras and the dev tools
python3 -m venv .venv
. .venv/bin/activate
pip install -e ".[all,dev]"

# 2. collect 100k Hopper-v4 transitions with D4RL's reference SAC policy (bundled in deploy/policies/)
mkdir -p runs
dmm collect --env Hopper-v4 --policy deploy/policies/hopper_online_5.npz --steps 100000 \
    --out runs/hopper-medium-sim-v4.hdf5 --seed 0

# 3. train DMM for 4,000 updates with the short-budget settings and publish models/hopper-medium-sim-v4/1/
dmm train --dataset runs/hopper-medium-sim-v4.hdf5 --store models --updates 4000 \
    --config scripts/quickstart.yaml --eval-episodes 10 --target-return 3600

# 4. evaluate the published model in both inference modes
dmm eval --store models --name hopper-medium-sim-v4 --episodes 10 --mode window
dmm eval --store models --name hopper-medium-sim-v4 --episodes 10 --mode recurrent
