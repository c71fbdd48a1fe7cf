"""Training killed outright (SIGKILL) and resumed: real `bertqa train` processes, the tiny model, tiny-squad."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import bertqa.files
from bertqa.distributed import Dist
from bertqa.files import (
    _tmp_dir_prefix,
    atomic_dir,
    atomic_path,
    exclusive,
    remove_stale_temps,
    scratch_dir,
    write_json_files,
)
from bertqa.train import TrainConfig, load_checkpoint, train

STEPS, SAVE_EVERY = 10, 2

# `bertqa train` with hooks that change no number, each set by an environment variable: PAUSE seconds after
# each metrics line, so the test can see where the run is; the checkpoint of step STALL_AT written half-way,
# then hanging until killed; STALL_METRICS=marker: hang in the rewrite of metrics.jsonl, its new text written
# beside it but not yet renamed into place, marker created (a rewrite in place never gets there: the test fails).
HOOKED_CLI = """
import io, os, sys, time
from pathlib import Path
import torch
import bertqa.train
from bertqa.cli import main

pause, stall_at, marker = float(os.environ.get("PAUSE", 0)), int(os.environ.get("STALL_AT", -1)), os.environ.get("STALL_METRICS")
log = bertqa.train.MetricsLog.log
def slow_log(self, record):
    log(self, record)
    time.sleep(pause)
