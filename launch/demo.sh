#!/usr/bin/env bash
# The main job on the embedded default: real images shipped with scikit-learn -> shards -> tiny MAE pretraining ->
# linear probe of the pretrained encoder vs a randomly initialised one.
# Extra arguments are dotted overrides for the pretraining run (e.g. train.epochs=5).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
DATA=demo_data
[ -d "$DATA/images" ] || "$BIN/mimtrain" demo-data "$DATA/images"
[ -f "$DATA/shards/index.json" ] || "$BIN/mimtrain" make-shards "$DATA/images" "$DATA/shards" --shard-size 200 --overwrite  # a half-written folder has no index.json
# resume=auto (here and on the probes): a second `make demo` continues (or, when finished, reuses) each run instead of
# being refused for writing into a used output_dir.
"$BIN/accelerate" launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
    -m mimtrain pretrain --recipe recipes/pretrain/mae_vit_tiny_cpu.yaml resume=auto "$@"

# Then the numbers: linear-probe the pretrained encoder and a randomly initialised one of the same architecture on the
# labelled digits. Every 5th image of each class (in file order) is held out for validation, so the split is fixed.
RUN=runs/demo_mae
for arg in "$@"; do case "$arg" in output_dir=*) RUN="${arg#output_dir=}" ;; esac; done
PROBE="$DATA/probe"
if [ ! -f "$PROBE/val/index.json" ]; then
    rm -rf "$PROBE"
    for dir in "$DATA"/images/*/; do
        cls=$(basename "$dir")
        mkdir -p "$PROBE/images_train/$cls" "$PROBE/images_val/$cls"
        i=0
        for f in $(ls "$dir" | sort); do
            if [ $((i % 5)) -eq 0 ]; then split=val; else split=train; fi
            cp "$dir$f" "$PROBE/images_$split/$cls/"
            i=$((i + 1))
        done
    done
    "$BIN/mimtrain" make-shards "$PROBE/images_train" "$PROBE/train" --shard-size 500
    "$BIN/mimtrain" make-shards "$PROBE/images_val" "$PROBE/val" --shard-size 500
fi
"$BIN/mimtrain" linprobe --recipe recipes/linprobe/demo_digits_cpu.yaml --from "$RUN" \
    output_dir=runs/demo_linprobe_pretrained resume=auto
"$BIN/mimtrain" linprobe --recipe recipes/linprobe/demo_digits_cpu.yaml --from "$RUN" --random-init \
    output_dir=runs/demo_linprobe_random resume=auto
"$BIN/python" - <<'PY'
import json
p = json.load(open("runs/demo_linprobe_pretrained/results.json"))
r = json.load(open("runs/demo_linprobe_random/results.json"))
print(f"linear probe on {p['num_val']} held-out digits ({p['pool']} features): "
      f"pretrained {p['top1']:.1f}% vs random init {r['top1']:.1f}% top-1")
PY
