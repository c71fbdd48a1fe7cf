#!/usr/bin/env bash
# The GPU checks, prepared to run in one go on a machine with a CUDA GPU (issue 7's GPU rows):
#   1. bertqa against transformers in fp32, tf32, bf16 and fp16, padded and not (benchmarks/gpu_parity.py);
#   2. BERT-large, seq 384, batch 32, random full-length windows, bf16: training and inference throughput of
#      bertqa against transformers in the same process (the README's targets: >= 400 and >= 1,000 windows/s);
#   3. the same with torch.compile (bertqa's model only).
# Every step runs even if one before it fails; each writes its log under $OUT (default runs/gpu-check).
# Usage, from the repo root: bash scripts/gpu_check.sh      (PYTHON=... to pick the interpreter)
set -uo pipefail
OUT=${OUT:-runs/gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
step() {
  local name=$1
  shift
  echo "== $name: $*"
  "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc"
  [ "$rc" = 0 ] || status=1
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$OUT/gpu.txt"
step versions "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
  'transformers', transformers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
step parity "$PY" benchmarks/gpu_parity.py
LARGE=(--preset large --seq-len 384 --batch-size 32 --precision bf16 --segments 3)
step train-large "$PY" -m bertqa bench "${LARGE[@]}" --mode train --compare hf --steps 10 --warmup 5
step infer-large "$PY" -m bertqa bench "${LARGE[@]}" --mode infer --compare hf --steps 20 --warmup 5
step train-large-compile "$PY" -m bertqa bench "${LARGE[@]}" --mode train --compile --steps 10 --warmup 10
step infer-large-compile "$PY" -m bertqa bench "${LARGE[@]}" --mode infer --compile --steps 20 --warmup 10
echo "gpu_check: logs in $OUT; $([ $status = 0 ] && echo 'every step passed' || echo 'a step FAILED')"
exit $status
