"""scripts/setup.sh's torch handling, run against a stand-in .venv: its python is the real one with a fake `torch`
package whose version is what the last stand-in `pip install` named (and no site-packages: the real torch is not
seen), and its pip only logs its arguments."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1" = -m ] && [ "$2" = pip ]; then
  echo "$*" >> "$FAKE_LOG"
  if [ "$3" = uninstall ]; then rm -rf "$FAKE_SITE"/torch-*.dist-info "$FAKE_TORCH"; exit 0; fi
  for arg in "$@"; do case $arg in
    torch==*) echo "${arg#torch==}" > "$FAKE_TORCH";;
    "torch>="*)  # a range: an installed torch, even one that fails to import, is kept ("already satisfied")
      if ! compgen -G "$FAKE_SITE/torch-*.dist-info" >/dev/null && [ ! -e "$FAKE_TORCH" ]; then
        echo 2.14.0 > "$FAKE_TORCH"
      fi;;
  esac; done
  exit 0
fi
PYTHONPATH="$FAKE_SITE" exec "$REAL_PYTHON" -S "$@"
"""

FAKE_TORCH = """import os
if os.environ.get("FAKE_TORCH_SIGNAL"):  # an import that kills the process (a build for CPU instructions it lacks)
    os.kill(os.getpid(), int(os.environ["FAKE_TORCH_SIGNAL"]))
if not os.path.exists(os.environ["FAKE_TORCH"]):
    raise ImportError("no torch")
__version__ = open(os.environ["FAKE_TORCH"]).read().strip()
"""


@pytest.fixture
def project(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    if subprocess.run([python, "-c", ""], env={**os.environ, "REAL_PYTHON": sys.executable}).returncode != 0:
        pytest.skip("the temporary folder cannot run programs (mounted noexec)")
    (tmp_path / "site" / "torch").mkdir(parents=True)
    (tmp_path / "site" / "torch" / "__init__.py").write_text(FAKE_TORCH)
    return tmp_path


def setup(project, torch_before=None, bertqa_torch=None, **env_extra):
    """Runs setup.sh; returns (exit code, stderr, the pip calls)."""
    if torch_before:
        (project / "torch-version").write_text(torch_before)
    # PYTHON: were the stand-in to fail, setup.sh would build a real venv with it, and install for real
    env = {**os.environ, "FAKE_LOG": str(project / "pip.log"), "FAKE_TORCH": str(project / "torch-version"),
           "FAKE_SITE": str(project / "site"), "REAL_PYTHON": sys.executable, "PYTHON": "false"}  # fmt: skip
    env.pop("BERTQA_TORCH", None)
    env.update(env_extra)
    if bertqa_torch:
        env["BERTQA_TORCH"] = bertqa_torch
    r = subprocess.run(["bash", "scripts/setup.sh"], cwd=project, env=env, capture_output=True, text=True, timeout=60)
    log = project / "pip.log"
    return r.returncode, r.stderr, log.read_text().splitlines() if log.exists() else []


def installs_bertqa(calls):
    return any("-e .[" in call for call in calls)


def test_a_new_venv_gets_the_pinned_torch_then_bertqa(project):
    rc, err, calls = setup(project)
    assert rc == 0, err
    assert any(call.endswith("torch==2.13.0") for call in calls) and installs_bertqa(calls)


@pytest.mark.parametrize("before", [None, "2.6.0+cu118"])
def test_bertqa_torch_that_installs_an_old_torch_is_refused_before_bertqa(project, before):
    # pip would otherwise replace that torch with the newest one it finds, when it installs bertqa (torch>=2.13).
    rc, err, calls = setup(project, torch_before=before, bertqa_torch="torch==2.6.0 --index-url http://127.0.0.1:1/")
    assert rc == 1 and "left torch older than 2.13" in err and len(err.strip().splitlines()) == 1
    assert any("torch==2.6.0" in call for call in calls) and not installs_bertqa(calls)


def test_an_old_torch_is_kept_and_refused_without_bertqa_torch(project):
    rc, err, calls = setup(project, torch_before="2.6.0")
    assert rc == 1 and "has torch 2.6.0, and bertqa needs torch >= 2.13" in err
    assert not any("install" in call for call in calls)


def test_bertqa_torch_replaces_an_old_torch(project):
    rc, err, calls = setup(project, torch_before="2.6.0", bertqa_torch="torch==2.13.1")
    assert rc == 0, err
    assert any("--upgrade torch==2.13.1" in call for call in calls) and installs_bertqa(calls)
    assert (project / "torch-version").read_text().strip() == "2.13.1"


def test_a_torch_that_is_installed_but_fails_to_import_is_named_not_replaced(project):
    """A CUDA build missing a library was taken for no torch: pip replaced it with the pinned CPU build (from PyPI,
    a multi-GB CUDA one), and the import error was never shown. BERTQA_TORCH, where given, still replaces it."""
    broken_torch(project)
    advice = "repair it, set BERTQA_TORCH to the pip arguments for another, or uninstall it to get torch==2.13.0"
    rc, err, calls = setup(project)  # (no torch-version file: the stand-in's import fails)
    assert (
        rc == 1
        and err.strip()
        == f"setup: .venv has torch 2.14.0+cu128, which fails to import (ImportError: no torch); {advice}"
    )
    assert not any("install" in call for call in calls)
    rc, err, calls = setup(project, FAKE_TORCH_SIGNAL="9")  # an import that dies says nothing on stderr
    assert (
        rc == 1
        and err.strip() == f"setup: .venv has torch 2.14.0+cu128, which fails to import (killed by signal 9); {advice}"
    )
    rc, err, calls = setup(project, bertqa_torch="torch==2.13.1")
    assert rc == 0 and any(call.endswith("torch==2.13.1") for call in calls) and installs_bertqa(calls), err


def broken_torch(project):
    """A torch distribution in the stand-in venv whose import fails (no torch-version file)."""
    dist = project / "site" / "torch-2.14.0+cu128.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.14.0+cu128\n")


