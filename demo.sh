#!/usr/bin/env bash
# The offline demo (`make demo`): build a small synthetic anomaly dataset from the photographs that
# scikit-image ships, train VCP-CLIP on seven "auxiliary" products and test it zero-shot on six
# products it has never seen -- with the real conversion, train.py and test.py -- then once more
# with 4 normal images of each unseen product as few-shot references. A few minutes on 2 CPU
# cores (README, 'The demo'). Everything goes to demo_output/ (git-ignored).
#
# The backbone is a small *randomly initialised* CLIP (no pretrained CLIP can be downloaded
# offline), so the numbers show that the VCP parts learn, and say nothing about the paper's.
#
#   bash demo.sh                 # SEED=1 bash demo.sh: other data and training; CLIP_SEED=1:
#                                # another random backbone
#   EPOCHS=30 LR=1e-3 bash demo.sh   # longer, slower learning; DEMO_OUT=/tmp/x: elsewhere
set -euo pipefail
cd "$(dirname "$0")"

OUT=${DEMO_OUT:-demo_output}
SEED=${SEED:-0}  # data and training
CLIP_SEED=${CLIP_SEED:-0}  # the random backbone: fixed, as pretrained weights would be
EPOCHS=${EPOCHS:-12}
LR=${LR:-2e-3}
DATA=$OUT/data
CLIP=$OUT/clip_demo.pt
CONFIG=configs/demo.json
# One BLAS/OpenMP thread: on a busy machine two threads per process can spin-wait for each other
# and slow training many times over; with one thread the demo takes about the same time idle or
# busy.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
rm -rf "$OUT/checkpoints" "$OUT/results" "$OUT/results_4shot"  # nothing stale of a past run

echo "== 1/6 synthetic data (seed $SEED) -> $OUT/synthetic"
# 256 px photos, 10 normal + 30 anomalous images per product (stains, scratches, missing pieces,
# colour shifts with exact masks). The target products are never seen in training; each also
# gets 4 normal training images (train/), the references of step 6 (they change no other image).
python dataset/synthetic.py --out_path "$OUT/synthetic" --seed "$SEED" --size 256 \
    --n_good 10 --n_anomalous 30 --target_n_train 4 \
    --aux brick,gravel,coffee,astronaut,tissue,rocket,camera \
    --target grass,chelsea,retina,coins,moon,page

echo "== 2/6 standardized layout + meta files -> $DATA"
python dataset/make_dataset_new.py --dataset demoaux --layout folder \
    --src_path "$OUT/synthetic/src_aux" --dst_path "$DATA"
python dataset/make_dataset_new.py --dataset demotarget --layout folder \
    --src_path "$OUT/synthetic/src_target" --dst_path "$DATA"
python dataset/make_meta.py --data_path "$DATA" --dataset demoaux
python dataset/make_meta.py --data_path "$DATA" --dataset demotarget

echo "== 3/6 a random CLIP ($CONFIG, seed $CLIP_SEED) as an OpenAI TorchScript archive -> $CLIP"
python -c "from model import CLIPConfig; from tests.helpers.random_clip import write_openai_archive as w; print('wrote', w(CLIPConfig.from_json('$CONFIG'), '$CLIP', seed=$CLIP_SEED))"

echo "== 4/6 train on demoaux (the backbone stays frozen; only the VCP parts learn)"
# configs/demo.json: ViT with 2 blocks of width 256 (4 heads; Post-VCP's 8 heads need width % 8
# == 0) on 8 px patches of 128 px images (a 16x16 grid), text tower of 2 blocks of width 128
# (= embed_dim, 2 heads), so --total_d_layer_len 1. Both vision blocks are tapped: a random
# backbone's useful features are its low-level ones, and the shallow blocks keep them.
# --learning_rate 2e-3 (50x the paper's 4e-5): the VCP parts start from scratch on top of random
# features and must learn in 216 steps (280 images, batch 16, 12 epochs). The default
# augmentation stays on: it is what makes the maps transfer to unseen products.
# --num_workers 0: with one thread, loader worker processes only cost start-up time.
python train.py --dataset demoaux --train_data_path "$DATA" --val_data_path "$DATA" \
    --save_path "$OUT/checkpoints" --pretrained_path "$CLIP" --config_path "$CONFIG" \
    --features_list 1 2 --image_size 128 --total_d_layer_len 1 \
    --epoch "$EPOCHS" --batch_size 16 --learning_rate "$LR" --save_freq "$EPOCHS" --seed "$SEED" \
    --num_workers 0

echo "== 5/6 zero-shot test on the unseen demotarget products"
python test.py --dataset demotarget --data_path "$DATA" \
    --checkpoint_path "$OUT/checkpoints/epoch_${EPOCHS}_group_id_2.pth" \
    --pretrained_path "$CLIP" --config_path "$CONFIG" --save_path "$OUT/results" --num_workers 0

echo "== 6/6 few-shot: the same test with 4 normal train images per product as references"
# Beyond the paper (docs/scoring.md): each test patch is also compared with
# the references' patches, and that map is fused with the zero-shot maps.
python test.py --dataset demotarget --data_path "$DATA" \
    --checkpoint_path "$OUT/checkpoints/epoch_${EPOCHS}_group_id_2.pth" \
    --pretrained_path "$CLIP" --config_path "$CONFIG" --save_path "$OUT/results_4shot" \
    --num_workers 0 --no_vis --k_shot 4 | sed -n '1p;$p'  # the header and the mean row

echo "metric table: $OUT/results/log.txt (4-shot: $OUT/results_4shot/log.txt); heat maps: $OUT/results/imgs/<product>/{anomaly,good}/"
