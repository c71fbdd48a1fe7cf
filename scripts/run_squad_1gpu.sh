#!/usr/bin/env bash
# Fine-tune BERT on SQuAD v1.1 on one device; bertqa prints EM/F1 and throughput at the end (the seed recipe's 1-device run).
#   DATA_PATH/checkpoint/   an HF folder, or an NVIDIA .pt with bert_config.json and vocab.txt beside it
#   DATA_PATH/squad/        train-v1.1.json, dev-v1.1.json  (bertqa download squad --dir DATA_PATH/squad)
# Usage: DATA_PATH=/data bash scripts/run_squad_1gpu.sh [--amp] [extra bertqa train flags...]
# TF32 by default (as the seed recipe); --amp for mixed precision (bf16; AMP_PRECISION=fp16 for fp16 + scaler).
set -euo pipefail
DATA_PATH=${DATA_PATH:?set DATA_PATH to the folder holding checkpoint/ and squad/}
PRECISION=tf32
if [ "${1:-}" = "--amp" ]; then PRECISION=${AMP_PRECISION:-bf16}; shift; fi
CHECKPOINT=${CHECKPOINT:-$DATA_PATH/checkpoint}
OUTPUT_DIR=${OUTPUT_DIR:-results/squad_1gpu_$PRECISION}
BERTQA=${BERTQA:-bertqa}  # run_squad_8gpu.sh sets it to a torchrun launch
$BERTQA train \
  --model "$CHECKPOINT" \
  --train-file "$DATA_PATH/squad/train-v1.1.json" \
  --predict-file "$DATA_PATH/squad/dev-v1.1.json" \
  --output-dir "$OUTPUT_DIR" \
  --epochs "${EPOCHS:-2}" --batch-size "${BATCH_SIZE:-8}" --lr "${LR:-3e-5}" --warmup 0.1 \
  --max-seq-length 384 --doc-stride 128 --max-query-length 64 \
  --precision "$PRECISION" --seed "${SEED:-1}" "$@"