def test_bertqa_torch_with_a_range_replaces_a_torch_that_fails_to_import(project):
    """(review) pip keeps an installed torch that BERTQA_TORCH's range allows ("already satisfied"), even one that
    fails to import: setup.sh then printed the import's traceback and said the torch was older than 2.13."""
    broken_torch(project)
    rc, err, calls = setup(project, bertqa_torch="torch>=2.13 --index-url http://127.0.0.1:1/")
    assert rc == 0 and installs_bertqa(calls), err
    removal = next(i for i, call in enumerate(calls) if " uninstall " in call and call.endswith(" torch"))
    assert removal < next(i for i, call in enumerate(calls) if "torch>=2.13 --index-url" in call)
    assert (project / "torch-version").read_text().strip() == "2.14.0"
    # and one that BERTQA_TORCH installs but that fails to import is named so, in one line
    broken_torch(project)
    (project / "pip.log").unlink()
    rc, err, calls = setup(project, bertqa_torch="torch>=2.13", FAKE_TORCH_SIGNAL="9")
    assert rc == 1 and not installs_bertqa(calls)
    assert (
        err.strip()
        == 'setup: BERTQA_TORCH="torch>=2.13" left a torch in .venv that fails to import (killed by signal 9)'
    )


def test_a_python_older_than_310_makes_no_venv(project, tmp_path):
    """A first run with an old python3 made a venv that every later run kept, failing at torch's install."""
    shutil.rmtree(project / ".venv")
    old = tmp_path / "python3.9"
    old.write_text('#!/usr/bin/env bash\ncase "$2" in *exit*) exit 1;; *print*) echo 3.9; exit 0;; esac\nexit 3\n')
    old.chmod(0o755)
    env = {**os.environ, "PYTHON": str(old)}
    r = subprocess.run(["bash", "scripts/setup.sh"], cwd=project, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.strip() == (
        f"setup: {old} is Python 3.9, and bertqa needs 3.10 or later: set PYTHON to one"
    )
    assert not (project / ".venv").exists()


def test_the_sdist_and_wheel_carry_the_license_and_the_page_not_the_tests(tmp_path):
    """Apache-2.0 asks that its text go with every copy (none was shipped); setuptools put the test files in the sdist
    without conftest.py and their data, so that none of them could run there."""
    import tarfile
    import zipfile

    tree = tmp_path / "tree"
    for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        tree.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, tree)
    for folder in ("src", "tests"):
        shutil.copytree(ROOT / folder, tree / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path / "dist"
    build = f"from setuptools import build_meta as b; b.build_sdist({str(out)!r}); b.build_wheel({str(out)!r})"
    subprocess.run([sys.executable, "-c", build], cwd=tree, check=True, capture_output=True, timeout=300)
    with tarfile.open(next(out.glob("*.tar.gz"))) as sdist:
        shipped = [name.split("/", 1)[1] for name in sdist.getnames() if "/" in name]
    assert "LICENSE" in shipped and "src/bertqa/static/index.html" in shipped
    assert not [name for name in shipped if name.startswith("tests")]
    with zipfile.ZipFile(next(out.glob("*.whl"))) as wheel:
        names = wheel.namelist()
    assert "bertqa/static/index.html" in names and any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
    assert (ROOT / "LICENSE").read_text().startswith(" " * 33 + "Apache License\n")
