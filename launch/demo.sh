#!/usr/bin/env bash
# The main job on the embedded default: real images shipped with scikit-learn -> shards -> tiny MAE pretraining.
# Extra arguments are dotted overrides for the pretraining run (e.g. train.epochs=5).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
DATA=demo_data
[ -d "$DATA/images" ] || "$BIN/mimtrain" demo-data "$DATA/images"
[ -f "$DATA/shards/index.json" ] || "$BIN/mimtrain" make-shards "$DATA/images" "$DATA/shards" --shard-size 200
"$BIN/accelerate" launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
    -m mimtrain pretrain --recipe recipes/pretrain/mae_vit_tiny_cpu.yaml "$@"
