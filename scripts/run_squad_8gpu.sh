#!/usr/bin/env bash
# Fine-tune BERT on SQuAD v1.1 on 8 devices of one machine with DDP (torchrun), as the seed's 8-device run.
# Same layout, flags and defaults as run_squad_1gpu.sh (the batch size is per device); NPROC changes the count.
# Usage: DATA_PATH=/data bash scripts/run_squad_8gpu.sh [--amp] [extra bertqa train flags...]
set -euo pipefail
NPROC=${NPROC:-8}
PRECISION=tf32
[ "${1:-}" = "--amp" ] && PRECISION=${AMP_PRECISION:-bf16}
export OUTPUT_DIR=${OUTPUT_DIR:-results/squad_${NPROC}gpu_$PRECISION}
export BERTQA="torchrun --standalone --nproc-per-node $NPROC -m bertqa"
exec bash "$(dirname "$0")/run_squad_1gpu.sh" "$@"