bertqa.train.MetricsLog.log = slow_log
save = torch.save
def stalling_save(obj, f):
    if isinstance(obj, dict) and obj.get("step") == stall_at:
        buf = io.BytesIO()
        save(obj, buf)
        with open(f, "wb") as out:
            out.write(buf.getvalue()[: buf.tell() // 2])
            out.flush()
            time.sleep(600)
    save(obj, f)
torch.save = stalling_save
replace = os.replace
def stalling_replace(src, dst, *args, **kwargs):
    if marker and Path(dst).name == "metrics.jsonl":
        Path(marker).touch()
        time.sleep(600)
    return replace(src, dst, *args, **kwargs)
os.replace = stalling_replace
sys.exit(main(sys.argv[1:]))
"""


def train_args(model, data, out):
    return ["train", "--model", model, "--train-file", data, "--output-dir", out, "--save-every", SAVE_EVERY,
            "--resume", "--max-steps", STEPS, "--seed", 3, "--cache-dir", "none", "--no-progress", "--precision",
            "fp32", "--max-seq-length", 128, "--doc-stride", 64, "--max-query-length", 32, "--batch-size", 4,
            "--log-every", 1]  # fmt: skip


def run(args, hooks=None, **popen):
    """The CLI as a child process; `hooks`: HOOKED_CLI's environment variables."""
    prefix = ["-c", HOOKED_CLI] if hooks else ["-m", "bertqa"]
    env = {**os.environ, **{k: str(v) for k, v in hooks.items()}} if hooks else None
    return subprocess.Popen([sys.executable, *prefix, *map(str, args)], env=env, text=True, **popen)


def kill_when(proc, ready, timeout=120):
    """SIGKILL the process as soon as ready() is true (checked every 20 ms)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before the kill point"
        assert time.monotonic() < deadline, "the kill point never came"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def lines(out):  # while a run writes it: a line half written is not counted
    path = out / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


def metrics(out):
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def ckpt_step(out):
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["step"]


def temps(out):
    return sorted(out.glob(".checkpoint.*"))


@pytest.fixture(scope="module")
def reference(tiny_dir, tiny_squad, tmp_path_factory):
    """The same run, never interrupted."""
    out = tmp_path_factory.mktemp("reference")
    proc = run(train_args(tiny_dir, tiny_squad, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    return out


def test_kill_9_anywhere_then_resume_ends_exactly_where_an_uninterrupted_run_ends(
    reference, tiny_dir, tiny_squad, tmp_path
):
    out = tmp_path / "run"
    args = train_args(tiny_dir, tiny_squad, out)

    # 1. Killed between steps, once 5 steps are logged.
    proc = run(args, hooks={"PAUSE": 0.3}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(proc, lambda: lines(out) >= 5)
    logged, saved = len(metrics(out)), ckpt_step(out)
    assert 0 <= logged - saved <= SAVE_EVERY and saved % SAVE_EVERY == 0

    # 2. Resumed, then killed while the next checkpoint is half written.
    stall = saved + SAVE_EVERY
    launched = time.time()  # (the first kill may itself have left a temporary file: only a newer one counts)
    proc = run(args, hooks={"STALL_AT": stall}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(proc, lambda: any(p.stat().st_size > 0 and p.stat().st_mtime >= launched for p in temps(out)))
    assert len(temps(out)) == 1  # a kill leaves the temporary file of the write it cut short
    assert ckpt_step(out) == saved  # the checkpoint itself is the previous one, whole
    assert [r["step"] for r in metrics(out)] == list(range(1, stall + 1))  # lost: stall - saved = SAVE_EVERY

    # 3. Resumed to the end: from the last whole checkpoint, the stray temporary file removed.
    proc = run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert f"resumed from {out / 'checkpoint.pt'} at step {saved}" in stdout
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []

    a = load_file(str(reference / "model" / "model.safetensors"))
    b = load_file(str(out / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    per_step = [(r["step"], r["loss"], r["lr"]) for r in metrics(reference)]
    assert [(r["step"], r["loss"], r["lr"]) for r in metrics(out)] == per_step
    assert [s for s, _, _ in per_step] == list(range(1, STEPS + 1))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_loss"] == json.loads((reference / "summary.json").read_text())["final_loss"]


def test_a_truncated_checkpoint_is_reported_in_one_line_and_left_in_place(reference, tiny_dir, tiny_squad, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    whole = (reference / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(whole[: len(whole) // 2])
    shutil.copy(reference / "metrics.jsonl", out / "metrics.jsonl")
    proc = run(train_args(tiny_dir, tiny_squad, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1
    errors = [line for line in stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert errors == [
        f"bertqa: error: {out / 'checkpoint.pt'}: truncated or not a checkpoint (RuntimeError); "
        "move it away to start over, or use another --output-dir"
    ], stderr
    # Nothing of the user's run was touched, nor a fresh run started over it.
    assert (out / "checkpoint.pt").read_bytes() == whole[: len(whole) // 2]
    assert (out / "metrics.jsonl").read_bytes() == (reference / "metrics.jsonl").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.jsonl"]


@pytest.fixture(scope="module")
def saved_state(reference):
    return torch.load(reference / "checkpoint.pt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda s: os.urandom(4096), r"truncated or not a checkpoint \(\w+\)"),
        (lambda s: b"", r"truncated or not a checkpoint \(EOFError\)"),
        (lambda s: [1, 2], r"not a bertqa training checkpoint \(no model, optimizer, .*, config\)"),
        (lambda s: {k: v for k, v in s.items() if k not in ("optimizer", "rng")}, r"\(no optimizer, rng\)"),
        (lambda s: {**s, "config": "{not json"}, r"damaged checkpoint \(bad config, world_size or rng\)"),
        (lambda s: {**s, "rng": []}, r"damaged checkpoint \(bad config, world_size or rng\)"),
        (
            lambda s: {**s, "step": STEPS + 1},
            rf"damaged checkpoint \(step {STEPS + 1}, not an integer in 0\.\.{STEPS}\)",
        ),
        (lambda s: {**s, "step": -2}, rf"damaged checkpoint \(step -2, not an integer in 0\.\.{STEPS}\)"),
        (lambda s: {**s, "step": 2.0}, rf"damaged checkpoint \(step 2\.0, not an integer in 0\.\.{STEPS}\)"),
        (lambda s: {**s, "skipped_steps": "3"}, r"damaged checkpoint \(bad skipped_steps or loss_since_log\)"),
        (lambda s: {**s, "skipped_steps": (1, -1)}, r"damaged checkpoint \(bad skipped_steps or loss_since_log\)"),
        (lambda s: {**s, "loss_since_log": [(1.5,)]}, r"damaged checkpoint \(bad skipped_steps or loss_since_log\)"),
        (lambda s: {**s, "loss_since_log": []}, r"damaged checkpoint \(bad skipped_steps or loss_since_log\)"),
        (lambda s: {**s, "metrics_sha256": 5}, r"damaged checkpoint \(bad metrics_sha256\)"),
    ],
)
def test_a_damaged_checkpoint_is_refused_with_one_line(damage, message, saved_state, tmp_path):
    path = tmp_path / "checkpoint.pt"
    bad = damage(saved_state)
    if isinstance(bad, bytes):
        path.write_bytes(bad)
    else:
        torch.save(bad, path)
    cfg = TrainConfig(**json.loads(saved_state["config"]))
    with pytest.raises(ValueError, match=message) as e:
        load_checkpoint(path, cfg, Dist(), (STEPS, 0), saved_state["resolved"], (STEPS, 0))
    text = str(e.value)
    assert "\n" not in text and text.startswith(f"{path}: ")
    assert text.endswith("; move it away to start over, or use another --output-dir")


def test_a_checkpoint_of_another_length_or_of_no_step_is_refused_in_one_line(saved_state, tmp_path):
    """(mutation review) The same settings over a train file since changed make another number of steps: no resume.
    A checkpoint whose step is not a number is not run over afresh with an internal error."""
    from bertqa.train import _model_run_id, refuse_to_replace

    path = tmp_path / "checkpoint.pt"
    cfg = TrainConfig(**json.loads(saved_state["config"]))
    torch.save({**saved_state, "total_steps": STEPS + 10}, path)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: cannot resume a different run \({STEPS + 10} "
                                         rf"steps -> {STEPS}: the training data differ\); use another --output-dir$"):  # fmt: skip
        load_checkpoint(path, cfg, Dist(), (STEPS, 0), saved_state["resolved"], (STEPS, 0))
    torch.save({**saved_state, "step": None}, path)
    with pytest.raises(ValueError, match=rf"how far its run got cannot be told \(step None of {STEPS}\); move it"):
        refuse_to_replace(path, cfg, Dist())
    # A model folder whose run_config.json is JSON but no object names no run (it crashed the check).
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "run_config.json").write_text("[1]")
    assert _model_run_id(tmp_path / "model") is None


def test_a_checkpoint_whose_bytes_rotted_is_refused_not_resumed_from(reference, saved_state, tmp_path, rot_record):
    """torch.load reads a record whose bytes changed on disk without a word; the zip's CRC tells."""
    path = tmp_path / "checkpoint.pt"
    record = rot_record(reference / "checkpoint.pt", path)
    torch.load(path, map_location="cpu", weights_only=True)  # no complaint from torch
    cfg = TrainConfig(**json.loads(saved_state["config"]))
    with pytest.raises(ValueError) as e:
        load_checkpoint(path, cfg, Dist(), (STEPS, 0), saved_state["resolved"], (STEPS, 0))
    assert str(e.value) == (f"{path}: damaged ({record} fails its checksum); move it away to start over, "
                            "or use another --output-dir")  # fmt: skip


def test_a_checkpoint_that_does_not_fit_the_model_is_refused_with_one_line(saved_state, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    state = {**saved_state, "model": {k: v for k, v in saved_state["model"].items() if "qa_outputs" not in k}}
    torch.save(state, out / "checkpoint.pt")
    cfg = TrainConfig(**{**json.loads(saved_state["config"]), "output_dir": str(out), "resume": True})
    with pytest.raises(ValueError, match=r"checkpoint.pt: does not fit this model \(.*qa_outputs.*\); move it away"):
        train(cfg)
    assert not (out / "metrics.jsonl").exists() and not (out / "model").exists()


def test_remove_stale_temps_removes_what_killed_writes_left_and_only_that(tmp_path):
    target, folder = tmp_path / "checkpoint.pt", tmp_path / "model"
    keep = [target, tmp_path / ".checkpoint.pt", tmp_path / ".summary.abc.tmp.json", tmp_path / ".checkpoint.x.pt",
            tmp_path / ".model.x", folder]  # fmt: skip
    for p in keep:
        p.write_text("x")
    # Live writes hold their temporary file's or folder's lock (here this process, as another process would).
    with atomic_path(target) as live:
        live.write_text("half")
        assert remove_stale_temps(target) == [] and live.exists()
        live.write_text("whole")
    assert target.read_text() == "whole"
    folder.unlink()
    with atomic_dir(folder) as live_dir:
        (live_dir / "weights").write_text("half")
        assert remove_stale_temps(folder) == [] and live_dir.exists()
    # The names they really use, as the same writes killed outright leave them: no process holds them.
    live.write_text("half")
    live_dir.mkdir()
    assert remove_stale_temps(target) == [live] and remove_stale_temps(folder) == [live_dir]
    assert sorted(tmp_path.iterdir()) == sorted(keep)


def test_a_claim_leaves_the_live_writes_of_other_processes_alone(tmp_path):
    # `convert` into OUT/model holds no lock on OUT: a `train --output-dir OUT` starting meanwhile deleted its
    # temporary folder, and the convert failed.
    out = tmp_path / "run"
    with atomic_dir(out / "model") as model, atomic_path(out / "checkpoint.pt") as checkpoint:
        (model / "config.json").write_text("{}")
        checkpoint.write_text("saved")
        with exclusive(out, clear=("checkpoint.pt", "model/")):
            pass
        assert model.exists() and checkpoint.exists()
    assert (out / "model" / "config.json").is_file() and (out / "checkpoint.pt").read_text() == "saved"


@contextmanager
def writer(call: str, write: str, target):
    """Another process inside `with CALL as w:` of bertqa.files (its path argument `target`), having run `write`, until
    killed: yields (its temporary file or folder, a function that kills it outright)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import sys, time\nfrom bertqa.files import {call.split('(')[0]}\n"
         f"with {call} as w:\n    {write}\n    print(w, flush=True)\n    time.sleep(300)", str(target)],
        stdout=subprocess.PIPE, text=True)  # fmt: skip

    def kill():
        holder.send_signal(signal.SIGKILL)
        assert holder.wait(timeout=30) == -signal.SIGKILL

    try:
        yield holder.stdout.readline().strip(), kill
    finally:
        holder.kill()
        holder.wait()


def test_a_file_write_clears_what_a_killed_write_of_the_same_file_left(tmp_path):
    # `predict --output` takes no lock: each atomic_path locks its temporary file, and clears the ones of the
    # same file that no live process holds.
    target = tmp_path / "pred.json"
    with writer("atomic_path(sys.argv[1])", "w.write_text('half')", target) as (theirs, kill):  # as a predict does
        bertqa.files.write_json(target, {"v": 1})
        assert sorted(map(str, tmp_path.iterdir())) == sorted([theirs, str(target)])  # a live one is kept
        kill()
        bertqa.files.write_json(target, {"v": 2})
        assert list(tmp_path.iterdir()) == [target] and json.loads(target.read_text()) == {"v": 2}


def test_a_scratch_folder_is_cleared_once_its_process_is_killed(tmp_path):
    # a process writing in its scratch folder, as an ONNX export does
    with writer("scratch_dir(sys.argv[1], 'onnx-export')", "(w / 'fp32.onnx').write_bytes(b'half')",
                tmp_path / "model.onnx") as (theirs, kill):  # fmt: skip
        with scratch_dir(tmp_path / "model.onnx", "onnx-export") as ours:
            assert sorted(map(str, tmp_path.iterdir())) == sorted([theirs, str(ours)])  # a live one is kept
        kill()
        assert [str(p) for p in tmp_path.iterdir()] == [theirs]  # left behind, as a killed export leaves it
        with scratch_dir(tmp_path / "model.onnx", "onnx-export") as ours:
            assert list(tmp_path.iterdir()) == [ours] and list(ours.iterdir()) == []
        assert list(tmp_path.iterdir()) == []


def test_a_folder_write_clears_what_a_killed_write_to_the_same_folder_left(tmp_path):
    # `bertqa convert` holds no lock on its output's parent: each atomic_dir locks its own temporary folders, and
    # clears only those that no live process holds.
    target = tmp_path / "model"
    # a process writing the folder, as a convert saving a model does
    with writer("atomic_dir(sys.argv[1])", "(w / 'model.safetensors').write_bytes(b'half')", target) as (theirs, kill):
        with atomic_dir(target) as ours:
            (ours / "config.json").write_text("{}")
            assert sorted(map(str, tmp_path.iterdir())) == sorted([theirs, str(ours)])  # a live one is kept
        kill()
        assert sorted(map(str, tmp_path.iterdir())) == sorted([theirs, str(target)])  # left, as a killed convert
        with atomic_dir(target) as ours:
            (ours / "config.json").write_text('{"new": 1}')
            assert sorted(tmp_path.iterdir()) == [ours, target]
        assert list(tmp_path.iterdir()) == [target] and (target / "config.json").read_text() == '{"new": 1}'
    # Killed between its two renames: the previous folder was moved aside and the new one not yet put in place.
    # The next write to it puts the previous one back first (and keeps it when it fails itself).
    aside = tmp_path / ".model.old-k1ll3d00"
    aside.mkdir()
    target.rename(aside / "model")
    (tmp_path / ".model.tmp-k1ll3d00").mkdir()  # the new version, never put in place
    (tmp_path / ".model.old-3mpty000").mkdir()  # another write's, killed before it moved the folder aside
    with pytest.raises(RuntimeError, match="stop"), atomic_dir(target):
        raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == [target] and (target / "config.json").read_text() == '{"new": 1}'
    # Another output's, whose names begin as this one's, are left to it: "model.old-1", and names that `_fit` cuts
    # to the same first 241 bytes.
    for other, name in (("model.old-1", "model"), ("x" * 250 + "B", "x" * 250 + "A")):
        aside = tmp_path / f"{_tmp_dir_prefix(tmp_path / other, 'old')}k1ll3d00"
        aside.mkdir()
        (aside / other).mkdir()
        (aside / other / "config.json").write_text("its previous version")
        with atomic_dir(tmp_path / name) as ours:
            (ours / "config.json").write_text("{}")
        assert (aside / other / "config.json").is_file()
        with atomic_dir(tmp_path / other) as ours:  # its own next write puts it back first
            assert (tmp_path / other / "config.json").read_text() == "its previous version" and not aside.exists()
            (ours / "config.json").write_text("{}")


def test_a_folder_named_relatively_from_inside_it_is_replaced_whole(tmp_path, monkeypatch):
    """After the folder is moved aside, a relative name would be looked up from inside it (the current folder,
    moved with it): the new folder was not put in place, nor the old one back."""
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("{}")
    monkeypatch.chdir(target)
    with atomic_dir("../model") as new:
        (new / "config.json").write_text('{"new": 1}')
    monkeypatch.chdir(tmp_path)
    assert list(tmp_path.iterdir()) == [target] and (target / "config.json").read_text() == '{"new": 1}'


def test_ctrl_c_during_the_renames_waits_until_they_are_done(tmp_path, monkeypatch):
    """A set of prediction files (an old predictions.json beside a new n-best was left), and a folder between its
    two renames (missing until the next save): SIGINT is delivered once the renames are done."""
    write_json_files({tmp_path / "p.json": {"q": "old"}, tmp_path / "n.json": ["old"]})
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    renames = []

    def interrupted(rename):
        def wrapper(*args):
            renames.append(args)
            if len(renames) == 1:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C at the first rename
            return rename(*args)

        return wrapper

    monkeypatch.setattr(bertqa.files.os, "replace", interrupted(os.replace))
    with pytest.raises(KeyboardInterrupt):
        write_json_files({tmp_path / "p.json": {"q": "new"}, tmp_path / "n.json": ["new"]})
    assert len(renames) == 2 and json.loads((tmp_path / "n.json").read_text()) == ["new"]
    assert json.loads((tmp_path / "p.json").read_text()) == {"q": "new"}
    renames.clear()
    monkeypatch.setattr(Path, "rename", interrupted(Path.rename))
    with pytest.raises(KeyboardInterrupt), atomic_dir(tmp_path / "model") as new:
        (new / "config.json").write_text('{"new": 1}')
    assert json.loads((tmp_path / "model" / "config.json").read_text()) == {"new": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "n.json", "p.json"]


def test_what_goes_with_a_swapped_folder_runs_once_it_is_in_place_whatever_fails_after(tmp_path, monkeypatch):
    """`replaced` runs before a Ctrl-C held during the swap is delivered, and also where the folder's flush after
    the rename fails (it was skipped: train's earlier results stayed beside its new model under a SIGTERM). A
    `replaced` that is no function is refused before anything is written."""
    (tmp_path / "model").mkdir()
    ran = []

    def flush_fails(path):
        if Path(path) == tmp_path:
            raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(bertqa.files, "fsync_path", flush_fails)
    with pytest.raises(OSError, match="Input/output error"):
        with atomic_dir(tmp_path / "model", durable=True, replaced=lambda: ran.append("flush")) as new:
            (new / "config.json").write_text("{}")
    monkeypatch.undo()

    def replaced():
        ran.append(signal.getsignal(signal.SIGINT) is signal.default_int_handler)  # (False: still held)

    with pytest.raises(KeyboardInterrupt), atomic_dir(tmp_path / "model", replaced=replaced) as new:
        (new / "config.json").write_text('{"new": 1}')
        os.kill(os.getpid(), signal.SIGINT)  # before the swap: raised here, nothing replaced
    rename = Path.rename

    def interrupted(*args):
        os.kill(os.getpid(), signal.SIGINT)  # during the swap: held
        return rename(*args)

    monkeypatch.setattr(Path, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt), atomic_dir(tmp_path / "model", replaced=replaced) as new:
        (new / "config.json").write_text('{"new": 2}')
    assert ran == ["flush", False] and json.loads((tmp_path / "model" / "config.json").read_text()) == {"new": 2}
    with pytest.raises(TypeError, match="^replaced must be a function"):
        with atomic_dir(tmp_path / "other", replaced="remove the old results"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_every_signal_held_is_delivered():
    """A SIGTERM held after a Ctrl-C reaches its handler too (the KeyboardInterrupt of the first stopped the rest),
    and both handlers are back afterwards. Each handler raises, as a server's SIGTERM handler does: the SIGTERM's
    goes first and the Ctrl-C still reaches its own after it (the user's interrupt is what the caller sees)."""
    got = []

    def term(signum, frame):
        got.append("TERM")
        raise SystemExit(143)

    def interrupt(signum, frame):
        got.append("INT")
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, term), signal.signal(signal.SIGINT, interrupt)
    try:
        with pytest.raises(KeyboardInterrupt), bertqa.files.deferred_signals():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
            assert got == []  # held
        assert got == ["TERM", "INT"] and signal.getsignal(signal.SIGINT) is interrupt
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


def test_a_folder_that_cannot_be_moved_aside_leaves_no_old_folder(tmp_path, monkeypatch):
    """Replacing a folder that cannot be renamed (the current folder: EBUSY) fails whole: the folder as it was and
    nothing beside it (the empty `.NAME.old-*` folder made for it was left behind)."""
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("{}")
    rename = Path.rename

    def busy(self, dest):
        if self == target:
            raise OSError(errno.EBUSY, "Device or resource busy", str(self))
        return rename(self, dest)

    monkeypatch.setattr(Path, "rename", busy)
    with pytest.raises(OSError, match="busy"), atomic_dir(target) as new:
        (new / "config.json").write_text('{"new": 1}')
    assert list(tmp_path.iterdir()) == [target] and (target / "config.json").read_text() == "{}"


def test_a_folder_another_writer_removes_while_it_is_cleared_is_passed_over(tmp_path, monkeypatch):
    # Another write to the same output made `.model.old-*` and lost it to this one's lock before taking it: it
    # removes the (empty) folder and makes another. This write, which has just locked it, goes on without it.
    import bertqa.files as files

    target = tmp_path / "model"
    target.mkdir()
    theirs = tmp_path / f"{_tmp_dir_prefix(target, 'old')}r4c1ng00"
    theirs.mkdir()
    real = files._lock

    def lock(path, folder=True):
        fd = real(path, folder)
        if fd is not None and path == theirs:  # the other writer, right after: its lock fails, it removes the folder
            assert real(path) is None
            shutil.rmtree(path)
        return fd

    monkeypatch.setattr(files, "_lock", lock)
    with atomic_dir(target) as ours:
        (ours / "config.json").write_text("{}")
    assert list(tmp_path.iterdir()) == [target] and (target / "config.json").is_file()


def test_where_folders_cannot_be_locked_the_scratch_and_the_claim_still_work(tmp_path, monkeypatch):
    import fcntl

    def no_locks(fd, operation):  # NFSv4 answers flock on a folder so; some FUSE mounts with ENOLCK
        raise OSError(9, "Bad file descriptor")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    (tmp_path / ".onnx-export-k1ll3d00").mkdir()  # a killed export's, which cannot be told from a live one's
    (tmp_path / ".model.tmp-k1ll3d00").mkdir()  # a killed convert's, likewise
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".checkpoint.k1ll3d00.tmp.pt").write_text("half")  # a killed or a live train's
    with (
        scratch_dir(tmp_path / "model.onnx", "onnx-export") as ours,
        exclusive(tmp_path / "run", clear=["checkpoint.pt"]),
    ):
        (ours / "fp32.onnx").write_bytes(b"graph")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [".model.tmp-k1ll3d00", ".onnx-export-k1ll3d00", ours.name, "run"]
        )
        assert [p.name for p in (tmp_path / "run").iterdir()] == [".checkpoint.k1ll3d00.tmp.pt"]
    with atomic_dir(tmp_path / "model") as ours:
        (ours / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.tmp-k1ll3d00", ".onnx-export-k1ll3d00", "model",
                                                          "run"]  # fmt: skip
    assert (tmp_path / "model" / "config.json").read_text() == "{}"


def test_a_folder_made_for_a_failed_block_is_removed_and_no_other(tmp_path, monkeypatch):
    with pytest.raises(RuntimeError), exclusive(tmp_path / "runs" / "eval"):
        raise RuntimeError("the run failed before writing")
    assert list(tmp_path.iterdir()) == []  # nor the folder made above it
    (tmp_path / "mine").mkdir()
    with pytest.raises(RuntimeError), exclusive(tmp_path / "mine"):
        raise RuntimeError
    with pytest.raises(RuntimeError), exclusive(tmp_path / "written"):
        (tmp_path / "written" / "metrics.jsonl").write_text("{}\n")
        raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "written"]
    # Another run made the folder and took it between our look and our lock: its folder, not ours to remove.
    monkeypatch.setattr(bertqa.files, "_lock", lambda folder: None)
    with pytest.raises(ValueError, match="another run is writing here"), exclusive(tmp_path / "theirs"):
        pass
    assert (tmp_path / "theirs").is_dir()


def test_an_output_folder_reached_through_a_symlink_is_held_as_the_folder(tmp_path):
    (tmp_path / "runs" / "0412").mkdir(parents=True)
    (tmp_path / "latest").symlink_to(tmp_path / "runs" / "0412")
    with exclusive(tmp_path / "latest"):  # was refused: "another run is writing here", always
        with pytest.raises(ValueError, match="another run is writing here"), exclusive(tmp_path / "runs" / "0412"):
            pass
    with exclusive(tmp_path / "runs" / "0412"), pytest.raises(ValueError, match="another run is writing here"):
        with exclusive(tmp_path / "latest"):
            pass


def test_a_folder_killed_between_its_two_renames_is_put_back(tmp_path):
    folder = tmp_path / "model"
    (tmp_path / ".model.old-abcd1234" / "model").mkdir(parents=True)  # the previous folder, moved aside
    (tmp_path / ".model.old-abcd1234" / "model" / "weights").write_text("previous")
    (tmp_path / ".model.tmp-defg5678").mkdir()  # the new one, never renamed into place
    remove_stale_temps(folder)
    assert (folder / "weights").read_text() == "previous" and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_second_run_on_the_same_output_folder_is_refused(tiny_dir, tiny_squad, tmp_path):
    out = tmp_path / "run"
    with exclusive(out):  # as a first run holds it
        r = subprocess.run([sys.executable, "-m", "bertqa", *map(str, train_args(tiny_dir, tiny_squad, out))],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 1 and f"{out}: another run is writing here" in r.stderr, r.stderr
    assert list(out.iterdir()) == []


def test_a_second_evaluation_into_the_same_output_folder_is_refused(tiny_dir, tiny_squad, tmp_path):
    """Two evaluations into one folder would leave one's predictions beside the other's summary."""
    out = tmp_path / "eval"
    args = ["evaluate", "--model", tiny_dir, "--predict-file", tiny_squad, "--output-dir", out, "--cache-dir", "none",
            "--no-progress", "--precision", "fp32", "--max-seq-length", 128, "--doc-stride", 64,
            "--max-query-length", 32]  # fmt: skip
    with exclusive(out):  # as a first evaluation holds it
        r = subprocess.run([sys.executable, "-m", "bertqa", *map(str, args)], capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert r.returncode == 1 and f"{out}: another run is writing here" in r.stderr, r.stderr
    assert list(out.iterdir()) == []
    # What an evaluation killed while writing leaves: the next one, holding the folder, clears it.
    stale = [out / ".predictions.k1ll3d00.tmp.json", out / ".summary.k1ll3d00.tmp.json"]
    for path in stale:
        path.write_text("{")
    r = subprocess.run([sys.executable, "-m", "bertqa", *map(str, args)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and (out / "summary.json").is_file(), r.stderr
    assert not any(path.exists() for path in stale)


def test_a_kill_while_metrics_are_rewritten_on_resume_loses_no_line(reference, tiny_dir, tiny_squad, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("checkpoint.pt", "metrics.jsonl"):  # a run that saved its last checkpoint, then was killed
        shutil.copy(reference / name, out / name)
    marker = tmp_path / "metrics-opened"
    proc = run(train_args(tiny_dir, tiny_squad, out), hooks={"STALL_METRICS": marker}, stdout=subprocess.DEVNULL,
               stderr=subprocess.DEVNULL)  # fmt: skip
    kill_when(proc, marker.exists)
    assert (out / "metrics.jsonl").read_bytes() == (reference / "metrics.jsonl").read_bytes()


# A model folder replaced (a convert, a train's save: a whole new folder renamed in) while a reader loads it.


@pytest.fixture
def versions(minilm_dir, tmp_path):
    """A tiny QA model folder `model`, what replaces it (`next`, other weights) and a replacer for a loader:
    `swap()` renames a fresh copy of `next` in place of `model`, as atomic_dir does; `swap(missing=...)` calls
    a load while there is no `model` (between the renames), and puts the copy in place after it."""
    from bertqa import load_tokenizer, save_pretrained
    from bertqa.config import BertConfig
    from bertqa.model import BertForQuestionAnswering

    tokenizer = load_tokenizer(minilm_dir)
    folders = {}
    for seed, name in ((0, "model"), (1, "next")):
        torch.manual_seed(seed)
        net = BertForQuestionAnswering(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16,
                                                  num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))  # fmt: skip
        folders[name] = save_pretrained(net, tokenizer, tmp_path / name)
    model, nxt = folders["model"], folders["next"]
    state = {"version": 0}

    def swap(missing=None):
        state["version"] += 1
        model.rename(tmp_path / f"gone{state['version']}")
        try:
            return missing() if missing else None
        finally:
            shutil.copytree(nxt, tmp_path / "copy")
            (tmp_path / "copy").rename(model)

    def tagged(load):  # a tokenizer says which version of the folder it was read from
        def read(*args, **kwargs):
            tokenizer = load(*args, **kwargs)
            tokenizer.version = state["version"]
            return tokenizer

        return read

    return model, load_file(nxt / "model.safetensors")["qa_outputs.weight"], swap, tagged, state


def _replacing_before(load, swap, times=1):
    calls = []

    def replaced(*args, **kwargs):
        calls.append(1)
        if len(calls) <= times:
            swap()
        return load(*args, **kwargs)

    return replaced


def test_a_model_folder_replaced_between_weights_and_tokenizer_is_read_again(versions, monkeypatch):
    """The weights of one version with the tokenizer of the next answered wrongly, and nothing said so."""
    import bertqa.qa

    model, next_head, swap, tagged, state = versions
    monkeypatch.setattr(bertqa.qa, "load_tokenizer", tagged(_replacing_before(bertqa.qa.load_tokenizer, swap)))
    qa = bertqa.qa.QuestionAnswerer.from_pretrained(model, device="cpu", precision="fp32")
    assert torch.equal(qa.model.qa_outputs.weight, next_head) and qa.tokenizer.version == state["version"] == 1


def test_evaluate_reads_a_model_folder_replaced_while_loading_again(versions, tiny_squad, monkeypatch):
    import bertqa.evaluate
    from bertqa.evaluate import EvalConfig, load_tokenizer_and_model

    model, next_head, swap, tagged, state = versions
    monkeypatch.setattr(bertqa.evaluate, "load_tokenizer", tagged(bertqa.evaluate.load_tokenizer))
    monkeypatch.setattr(bertqa.evaluate, "load_model", _replacing_before(bertqa.evaluate.load_model, swap))
    cfg = EvalConfig(model=str(model), predict_file=str(tiny_squad), output_dir="unused", precision="fp32")
    tokenizer, net = load_tokenizer_and_model(cfg, Dist())
    assert torch.equal(net.qa_outputs.weight, next_head) and tokenizer.version == state["version"] == 1


def test_convert_of_a_model_folder_replaced_while_loading_writes_one_version(versions, tmp_path, monkeypatch):
    import bertqa.tokenizer
    from bertqa import cli

    model, next_head, swap, tagged, state = versions
    monkeypatch.setattr(bertqa.tokenizer, "load_tokenizer", _replacing_before(bertqa.tokenizer.load_tokenizer, swap))
    assert cli.main(["convert", str(model), str(tmp_path / "out")]) == 0
    assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")["qa_outputs.weight"], next_head)


def test_a_model_folder_missing_for_a_moment_while_it_is_replaced_is_read_again(versions, monkeypatch):
    import bertqa.qa

    model, next_head, swap, tagged, state = versions
    real, calls = bertqa.qa.load_model, []

    def load_between_the_renames(*args, **kwargs):
        calls.append(1)
        return swap(missing=lambda: real(*args, **kwargs)) if len(calls) == 1 else real(*args, **kwargs)

    monkeypatch.setattr(bertqa.qa, "load_model", load_between_the_renames)
    qa = bertqa.qa.QuestionAnswerer.from_pretrained(model, device="cpu", precision="fp32")
    assert torch.equal(qa.model.qa_outputs.weight, next_head) and len(calls) == 2


def test_a_model_folder_replaced_at_every_read_is_refused_in_one_line(versions, monkeypatch):
    import bertqa.qa

    model, next_head, swap, tagged, state = versions
    monkeypatch.setattr(bertqa.qa, "load_tokenizer", _replacing_before(bertqa.qa.load_tokenizer, swap, times=99))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(model))}: replaced while it was being read, 3 times") as e:
        bertqa.qa.QuestionAnswerer.from_pretrained(model, device="cpu", precision="fp32")
    assert state["version"] == 3
    from bertqa import cli

    assert cli.error_line(e.value, debug=False) == str(e.value)  # the user's situation, not an "internal error"


def test_a_folder_replaced_twice_in_one_load_is_told_although_its_inode_number_comes_back(versions, monkeypatch):
    """Each save deletes the folder it replaced: on ext4 the second one's folder got the inode number the first
    freed, the one the load started with, so the load looked undisturbed (the weights of the first version, the
    tokenizer of the third)."""
    import bertqa.qa

    model, next_head, swap, tagged, state = versions
    nxt, load = model.parent / "next", bertqa.qa.load_tokenizer

    def saved_twice(*args, **kwargs):
        if not state["version"]:
            for _ in range(2):  # as atomic_dir does: the new folder renamed in, then the old one deleted
                state["version"] += 1
                with atomic_dir(model) as new:
                    for f in nxt.iterdir():
                        shutil.copy(f, new / f.name)
        return load(*args, **kwargs)

    monkeypatch.setattr(bertqa.qa, "load_tokenizer", saved_twice)
    qa = bertqa.qa.QuestionAnswerer.from_pretrained(model, device="cpu", precision="fp32")
    assert torch.equal(qa.model.qa_outputs.weight, next_head) and state["version"] == 2


def test_what_a_load_notes_is_said_once_however_often_it_is_read(minilm_dir, tmp_path, monkeypatch, capsys):
    """A pretrained encoder's notes (no QA head: a fresh one) were printed by every try."""
    import bertqa.tokenizer
    from bertqa import cli, load_model, save_pretrained

    encoder = load_model(minilm_dir, verbose=False)
    tokenizer = bertqa.tokenizer.load_tokenizer(minilm_dir)
    model = save_pretrained(encoder, tokenizer, tmp_path / "encoder", with_qa_head=False)
    load, calls = bertqa.tokenizer.load_tokenizer, []

    def replaced_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            with atomic_dir(model) as new:
                for f in (tmp_path / "encoder").iterdir():
                    shutil.copy(f, new / f.name)
        return load(*args, **kwargs)

    monkeypatch.setattr(bertqa.tokenizer, "load_tokenizer", replaced_once)
    assert cli.main(["convert", str(model), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert len(calls) == 2 and out.count("no QA head in the checkpoint: qa_outputs initialised fresh") == 1, out


def test_export_of_a_model_folder_replaced_while_loading_exports_one_version(versions, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from bertqa import export

    model, next_head, swap, tagged, state = versions
    monkeypatch.setattr(export, "load_tokenizer", _replacing_before(export.load_tokenizer, swap))
    traced = []

    def trace(net, dst, opset, pad_id):  # the model as it reaches the exporter (and no slow trace)
        traced.append(net.qa_outputs.weight.detach().clone())
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "_export_graph", trace)
    with pytest.raises(KeyboardInterrupt):
        export.export_onnx(model, tmp_path / "model.onnx", verbose=False, max_seq_length=64, doc_stride=32,
                           max_query_length=16)  # fmt: skip
    assert len(traced) == 1 and torch.equal(traced[0], next_head)


def _run_every_command(run_here, tiny_dir, tiny_squad, tmp_path):
    """convert (twice: the second replaces the folder), evaluate, predict, train (checkpoints; twice: the second
    over the first's finished run) and export into `tmp_path`; each must succeed, writing its outputs and nothing
    else."""
    windows = ["--max-seq-length", 128, "--doc-stride", 32]
    train = ["--max-steps", 2, "--batch-size", 4, "--save-every", 1, "--cache-dir", "none"]
    commands = [
        ["convert", tiny_dir, tmp_path / "conv"],
        ["convert", tiny_dir, tmp_path / "conv"],
        ["evaluate", "--model", tiny_dir, "--predict-file", tiny_squad, "--output-dir", tmp_path / "ev", *windows],
        ["predict", "--model", tiny_dir, "--input", tiny_squad, "--output", tmp_path / "p.json", *windows],
        ["train", "--model", tiny_dir, "--train-file", tiny_squad, "--output-dir", tmp_path / "tr", *train, *windows],
        ["train", "--model", tiny_dir, "--train-file", tiny_squad, "--output-dir", tmp_path / "tr", *train, *windows],
        ["export", "onnx", "--model", tiny_dir, "--output", tmp_path / "m.onnx", *windows],
    ]
    for args in commands:
        result = run_here(*args)
        assert result.returncode == 0, (args[0], result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv", "ev", "m.onnx", "p.json", "p.nbest.json", "tr"]
    assert sorted(p.name for p in (tmp_path / "tr").iterdir()) == ["checkpoint.pt", "curves.png", "metrics.jsonl",
                                                                   "model", "summary.json"]  # fmt: skip
    assert (tmp_path / "conv" / "model.safetensors").is_file() and (tmp_path / "ev" / "summary.json").is_file()


def test_on_windows_every_command_writes_its_outputs_and_leaves_nothing_else(like_windows, run_here, tiny_dir,
                                                                             tiny_squad, tmp_path):  # fmt: skip
    """(review) The lock of an output folder opened the folder before finding that there are no locks (Windows:
    no fcntl), and Windows opens no folder: convert, evaluate, train and export each failed with 'Permission
    denied', leaving their temporary or output folder behind."""
    _run_every_command(run_here, tiny_dir, tiny_squad, tmp_path)


def test_where_chmod_is_refused_every_command_writes_its_outputs(chmod_refused, run_here, tiny_dir, tiny_squad,
                                                                 tmp_path):  # fmt: skip
    """Every output's temporary file was given its mode (mkstemp makes it 0600) with a chmod that a file system
    keeping no modes may refuse: every command failed there after its work ("Function not implemented" on a
    FUSE-mounted FAT image)."""
    _run_every_command(run_here, tiny_dir, tiny_squad, tmp_path)


def test_a_folder_another_command_is_only_checking_is_not_taken_for_a_runs(tmp_path):
    """(review) check_not_claimed (predict --output, convert, a train's checks) takes a shared lock on a folder for
    a moment: a train or an evaluate taking that folder at that moment was refused as if another run wrote there."""
    import fcntl
    import threading

    folder = tmp_path / "out"
    folder.mkdir()
    fd = os.open(folder, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)  # a check, caught in the middle
    threading.Timer(0.005, os.close, [fd]).start()
    with exclusive(folder):
        (folder / "summary.json").write_text("{}")
    assert [p.name for p in folder.iterdir()] == ["summary.json"]


def test_on_windows_read_only_outputs_are_replaced_and_keep_their_mode(like_windows, run_here, tiny_dir, tiny_squad,
                                                                       tmp_path):  # fmt: skip
    """(review) Windows neither deletes nor replaces a read-only file: a read-only --output failed after the work,
    leaving its temporary file (read-only too) and the new n-best beside the old predictions; a model folder of
    read-only files, replaced, was left whole beside the new one at every save (rmtree's errors ignored)."""
    windows = ["--max-seq-length", 128, "--doc-stride", 32, "--cache-dir", "none"]
    predict = ["predict", "--model", tiny_dir, "--input", tiny_squad, "--output", tmp_path / "p.json", *windows]
    assert run_here(*predict).returncode == 0
    first = (tmp_path / "p.json").read_bytes()
    (tmp_path / "p.json").write_text("{}", encoding="utf-8")
    for name in ("p.json", "p.nbest.json"):
        (tmp_path / name).chmod(0o444)
    result = run_here(*predict)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "p.json").read_bytes() == first and (tmp_path / "p.json").stat().st_mode & 0o777 == 0o444
    assert run_here("convert", tiny_dir, tmp_path / "conv").returncode == 0
    for file in (tmp_path / "conv").iterdir():
        file.chmod(0o444)
    for _ in range(2):
        result = run_here("convert", tiny_dir, tmp_path / "conv")
        assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv", "p.json", "p.nbest.json"]
    assert all(file.stat().st_mode & 0o777 == 0o444 for file in (tmp_path / "conv").iterdir())


def test_on_windows_a_run_over_read_only_earlier_curves_trains_and_sets_them_aside(like_windows, run_here, tiny_dir,
                                                                                   tiny_squad, tmp_path):  # fmt: skip
    """(review) A fresh train into a folder whose earlier metrics.jsonl was read-only gave its own that mode, then
    could not open it to append (Windows; POSIX too, for a user other than root): it failed with the earlier
    curves hidden (.metrics.jsonl.before-*), and every later run into the folder failed putting them back. With
    the earlier TensorBoard events read-only, the run failed at its first checkpoint, removing them."""
    out = tmp_path / "out"
    train = ["train", "--model", tiny_dir, "--train-file", tiny_squad, "--output-dir", out, "--max-seq-length", 128,
             "--doc-stride", 32, "--cache-dir", "none", "--max-steps", 2, "--batch-size", 4, "--save-every", 1,
             "--log-every", 1, "--tensorboard"]  # fmt: skip
    for attempt in range(3):
        result = run_here(*train)
        assert result.returncode == 0, (attempt, result.stderr)
        assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
        assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
        for file in [out / "metrics.jsonl", *(out / "tensorboard").iterdir()]:
            file.chmod(0o444)
    # (diff review) Its own metrics.jsonl, read-only as the earlier one was: a resume could not append to it.
    result = run_here(*train, "--resume")
    assert result.returncode == 0, result.stderr
    assert (out / "metrics.jsonl").stat().st_mode & 0o777 == 0o444
