#!/usr/bin/env bash
# How reference/eomt_synth was made, end to end, on a 2-core AMD EPYC (AVX2) CPU, with this repository's own
# commands (train.py here is the training command). Step 2 took 85 minutes on that machine (shared), steps 3-4 about 10.
set -euo pipefail
DATA=${DATA:-data}            # generated datasets (not committed: regenerate them byte for byte from the seed)
RUN=${RUN:-runs/eomt_synth}   # training output (last.pt with optimizer state, not committed)
HERE=$(dirname "$0")
STORE=${STORE:-$RUN/models}

# 1. evaluation data: 500 images at 192 px (the model's input size) generated with seed 7, with COCO panoptic
#    ground truth. Training renders its own images from seed 1 ("train" split) as it goes: it never sees these.
deimv2-data synth --output "$DATA/seg_holdout192" --val 500 --image-size 192 --seed 7

# 2. training: a tiny EoMT-DINOv3 (6 layers of width 192, 24 queries, 3.2 M parameters) from random weights.
#    Stage 1: 1500 steps of batch 16 (images 0..23999 of seed 1) with mask annealing; stage 2: 1000 more steps
#    from stage 1's model on images 24000..39999, without masked attention, a new warm-up and decay.
python "$HERE/train.py" --output "$RUN/stage1" --steps 1500
python "$HERE/train.py" --output "$RUN/stage2" --init "$RUN/stage1/model" --no-mask-annealing --steps 1000 \
  --lr 3e-4 --warmup 50 --first-image 24000
mkdir -p "$HERE/shapes_eomt_tiny"
cp "$RUN/stage2/model/config.json" "$RUN/stage2/model/model.safetensors" "$HERE/shapes_eomt_tiny/"
cp "$RUN/stage1/log.jsonl" "$HERE/log_stage1.jsonl"
cp "$RUN/stage2/log.jsonl" "$HERE/log_stage2.jsonl"

# 3. exports: FP32, FP16 and INT8 ONNX, FP32 and INT8 OpenVINO IR, with the stuff class recorded so panoptic
#    quality can be computed; INT8 calibrated on 64 training images (seed 1, the first 64 training saw)
deimv2-data synth --output "$DATA/seg_calib192" --train 64 --image-size 192 --seed 1 --no-panoptic
M="$HERE/shapes_eomt_tiny"
CAL=(--calibration "$DATA/seg_calib192/train")
deimv2-export eomt --checkpoint "$M" --stuff-classes background --output-dir "$STORE"
deimv2-export eomt --checkpoint "$M" --stuff-classes background --output-dir "$STORE" --precision fp16
deimv2-export eomt --checkpoint "$M" --stuff-classes background --output-dir "$STORE" --precision int8 "${CAL[@]}"
deimv2-export eomt --checkpoint "$M" --stuff-classes background --output-dir "$STORE" --format openvino
deimv2-export eomt --checkpoint "$M" --stuff-classes background --output-dir "$STORE" --format openvino \
  --precision int8 "${CAL[@]}"

# 4. accuracy of every export on the held-out split (deimv2-val), then their latency on this CPU (deimv2-bench)
for f in "$STORE"/*.onnx "$STORE"/*.xml; do
  b=$(basename "$f"); ext=${b##*.}; p=${b%.*}; p=${p##*_}
  deimv2-val "$f" --data "$DATA/seg_holdout192" --per-class --quiet --json "$HERE/holdout_${ext}_${p}.json"
done
DEIMV2_MODELS="$STORE" deimv2-bench --vit "$M" --precision fp32,fp16,int8 "${CAL[@]}" --interleave --seconds 5 \
  --mode model --markdown "$HERE/bench_avx2.md" --output "$HERE/bench_avx2.json"
