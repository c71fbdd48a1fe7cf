#!/usr/bin/env bash
# Fine-tune BERT on SQuAD v1.1 on 8 devices of one machine with DDP (torchrun), as the seed's 8-device run.
# Same layout and flags as run_squad_1gpu.sh; NPROC changes the device count; the batch is per device.
# Usage: DATA_PATH=/data bash scripts/run_squad_8gpu.sh [--amp] [extra bertqa train flags...]
set -euo pipefail
DATA_PATH=${DATA_PATH:?set DATA_PATH to the folder holding checkpoint/ and squad/}
PRECISION=tf32
if [ "${1:-}" = "--amp" ]; then PRECISION=${AMP_PRECISION:-bf16}; shift; fi
NPROC=${NPROC:-8}
OUTPUT_DIR=${OUTPUT_DIR:-results/squad_${NPROC}gpu_$PRECISION}
torchrun --standalone --nproc-per-node "$NPROC" -m bertqa train \
  --model "${CHECKPOINT:-$DATA_PATH/checkpoint}" \
  --train-file "$DATA_PATH/squad/train-v1.1.json" \
  --predict-file "$DATA_PATH/squad/dev-v1.1.json" \
  --output-dir "$OUTPUT_DIR" \
  --epochs "${EPOCHS:-2}" --batch-size "${BATCH_SIZE:-8}" --lr "${LR:-3e-5}" --warmup 0.1 \
  --max-seq-length 384 --doc-stride 128 --max-query-length 64 \
  --precision "$PRECISION" --seed "${SEED:-1}" "$@"
