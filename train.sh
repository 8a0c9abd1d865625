#!/usr/bin/env bash
# The paper's two trainings: on VisA (lr 4e-5, tested on MVTec-AD) and on MVTec-AD (lr 2e-5, with
# the 2x2 mosaic, tested on VisA). Each validates on five products of the other dataset when its
# meta file is present. Extra flags go to both runs.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}
$PYTHON train.py --dataset visa --train_data_path ./dataset/mvisa/data \
    --val_data_path ./dataset/mvisa/data --learning_rate 4e-5 --save_path ./vcp_weight/train_on_visa "$@"
$PYTHON train.py --dataset mvtec --train_data_path ./dataset/mvisa/data \
    --val_data_path ./dataset/mvisa/data --learning_rate 2e-5 --save_path ./vcp_weight/train_on_mvtec "$@"
