#!/usr/bin/env bash
# Fine-tune on several machines: run this same command on every node (torchrun's c10d rendezvous).
#   NNODES=2 NPROC=8 MASTER_ADDR=node0 MASTER_PORT=29500 DATA_PATH=/shared/data bash scripts/run_squad_multinode.sh
# DATA_PATH must be readable at the same path on every node; only global rank 0 writes OUTPUT_DIR.
#
# Under Slurm, one task per node, e.g. in an sbatch script with `#SBATCH --nodes=2 --ntasks-per-node=1`:
#   export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
#   srun --kill-on-bad-exit=1 env NNODES=$SLURM_NNODES DATA_PATH=/shared/data bash scripts/run_squad_multinode.sh
set -euo pipefail
DATA_PATH=${DATA_PATH:?set DATA_PATH to the folder holding checkpoint/ and squad/}
PRECISION=tf32
if [ "${1:-}" = "--amp" ]; then PRECISION=${AMP_PRECISION:-bf16}; shift; fi
torchrun --nnodes "${NNODES:?set NNODES}" --nproc-per-node "${NPROC:-8}" \
  --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}" \
  --rdzv-id "${RDZV_ID:-bertqa-squad}" \
  -m bertqa train \
  --model "${CHECKPOINT:-$DATA_PATH/checkpoint}" \
  --train-file "$DATA_PATH/squad/train-v1.1.json" \
  --predict-file "$DATA_PATH/squad/dev-v1.1.json" \
  --output-dir "${OUTPUT_DIR:-results/squad_multinode_$PRECISION}" \
  --epochs "${EPOCHS:-2}" --batch-size "${BATCH_SIZE:-8}" --lr "${LR:-3e-5}" --warmup 0.1 \
  --precision "$PRECISION" --seed "${SEED:-1}" "$@"
