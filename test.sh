#!/usr/bin/env bash
# The paper's zero-shot protocol: MVTec-AD with the VisA-trained weights, VisA with the
# MVTec-AD-trained ones. Extra flags go to both runs (e.g. bash test.sh --no_vis --batch_size 16).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}
$PYTHON test.py --dataset mvtec --data_path ./dataset/mvisa/data \
    --checkpoint_path ./vcp_weight/train_visa.pth --save_path ./results/test_mvtec "$@"
$PYTHON test.py --dataset visa --data_path ./dataset/mvisa/data \
    --checkpoint_path ./vcp_weight/train_mvtec.pth --save_path ./results/test_visa "$@"
