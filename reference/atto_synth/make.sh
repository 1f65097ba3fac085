#!/usr/bin/env bash
# How reference/atto_synth was made, end to end, on a 2-core AMD EPYC (AVX2) CPU with this repository's own
# commands. Steps 1-2 take about 20 minutes per epoch on that machine; step 3 a few minutes.
set -euo pipefail
DATA=${DATA:-data}          # generated datasets (not committed: regenerate them byte for byte from the seeds)
RUN=${RUN:-runs/atto_synth} # training output (checkpoints with optimizer state, not committed)
HERE=$(dirname "$0")

# 1. data: 8000 training and 500 validation images (seed 1), and a held-out split training never saw (seed 7)
deimv2-data synth --output "$DATA/synth_a" --train 8000 --val 500 --seed 1
deimv2-data synth --output "$DATA/synth_holdout" --val 500 --seed 7

# 2. training: the DEIM recipe of atto, scaled to 16 epochs, batch 16, EMA validated every epoch on 250 images.
#    The reference run was stopped with SIGTERM after epoch 7, resumed from the committed last.pth for epochs 8-11
#    and stopped again early in epoch 12 (README.md here; log.jsonl here is both sessions' log), for machine time;
#    continue it with: deimv2-train --resume "$HERE/last.pth" (add --images, --annotations, --val-images,
#    --val-annotations and --output-dir where the data and output are on your machine). The second session ran,
#    from the repository root (last.pth here is what its SIGTERM saved, log.jsonl the first log + this run's log):
#      deimv2-train --resume reference/atto_synth/last.pth --images "$DATA/synth_a/train" \
#        --annotations "$DATA/synth_a/annotations/instances_train.json" --val-images "$DATA/synth_a/val" \
#        --val-annotations "$DATA/synth_a/annotations/instances_val.json" --output-dir "$RUN" --threads 2 --workers 1
deimv2-train atto \
  --images "$DATA/synth_a/train" --annotations "$DATA/synth_a/annotations/instances_train.json" \
  --val-images "$DATA/synth_a/val" --val-annotations "$DATA/synth_a/annotations/instances_val.json" \
  --epochs 16 --batch 16 --lr 0.001 --threads 2 --workers 1 --val-every 1 --max-val-images 250 --seed 0 \
  --output-dir "$RUN"

# 3. the shipped weights: the EMA weights and classes of the best validated epoch, then their accuracy as
#    deployed (ONNX Runtime, FP32) on the held-out split
deimv2-train --release "$RUN/best.pth" "$HERE/model.pth"
deimv2-export atto --checkpoint "$HERE/model.pth" --output-dir "$RUN/export"
deimv2-val "$RUN/export/deimv2_atto_fp32.onnx" --images "$DATA/synth_holdout/val" \
  --annotations "$DATA/synth_holdout/annotations/instances_val.json" --json "$HERE/holdout_onnx_fp32.json"
