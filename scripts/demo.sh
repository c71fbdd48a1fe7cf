#!/usr/bin/env bash
# The README's main command: set up, fine-tune the offline pretrained weights on a slice of SQuAD v1.1,
# evaluate on the whole dev sample (4,961 questions), print EM/F1 and answer one question. About 6 minutes
# on 2 CPU cores (see the README's results for what it reaches).
#   MODEL=path        your own checkpoint instead of the offline all-MiniLM-L6-v2 weights
#   SQUAD_DIR=path    a folder with train-subset.json + dev-a.json (the sample) or train-v1.1.json +
#                     dev-v1.1.json (the official files). Unset: ../shared/data/squad-v1.1 where it holds the
#                     sample, else the official SQuAD v1.1 files, downloaded into data/squad
#   EXAMPLES=N        training questions to use (default 5000); OUT=folder (default runs/demo)
# The windows' features are cached in the repository's runs/cache (about 55 MB), whatever OUT is: a rerun on the
# same data reuses them.
# Relative paths are taken from the folder the script is run in; the defaults are in the repository.
set -euo pipefail
# The user's paths are taken from where the script is run (it then works from the repository's root).
for name in SQUAD_DIR MODEL OUT; do
  value=${!name:-}
  if [ -n "$value" ] && [ "${value#/}" = "$value" ]; then printf -v "$name" '%s' "$PWD/$value"; fi
done
cd "$(dirname "$0")/.."
TRAIN= DEV=  # (not taken from the environment: unset, the data is downloaded below)
if [ -n "${SQUAD_DIR:-}" ]; then  # the user's folder: used, or refused (before the set-up), never silently replaced
  if [ -f "$SQUAD_DIR/train-subset.json" ] && [ -f "$SQUAD_DIR/dev-a.json" ]; then
    TRAIN=$SQUAD_DIR/train-subset.json DEV=$SQUAD_DIR/dev-a.json
  elif [ -f "$SQUAD_DIR/train-v1.1.json" ] && [ -f "$SQUAD_DIR/dev-v1.1.json" ]; then
    TRAIN=$SQUAD_DIR/train-v1.1.json DEV=$SQUAD_DIR/dev-v1.1.json
  else
    echo "demo: SQUAD_DIR $SQUAD_DIR holds neither train-subset.json + dev-a.json nor train-v1.1.json + dev-v1.1.json" >&2
    exit 1
  fi
elif [ -f ../shared/data/squad-v1.1/train-subset.json ] && [ -f ../shared/data/squad-v1.1/dev-a.json ]; then
  TRAIN=../shared/data/squad-v1.1/train-subset.json DEV=../shared/data/squad-v1.1/dev-a.json
fi
bash scripts/setup.sh
BERTQA=.venv/bin/bertqa
if [ -z "$TRAIN" ]; then
  $BERTQA download squad --version 1.1 --dir data/squad
  TRAIN=data/squad/train-v1.1.json DEV=data/squad/dev-v1.1.json
fi
if [ -z "${MODEL:-}" ]; then
  MODEL=runs/all-MiniLM-L6-v2
  # Extracted beside it, then moved in, the weights last: an interrupted extraction leaves no weights, so the next
  # run extracts again (it used to leave config.json beside half the weights, and the next runs took it as done).
  [ -f "$MODEL/model.safetensors" ] || .venv/bin/python -c "
import os, shutil, sys, tempfile, zipfile, all_minilm_l6_v2
model = sys.argv[1]
os.makedirs(model, exist_ok=True)
with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(model)), prefix='.extract-') as tmp:
    zipfile.ZipFile(all_minilm_l6_v2.get_model_zip_path()).extractall(tmp)
    for name in sorted(os.listdir(tmp), key=lambda name: name == 'model.safetensors'):
        source, target = os.path.join(tmp, name), os.path.join(model, name)
        if os.path.isdir(source):
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            os.replace(source, target)" "$MODEL"
fi
OUT=${OUT:-runs/demo}
# Precision auto: bf16 where the CPU has native bf16 matmuls (AVX-512 BF16 / AMX), else fp32.
$BERTQA train --model "$MODEL" --train-file "$TRAIN" --predict-file "$DEV" --output-dir "$OUT" \
  --max-train-examples "${EXAMPLES:-5000}" --epochs 1 --batch-size 32 --lr 3e-4 --warmup 0.1 \
  --eval-batch-size 64 --seed 42 --log-every 5 --cache-dir runs/cache
QUESTION="Which NFL team represented the AFC at Super Bowl 50?"
CONTEXT="Super Bowl 50 was an American football game to determine the champion of the National Football \
League (NFL) for the 2015 season. The American Football Conference (AFC) champion Denver Broncos defeated \
the National Football Conference (NFC) champion Carolina Panthers 24-10 to earn their third Super Bowl title."
echo "Q: $QUESTION"
echo "A (best 3, with scores):"
$BERTQA ask --model "$OUT/model" --question "$QUESTION" --context "$CONTEXT" --top-k 3 --json | .venv/bin/python -c "
import json, sys
for a in json.load(sys.stdin):
    print(f'  {a[\"score\"]:.2f}  {a[\"answer\"]}')"
