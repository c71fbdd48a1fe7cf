#!/usr/bin/env bash
# The GPU checks, prepared to run in one go on a machine with a CUDA GPU (issue 7's GPU rows), most important first:
#   1. bertqa against transformers in fp32, tf32, bf16 and fp16, padded and not (benchmarks/gpu_parity.py);
#   2. BERT-large, seq 384, batch 32, random full-length windows, bf16: training and inference throughput of
#      bertqa against transformers in the same process (the README's targets: >= 400 and >= 1,000 windows/s);
#   3. where MODEL and SQUAD_DIR are set: the CPU targets' configuration on the GPU (MODEL's weights, real SQuAD
#      windows at 384/128/64, batch 32, --precision auto), training and inference, against transformers, with
#      every timed batch warmed up first (steady state: each length's kernels already chosen);
#   4. where MODEL and SQUAD_DIR are set: the demo's fine-tune + evaluation (scripts/demo.sh's recipe) on the GPU,
#      with --precision auto (bf16 on compute capability >= 8), and again in fp16 (gradient scaler), last;
#   5. the throughput of step 2 with torch.compile (bertqa's model only).
# Every step runs even if one before it fails, each under its own time limit (STEP_LIMIT seconds, default 240);
# each writes its log under $OUT (default runs/gpu-check), and the fine-tunes their models and cache under $WORK.
# Usage: bash scripts/gpu_check.sh      (PYTHON=... to pick the interpreter; paths are relative to the repo root)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-check}
WORK=${WORK:-runs/gpu-check-work}
PY=${PYTHON:-python3}
LIMIT=${STEP_LIMIT:-240}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  echo "gpu_check: $PY's torch sees no CUDA GPU (or cannot be imported); this script is for a machine with one" >&2
  exit 1
fi
mkdir -p "$OUT"
status=0
step() {
  local name=$1
  shift
  echo "== $name: $*"
  timeout "$LIMIT" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc$([ "$rc" = 124 ] && echo " (over $LIMIT s)")"
  [ "$rc" = 0 ] || status=1
}
have_data() { [ -n "${MODEL:-}" ] && [ -n "${SQUAD_DIR:-}" ]; }
# The demo's fine-tune + evaluation (scripts/demo.sh's recipe), where MODEL and SQUAD_DIR are set; its model in
# $WORK/NAME. Usage: finetune NAME [more train arguments]
finetune() {
  have_data || return 0
  local name=$1
  shift
  step "$name" "$PY" -m bertqa train --model "$MODEL" --train-file "$SQUAD_DIR/train-subset.json" \
    --predict-file "$SQUAD_DIR/dev-a.json" --max-train-examples "${EXAMPLES:-5000}" --epochs 1 --batch-size 32 \
    --lr 3e-4 --warmup 0.1 --eval-batch-size 64 --seed 42 --log-every 20 --no-progress --cache-dir "$WORK/cache" \
    --output-dir "$WORK/$name" "$@"
}
step versions bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; nproc
  "$1" -c "import torch, transformers; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda,
  \"transformers\", transformers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else \"no GPU\")"' \
  _ "$PY"
step parity "$PY" benchmarks/gpu_parity.py --device cuda
LARGE=(--preset large --seq-len 384 --batch-size 32 --precision bf16 --segments 3)
step train-large "$PY" -m bertqa bench "${LARGE[@]}" --mode train --compare hf --steps 10 --warmup 5
step infer-large "$PY" -m bertqa bench "${LARGE[@]}" --mode infer --compare hf --steps 20 --warmup 5
if have_data; then
  REAL=(--model "$MODEL" --compare hf --segments 3 --steps 40 --warmup 40)
  step train-real "$PY" -m bertqa bench "${REAL[@]}" --mode train --data "$SQUAD_DIR/train-subset.json"
  step infer-real "$PY" -m bertqa bench "${REAL[@]}" --mode infer --data "$SQUAD_DIR/dev-a.json"
fi
finetune finetune
step train-large-compile "$PY" -m bertqa bench "${LARGE[@]}" --mode train --compile --steps 10 --warmup 10
step infer-large-compile "$PY" -m bertqa bench "${LARGE[@]}" --mode infer --compile --steps 20 --warmup 10
finetune finetune-fp16 --precision fp16
echo "gpu_check: logs in $OUT; $([ $status = 0 ] && echo 'every step passed' || echo 'a step FAILED')"
exit $status
