"""Fine-tuning and evaluation end to end on a tiny model and a few real SQuAD questions."""

import contextlib
import dataclasses
import errno
import functools
import importlib.util
import io
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from official_squad import official_v1, official_v2
from safetensors.torch import load_file
from skips import file_size_limit, platform_skip

import bertqa.evaluate
import bertqa.files
import bertqa.train
from bertqa import cli
from bertqa.evaluate import EvalConfig, evaluate
from bertqa.files import exclusive
from bertqa.train import TrainConfig, lr_factor, schedule_steps, train

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def small_squad(tiny_squad, tmp_path_factory):
    """tests/data/tiny-squad.json as two long paragraphs (three and two of its contexts joined, answer offsets
    moved along), so that windows overflow at --max-seq-length 128 and stride: the same file to train on and
    to evaluate."""
    doc = json.loads(tiny_squad.read_text())
    paragraphs = [p for a in doc["data"] for p in a["paragraphs"]]
    merged = []
    for group in (paragraphs[:3], paragraphs[3:]):
        context, qas = "", []
        for p in group:
            shift = len(context) + (1 if context else 0)
            context = f"{context} {p['context']}" if context else p["context"]
            for q in p["qas"]:
                answers = [{**a, "answer_start": a["answer_start"] + shift} for a in q["answers"]]
                qas.append({**q, "answers": answers})
        merged.append({"context": context, "qas": qas})
    out = tmp_path_factory.mktemp("squad") / "small.json"
    out.write_text(json.dumps({"version": "1.1", "data": [{"title": "tiny", "paragraphs": merged}]}))
    return out, out


@pytest.fixture(scope="module")
def tiny_nodrop(tiny_dir, tmp_path_factory):
    """The tiny model without dropout, so runs with different batch layouts compute the same thing."""
    out = tmp_path_factory.mktemp("nodrop")
    for p in tiny_dir.iterdir():
        shutil.copy(p, out / p.name)
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def cfg_for(model, squad, out, **kw):
    train_file, dev_file = squad
    base = dict(model=str(model), train_file=str(train_file), output_dir=str(out), max_seq_length=128,
                doc_stride=64, max_query_length=32, train_batch_size=4, lr=1e-3, warmup=0.1, max_steps=6,
                log_every=1, cache_dir=None, progress=False, precision="fp32")  # fmt: skip
    return TrainConfig(**{**base, **kw})


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lr_schedule_warms_up_then_decays_to_zero():
    f = [lr_factor(s, 10, 100) for s in range(100)]
    assert f[0] == 0.0 and f[5] == pytest.approx(0.5) and f[10] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:10], f[1:11])) and all(a > b for a, b in zip(f[10:], f[11:]))
    assert f[99] == pytest.approx(1 / 90) and lr_factor(100, 10, 100) == 0.0


def test_step_counts_are_not_thrown_off_by_binary_fractions():
    assert 1.1 * 100 > 110 and 0.29 * 100 < 29  # what a plain ceil / int would round the wrong way
    assert schedule_steps(1.1, 100, None, 0.29) == (110, 31)  # int(0.29 * 110) = 31.9 -> 31
    assert schedule_steps(1.0, 100, None, 0.29) == (100, 29)
    assert schedule_steps(1.05, 100, None, 0.1) == (105, 10)  # a real fraction still rounds up / down
    assert schedule_steps(1.5, 3, None, 0.1) == (5, 0)  # (mutation review) 4.5 steps round up
    # (mutation review) A warm-up over every step is a schedule; none over none too.
    for warmup in (0.0, 1.0):
        TrainConfig(model="m", train_file="x", output_dir="o", warmup=warmup).check_values()
    assert schedule_steps(1.0, 10, None, 1.0) == (10, 10)
    # (mutation review) The ends of the seed's range are in it.
    for seed in (0, 2**63 - 1):
        TrainConfig(model="m", train_file="x", output_dir="o", seed=seed).check_values()
    with pytest.raises(ValueError, match=r"^--seed must be an integer in 0\.\.2\^63-1, got 9223372036854775808$"):
        TrainConfig(model="m", train_file="x", output_dir="o", seed=2**63).check_values()
    assert schedule_steps(2.0, 100, 7, 0.5) == (7, 3)  # --max-steps wins
    assert schedule_steps(1e-9, 100, None, 0.1) == (
        1,
        0,
    )  # a tiny --epochs trains a step, not none (an untrained model)
    with pytest.raises(ValueError, match=r"--epochs 1e\+308: too many steps"):  # was an internal OverflowError
        schedule_steps(1e308, 100, None, 0.1)


def test_a_checkpoint_saved_before_the_schedule_was_recorded_resumes_on_its_own_schedule(tiny_dir, small_squad,
                                                                                         tmp_path):  # fmt: skip
    """0.58 x 50 is 28.999999999999996: runs before schedule_steps rounded warmed up for 28 steps, and a resume of
    their checkpoint must go on with 28, not switch to 29 halfway (or refuse it, where the total differs)."""

    def crash(step, loss):
        if step == 5:
            raise KeyboardInterrupt  # after the checkpoint at step 4

    def lr_at(out, step):
        return next(r["lr"] for r in read_jsonl(out / "metrics.jsonl") if r["step"] == step)

    kw = dict(max_steps=50, warmup=0.58, save_every=4, log_every=1)
    for older in (True, False):
        out = tmp_path / f"older-{older}"
        with pytest.raises(KeyboardInterrupt):
            train(cfg_for(tiny_dir, small_squad, out, **kw), on_step=crash)
        state = torch.load(out / "checkpoint.pt", weights_only=True)
        assert (state["total_steps"], state["warmup_steps"]) == (50, 29)
        if older:
            del state["warmup_steps"]
            torch.save(state, out / "checkpoint.pt")
        train(cfg_for(tiny_dir, small_squad, out, resume=True, **kw))
        warmup = 28 if older else 29
        assert lr_at(out, 29) == pytest.approx(1e-3 * lr_factor(28, warmup, 50))  # step 29 runs at index 28
        assert torch.load(out / "checkpoint.pt", weights_only=True)["warmup_steps"] == warmup


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="needs tensorboard")
def test_a_file_where_tensorboard_writes_is_refused_before_any_work(tmp_path):
    """It failed after the model and the features were loaded, with an earlier run's metrics.jsonl emptied."""
    from bertqa.train import MetricsLog

    (tmp_path / "tensorboard").write_text("mine")
    (tmp_path / "metrics.jsonl").write_text('{"step": 10, "loss": 1.0}\n')
    cfg = TrainConfig(model=".", train_file=__file__, output_dir=str(tmp_path), tensorboard=True)
    with pytest.raises(ValueError, match=f"--output-dir {tmp_path}: {tmp_path / 'tensorboard'}, where --tensorboard"):
        cfg.validate()
    with pytest.raises(OSError):
        MetricsLog(tmp_path, tensorboard=True)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 10, "loss": 1.0}\n'  # not emptied first
    (tmp_path / "tensorboard").unlink()
    (tmp_path / "tensorboard").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="where --tensorboard writes, is a symbolic link to nothing"):
        cfg.validate()
    (tmp_path / "tensorboard").unlink()
    cfg.tensorboard = False
    cfg.validate()
    # A checkpoint kept on another disk, not mounted now: --resume would start over and write onto the mount point.
    (tmp_path / "checkpoint.pt").symlink_to(tmp_path / "unmounted" / "checkpoint.pt")
    for resume in (True, False):
        cfg.resume = resume
        with pytest.raises(
            ValueError, match=r"checkpoint.pt is a symbolic link to nothing \(.*unmounted/checkpoint.pt\)"
        ):
            cfg.validate()
    assert not (tmp_path / "unmounted").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="needs tensorboard")
def test_tensorboard_shows_each_step_once_after_a_resume_and_no_earlier_runs_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from bertqa.train import MetricsLog

    def run(resume_step, steps, loss):
        log = MetricsLog(tmp_path, tensorboard=True, resume_step=resume_step)
        for step in steps:
            log.log({"step": step, "loss": loss + step})
        log.close()
        time.sleep(0.01)  # a new events file per writer, as separate runs make (the name holds the time)

    def curve():
        events = EventAccumulator(str(tmp_path / "tensorboard"))
        events.Reload()
        return [(e.step, e.value) for e in events.Scalars("train/loss")]

    run(0, range(1, 7), 10.0)  # killed after step 6; its checkpoint is at step 3
    run(3, range(4, 7), 20.0)  # the resume redoes steps 4 to 6
    assert curve() == [(1, 11.0), (2, 12.0), (3, 13.0), (4, 24.0), (5, 25.0), (6, 26.0)]
    assert [json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        11.0, 12.0, 13.0, 24.0, 25.0, 26.0]  # fmt: skip
    run(0, range(1, 3), 30.0)  # a fresh run into the same folder
    assert curve() == [(1, 31.0), (2, 32.0)]
    lines = (tmp_path / "metrics.jsonl").read_bytes()
    # A fresh run into it once its checkpoint is there (run "a"'s), failing before its own first checkpoint, and
    # another killed outright there: the earlier run's curves are the folder's again (they had been hidden).
    log = MetricsLog(tmp_path, True, 0, "b", "a", keep_earlier=True)
    log.log({"step": 1, "loss": 40.0})
    log.close_on_exit(RuntimeError, RuntimeError("a failed step"), None)
    assert curve() == [(1, 31.0), (2, 32.0)] and (tmp_path / "metrics.jsonl").read_bytes() == lines
    log = MetricsLog(tmp_path, True, 0, "c", "a", keep_earlier=True)
    log.log({"step": 1, "loss": 50.0})
    log.close()  # (killed: nothing put back)
    assert curve() == [(1, 50.0)]
    MetricsLog(tmp_path, True, 2, "a", "a").close()  # --resume of run "a" (finished at step 2)
    assert curve() == [(1, 31.0), (2, 32.0)] and (tmp_path / "metrics.jsonl").read_bytes() == lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "tensorboard"]


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="needs tensorboard")
def test_tensorboard_into_a_folder_whose_path_is_not_utf8_is_refused_before_any_work(tmp_path, monkeypatch):
    """(review) TensorBoard encodes its file names as UTF-8: a byte that is not (a surrogate escape in Python) failed
    the run after loading, naming neither the flag nor the folder, and left the folders it made."""
    if sys.platform == "darwin" or os.name == "nt":
        platform_skip("file names here are Unicode: a name's byte cannot be other than UTF-8")
    out = tmp_path / os.fsdecode(b"runs\xff")
    cfg = TrainConfig(model=".", train_file=__file__, output_dir=str(out), tensorboard=True)
    with pytest.raises(ValueError, match=r"TensorBoard cannot write in a folder whose path is not UTF-8; name another"):
        cfg.validate()
    cfg.tensorboard = False
    cfg.validate()
    assert list(tmp_path.iterdir()) == []
    # (a relative one is what TensorBoard is given: the current folder's name does not matter; a first fix refused it)
    out.mkdir()
    monkeypatch.chdir(out)
    TrainConfig(model=".", train_file=__file__, output_dir="out", tensorboard=True).validate()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="needs tensorboard")
@pytest.mark.parametrize("full_from, earlier, named", [(1, False, False), (1, False, True), (2, False, False),
                                                       (1, True, False)])  # fmt: skip
def test_tensorboard_on_a_full_disk_fails_in_one_line_naming_its_folder(full_from, earlier, named, run_here, tiny_dir,
                                                                          tiny_squad, tmp_path, monkeypatch):  # fmt: skip
    """(review) TensorBoard's writer thread met the full disk: the run failed with "No space left on device",
    naming no file (or its events file, as bytes), the thread printed its own traceback too, and the folder and
    empty events file TensorBoard made were left (the same run failing without --tensorboard leaves nothing). An
    earlier run's TensorBoard folder, set aside as the run starts, is put back (a first fix removed it)."""
    import errno
    import threading

    from tensorboard.compat.tensorflow_stub.io import gfile

    real_write, writes = gfile.LocalFileSystem._write, []

    def write(self, filename, content, mode):  # (from the full_from-th write of an events file on, the disk is full)
        writes.append(filename)
        if len(writes) < full_from:
            return real_write(self, filename, content, mode)
        open(filename, "ab").close()  # (a full disk still takes an empty file)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), *([os.fsencode(filename)] if named else []))

    out = tmp_path / "out"
    args = ["train", "--model", tiny_dir, "--train-file", tiny_squad, "--output-dir", out, "--max-steps", 2,
            "--batch-size", 4, "--max-seq-length", 128, "--doc-stride", 32, "--cache-dir", "none", "--no-progress",
            "--tensorboard", "--log-every", 1]  # fmt: skip
    if earlier:
        assert run_here(*args).returncode == 0
        events = {p.name: p.read_bytes() for p in (out / "tensorboard").iterdir()}
    monkeypatch.setattr(gfile.LocalFileSystem, "_write", write)
    result = run_here(*args)
    for thread in threading.enumerate():  # (its excepthook runs as it ends)
        if type(thread).__name__ == "_AsyncWriterThread":
            thread.join(10)
    assert result.returncode == 1 and writes, result.stderr
    assert result.stderr.splitlines()[-1] == f"bertqa: error: {out / 'tensorboard'}: No space left on device"
    assert "Traceback" not in result.stderr and "Exception in thread" not in result.stderr, result.stderr
    if earlier:
        assert {p.name: p.read_bytes() for p in (out / "tensorboard").iterdir()} == events
    elif full_from == 1:  # (at the start: nothing is left)
        assert not out.exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="needs tensorboard")
def test_a_tensorboard_folder_that_is_a_link_or_holds_other_files_is_not_set_aside(tmp_path):
    from bertqa.train import MetricsLog

    (tmp_path / "a" / "tensorboard").mkdir(parents=True)
    (tmp_path / "a" / "tensorboard" / "train.json").write_text("the user's")  # (a --train-file, say)
    (tmp_path / "shared").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "tensorboard").symlink_to(tmp_path / "shared")
    for out in (tmp_path / "a", tmp_path / "b"):
        log = MetricsLog(out, True, 0, "new", "old", keep_earlier=True)  # a fresh run, over run "old"'s checkpoint
        log.log({"step": 1, "loss": 1.0})
        log.checkpointed()
        log.close()
    assert (tmp_path / "a" / "tensorboard" / "train.json").read_text() == "the user's"
    assert (tmp_path / "b" / "tensorboard").is_symlink() and list((tmp_path / "shared").glob("events.out.tfevents.*"))


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="needs tensorboard")
def test_a_failed_fresh_run_leaves_no_tensorboard_folder_where_the_earlier_run_had_none(tmp_path, monkeypatch):
    """Its events would show in a --resume --tensorboard of the earlier run."""
    from bertqa.train import MetricsLog

    log = MetricsLog(tmp_path, True, 0, "b", "a", keep_earlier=True)  # run "a" logged no TensorBoard events
    log.log({"step": 1, "loss": 40.0})
    log.close_on_exit(RuntimeError, RuntimeError("a failed step"), None)
    assert not (tmp_path / "tensorboard").exists() and not list(tmp_path.glob(".tensorboard*"))
    log = MetricsLog(tmp_path, True, 0, "c", "a", keep_earlier=True)
    log.log({"step": 1, "loss": 50.0})
    log.close()  # killed: the next start into the folder (a --resume of run "a") clears its events
    MetricsLog(tmp_path, False, 2, "a", "a").close()
    assert not (tmp_path / "tensorboard").exists() and not list(tmp_path.glob(".tensorboard*"))
    # From inside OUT/tensorboard (which the first checkpoint would delete) nothing is set aside.
    (tmp_path / "tensorboard").mkdir()
    monkeypatch.chdir(tmp_path / "tensorboard")
    log = MetricsLog(tmp_path, True, 0, "d", "a", keep_earlier=True)
    log.checkpointed()
    log.close()
    assert os.path.samefile(os.getcwd(), tmp_path / "tensorboard")  # (not moved aside and deleted)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="needs tensorboard")
def test_what_a_failed_fresh_run_puts_back_is_what_the_folder_had(tmp_path):
    """A folder with a finished run's checkpoint (run "a") and: no metrics.jsonl (the failed run's lines stayed, and
    a resume of "a" went on with them); the user's own empty tensorboard/ (removed); run "a"'s events with a fresh
    run without --tensorboard (a resume of that run with --tensorboard mixed "a"'s first steps into its curves)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from bertqa.train import MetricsLog

    def failed(tensorboard, run="b"):
        log = MetricsLog(tmp_path, tensorboard, 0, run, "a", keep_earlier=True)
        log.log({"step": 1, "loss": 40.0})
        log.close_on_exit(RuntimeError, RuntimeError("a failed step"), None)

    (tmp_path / "tensorboard").mkdir()
    failed(True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tensorboard"]  # no metrics.jsonl, as before
    assert list((tmp_path / "tensorboard").iterdir()) == []
    log = MetricsLog(tmp_path, True, 0, "a", None)  # run "a" with its curves
    log.log({"step": 1, "loss": 1.0})
    log.close()
    failed(False)  # put back: run "a"'s events, untouched
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0)]
    log = MetricsLog(tmp_path, False, 0, "c", "a", keep_earlier=True)
    log.checkpointed()  # run "c" (no --tensorboard) replaced run "a": its events went with its checkpoint
    log.close()
    assert not (tmp_path / "tensorboard").exists()
    # What a killed run wrote is removed at the next start only where it is TensorBoard's events alone.
    log = MetricsLog(tmp_path, True, 0, "d", "c", keep_earlier=True)
    log.file.close()  # killed
    log.tb.close()
    (tmp_path / "tensorboard" / "notes.txt").write_text("the user's")
    with pytest.raises(
        ValueError,
        match="tensorboard: holds more than a run's TensorBoard events, or the current "
        r"folder; remove the killed run's events.out.tfevents.\* from it, and ",
    ):
        MetricsLog(tmp_path, False, 1, "c", "c")
    assert (tmp_path / "tensorboard" / "notes.txt").read_text() == "the user's"
    # metrics.jsonl a link to a file not there yet: none, as a missing file (the failed run's lines stayed, there).
    shutil.rmtree(tmp_path / "tensorboard")
    for p in tmp_path.iterdir():
        p.unlink()
    (tmp_path / "metrics.jsonl").symlink_to("gone.jsonl")
    failed(False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"] and not (tmp_path / "gone.jsonl").exists()


def test_a_run_that_would_delete_its_current_folder_or_cache_is_refused_before_any_work(tiny_dir, small_squad,
                                                                                         tmp_path, monkeypatch):  # fmt: skip
    """From inside OUT/model, `--output-dir ..` replaced the current folder: the earlier run's results stayed beside
    the new model (`..` was not found from a folder deleted), and the run failed. Features cached in OUT/model
    stopped the model's save, after the whole training."""
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "model" / "config.json").write_text("{}")
    monkeypatch.chdir(out / "model")
    cfg = cfg_for(tiny_dir, small_squad, "..")
    with pytest.raises(ValueError, match=r"--output-dir \.\.: \.\./model holds the current folder"):
        cfg.validate()
    monkeypatch.chdir(tmp_path)
    cfg = cfg_for(tiny_dir, small_squad, out, cache_dir=str(out / "model" / "cache"))
    with pytest.raises(ValueError, match=f"--cache-dir {out / 'model' / 'cache'}: lies in {out / 'model'}, which"):
        cfg.validate()
    cfg.cache_dir = str(out / "cache")  # beside it: fine
    cfg.validate()


def test_startup_line_says_what_auto_attention_is_on_the_device(monkeypatch):
    import bertqa.model
    from bertqa.distributed import Dist
    from bertqa.evaluate import startup_line
    from bertqa.runtime import Precision

    fp32 = Precision.resolve("fp32", torch.device("cpu"))
    monkeypatch.setattr(bertqa.model, "cpu_has_amx", lambda: False)
    on_cpu = startup_line(Dist(device=torch.device("cpu")), fp32, "auto")
    on_gpu = startup_line(Dist(device=torch.device("cuda", 0)), fp32, "auto")
    assert "attention auto (blocked to train, sdpa to infer in fp32, blocked in bf16 / fp16)," in on_cpu
    compiled = startup_line(Dist(device=torch.device("cpu")), fp32, "auto", compiled=True)
    assert "attention auto (sdpa to train (torch.compile), sdpa to infer in fp32, blocked in" in compiled
    monkeypatch.setattr(bertqa.model, "cpu_has_amx", lambda: True)
    on_amx = startup_line(Dist(device=torch.device("cpu")), fp32, "auto")
    assert "attention auto (blocked to train, sdpa to infer in fp32 and bf16, blocked in fp16: CPU has AMX)," in on_amx
    assert "device cuda:0" in on_gpu and "attention auto (sdpa:" in on_gpu and "blocked" not in on_gpu
    assert "attention eager," in startup_line(Dist(), fp32, "eager")


def test_train_start_up_line_names_the_compiled_training_attention(tiny_dir, small_squad, tmp_path, monkeypatch,
                                                                     capsys):  # fmt: skip
    """train --compile on a CPU trains with SDPA (auto_attention under torch.compile), and its start-up line says
    so; without it, the blocked attention. (torch.compile mocked: the line is under test, not the compiler.)"""
    import bertqa.train

    monkeypatch.setattr(bertqa.train, "check_compiler", lambda device: None)
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)
    for compiled, words in ((True, "sdpa to train (torch.compile)"), (False, "blocked to train")):
        train(cfg_for(tiny_dir, small_squad, tmp_path / f"run{compiled}", max_steps=1, compile=compiled, device="cpu"))
        line = next(x for x in capsys.readouterr().out.splitlines() if " attention auto (" in x)
        assert f"attention auto ({words}, sdpa to infer in fp32" in line, line


def test_fine_tuning_lowers_the_loss_and_writes_every_output(tiny_dir, small_squad, tmp_path, capsys):
    out = tmp_path / "run"
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    # Paths and numpy numbers, as Python callers pass them: the run's config is saved as JSON, which took neither
    # (the first checkpoint failed, after the training, leaving metrics.jsonl alone), as is the summary (its steps);
    # a numpy learning rate went into the optimizer's state, which torch's weights-only load (resume) refuses.
    cfg = cfg_for(
        tiny_dir, small_squad, out, max_steps=40, lr=3e-3, predict_file=small_squad[1], tensorboard=tensorboard
    )
    cfg = dataclasses.replace(cfg, model=Path(tiny_dir), train_batch_size=np.int64(4), max_steps=np.int64(40),
                              lr=np.float64(3e-3))  # fmt: skip
    summary = train(cfg)
    assert isinstance(cfg.model, Path) and type(cfg.max_steps) is np.int64  # (the caller's object, as it was)
    torch.load(out / "checkpoint.pt", weights_only=True)
    printed = capsys.readouterr().out
    assert "device cpu, precision fp32, attention auto" in printed and "world size 1" in printed
    assert json.loads(printed.strip().splitlines()[-1]) == summary  # the summary is stdout's last line
    losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl")]
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    for key in ("e2e_train_time", "training_sequences_per_second", "final_loss", "e2e_inference_time",
                "inference_sequences_per_second", "exact_match", "f1"):  # fmt: skip
        assert key in summary, key
    assert json.loads((out / "summary.json").read_text()) == summary
    preds = json.loads((out / "predictions.json").read_text())
    nbest = json.loads((out / "nbest_predictions.json").read_text())
    dev = json.loads(small_squad[1].read_text())["data"]
    qids = {q["id"] for a in dev for p in a["paragraphs"] for q in p["qas"]}
    assert set(preds) == set(nbest) == qids
    # The saved model is an HF folder that transformers loads, with the run's config beside it.
    hf = transformers.BertForQuestionAnswering.from_pretrained(str(out / "model"))
    ours = load_file(str(out / "model" / "model.safetensors"))
    assert torch.equal(hf.qa_outputs.weight, ours["qa_outputs.weight"])
    run_config = json.loads((out / "model" / "run_config.json").read_text())
    assert run_config["lr"] == 3e-3 and run_config["model"] == str(tiny_dir) and run_config["train_batch_size"] == 4
    if tensorboard:
        assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    pytest.importorskip("matplotlib")
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_matches_the_official_scorer(tiny_dir, small_squad, tmp_path):
    out = tmp_path / "eval"
    summary = evaluate(EvalConfig(model=str(tiny_dir), predict_file=str(small_squad[1]), output_dir=str(out),
                                  max_seq_length=128, doc_stride=64, max_query_length=32, batch_size=5,
                                  cache_dir=None, progress=False, precision="fp32"))  # fmt: skip
    r = run_cli("score", small_squad[1], out / "predictions.json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"exact_match": summary["exact_match"], "f1": summary["f1"]}
    assert r.stdout == json.dumps(json.loads(r.stdout)) + "\n"  # on one line, as evaluate-v1.1.py prints it
    # And by the official script's rules, restated independently of bertqa's metrics.
    preds = json.loads((out / "predictions.json").read_text())
    official = official_v1(json.loads(small_squad[1].read_text())["data"], preds)
    assert official == pytest.approx({"exact_match": summary["exact_match"], "f1": summary["f1"]}, abs=1e-9)
    assert 0 < summary["f1"] < 100  # a random model: partial credit, so F1 is really computed
    # (mutation review) n-best lists of NVIDIA's default 20; windows counted in the throughput, not questions.
    nbest = json.loads((out / "nbest_predictions.json").read_text())
    assert max(len(entries) for entries in nbest.values()) == EvalConfig.n_best_size == 20
    assert summary["eval_features"] > len(preds)
    assert summary["inference_sequences_per_second"] * summary["e2e_inference_time"] == pytest.approx(
        summary["eval_features"]
    )


def test_evaluate_again_that_fails_to_write_leaves_the_earlier_set_and_its_summary(
    tiny_dir, small_squad, tmp_path, monkeypatch
):
    out = tmp_path / "eval"
    cfg = EvalConfig(model=str(tiny_dir), predict_file=str(small_squad[1]), output_dir=str(out), max_seq_length=128,
                     doc_stride=64, max_query_length=32, cache_dir=None, progress=False, precision="fp32")  # fmt: skip
    evaluate(cfg)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"summary.json", "predictions.json", "nbest_predictions.json"} <= set(before)

    json_text, written = bertqa.files._json_text, []

    def disk_full_at_the_second_file(obj, indent):
        if written:
            raise OSError(28, "No space left on device")
        written.append(obj)
        return json_text(obj, indent)

    monkeypatch.setattr(bertqa.files, "_json_text", disk_full_at_the_second_file)
    with pytest.raises(OSError, match="No space left"):
        evaluate(cfg)
    # The earlier predictions stay, whole, and their summary with them (it was deleted before the new set was
    # written: a failure lost it); no temporary file is left.
    assert written and {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_evaluate_again_stopped_after_its_predictions_leaves_no_earlier_summary_beside_them(
    tiny_dir, small_squad, tmp_path, monkeypatch, capsys
):
    """(mutation review) The earlier summary.json goes when the new predictions land: stopped before the new summary
    is written, the folder holds no summary of other predictions. And evaluate prints what the load noted."""
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    weights = load_file(model / "model.safetensors")
    weights.update({"bert.pooler.dense.weight": torch.zeros(32, 32), "bert.pooler.dense.bias": torch.zeros(32)})
    save_file(weights, model / "model.safetensors")
    out = tmp_path / "eval"
    cfg = EvalConfig(model=str(model), predict_file=str(small_squad[1]), output_dir=str(out), max_seq_length=128,
                     doc_stride=64, max_query_length=32, cache_dir=None, progress=False, precision="fp32")  # fmt: skip
    evaluate(cfg)
    assert (
        "model.safetensors: dropped 2 weights question answering does not use (bert.pooler)" in capsys.readouterr().out
    )
    assert (out / "summary.json").exists()

    def stopped(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(bertqa.evaluate, "score", stopped)
    with pytest.raises(KeyboardInterrupt):
        evaluate(cfg)
    assert sorted(p.name for p in out.iterdir()) == ["nbest_predictions.json", "predictions.json"]


def test_evaluate_v2_detects_null_answers(tiny_dir, small_squad, tmp_path):
    doc = json.loads(small_squad[1].read_text())
    doc["version"] = "v2.0"
    for q in doc["data"][0]["paragraphs"][0]["qas"]:  # the first paragraph's questions become unanswerable
        q.update(is_impossible=True, plausible_answers=q["answers"], answers=[])
    v2 = tmp_path / "dev-v2.json"
    v2.write_text(json.dumps(doc))
    out = tmp_path / "eval"
    summary = evaluate(EvalConfig(model=str(tiny_dir), predict_file=str(v2), output_dir=str(out),
                                  max_seq_length=128, doc_stride=64, max_query_length=32, cache_dir=None,
                                  progress=False))  # fmt: skip
    n_impossible = len(doc["data"][0]["paragraphs"][0]["qas"])
    assert summary["NoAns_total"] == n_impossible and summary["HasAns_total"] > 0
    official = official_v2(doc["data"], json.loads((out / "predictions.json").read_text()))
    assert official == pytest.approx({k: summary[k] for k in official}, abs=1e-9)
    null_odds = json.loads((out / "null_odds.json").read_text())
    r = run_cli("score", v2, out / "predictions.json", "--na-prob-file", out / "null_odds.json")
    assert r.returncode == 0, r.stderr
    with_odds = json.loads(r.stdout)
    assert r.stdout == json.dumps(with_odds, indent=2) + "\n"  # indented, as evaluate-v2.0.py prints it
    assert set(null_odds) == set(json.loads((out / "predictions.json").read_text()))
    assert (with_odds["best_exact"], with_odds["best_f1"]) == (summary["best_exact"], summary["best_f1"])
    # EM/F1 are those of predictions.json as written, whatever the size of the null odds.
    plain = json.loads(run_cli("score", v2, out / "predictions.json").stdout)
    assert (plain["exact"], plain["f1"], plain["NoAns_exact"]) == (
        summary["exact"],
        summary["f1"],
        summary["NoAns_exact"],
    )
    # The null answer is predicted where its odds beat the threshold (0 by default), and only there; a threshold
    # below every odds predicts it everywhere, one above every odds nowhere.
    preds = json.loads((out / "predictions.json").read_text())
    assert all((preds[q] == "") == (null_odds[q] > 0.0) for q in preds)
    for threshold, null_everywhere in ((-1e9, True), (1e9, False)):
        cfg = EvalConfig(model=str(tiny_dir), predict_file=str(v2), output_dir=str(tmp_path / f"t{threshold}"),
                         max_seq_length=128, doc_stride=64, max_query_length=32, cache_dir=None, progress=False,
                         null_score_diff_threshold=threshold)  # fmt: skip
        s = evaluate(cfg)
        assert (s["NoAns_exact"], s["HasAns_exact"]) == ((100.0, 0.0) if null_everywhere else (0.0, s["HasAns_exact"]))
        preds = json.loads((tmp_path / f"t{threshold}" / "predictions.json").read_text())
        assert all((p == "") == null_everywhere for p in preds.values())


def test_resume_after_a_crash_ends_where_an_uninterrupted_run_ends(tiny_dir, small_squad, tmp_path, caplog):
    # Dropout stays on (the tiny model has 0.1), so this also checks that the RNG state is restored.
    full = tmp_path / "full"
    train(cfg_for(tiny_dir, small_squad, full, save_every=2, grad_accum=2, log_every=1))

    def crash(step, loss):
        if step == 5:
            raise KeyboardInterrupt  # after the checkpoint at step 4, before the one at 6

    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        train(cfg_for(tiny_dir, small_squad, part, save_every=2, grad_accum=2, log_every=3), on_step=crash)
    assert torch.load(part / "checkpoint.pt", weights_only=True)["step"] == 4
    with pytest.raises(ValueError, match=r"cannot resume a different run \(--seed 42 -> 7\)"):
        train(cfg_for(tiny_dir, small_squad, part, save_every=2, grad_accum=2, log_every=3, seed=7, resume=True))
    with pytest.raises(ValueError, match=r"cannot resume a different run \(--batch-size 4 -> 2\)"):  # the flag's name
        train(cfg_for(tiny_dir, small_squad, part, save_every=2, grad_accum=2, log_every=3, train_batch_size=2,
                      resume=True))  # fmt: skip
    with pytest.raises(ValueError, match=r"cannot resume a different run \(--max-grad-norm 1.0 -> 0.5\)"):
        train(cfg_for(tiny_dir, small_squad, part, save_every=2, grad_accum=2, log_every=3, max_grad_norm=0.5,
                      resume=True))  # fmt: skip
    config = json.loads((tiny_dir / "config.json").read_text())
    (tmp_path / "other.json").write_text(json.dumps({**config, "hidden_act": "gelu_new"}))  # another activation
    with pytest.raises(
        ValueError, match=r"cannot resume a different run \(another model: its config.json \(or --config"
    ):
        train(cfg_for(tiny_dir, small_squad, part, save_every=2, grad_accum=2, log_every=3,
                      config=str(tmp_path / "other.json"), resume=True))  # fmt: skip
    # Another run's curves beside the checkpoint (one copied in from its folder): they were kept up to its step,
    # and the run's own joined on, without a word.
    own = (part / "metrics.jsonl").read_bytes()
    shutil.copy(full / "metrics.jsonl", part / "metrics.jsonl")
    with pytest.raises(ValueError, match=r"metrics.jsonl: its lines up to step 4 are not those the checkpoint was "
                                         r"saved with \(another run's, or edited\); move it away to resume"):  # fmt: skip
        train(cfg_for(tiny_dir, small_squad, part, save_every=2, grad_accum=2, log_every=3, resume=True))
    assert (part / "metrics.jsonl").read_bytes() == (full / "metrics.jsonl").read_bytes()  # left as it was
    # (review) A line the crash cut short in the middle of a byte sequence (or any byte that is not UTF-8 past
    # the checkpoint's lines): the file was decoded whole, and the resume stopped naming no file.
    (part / "metrics.jsonl").write_bytes(own + b'{"step": 5, "lo\xc3')
    moved = tmp_path / "moved"  # moved away, as that line says (or deleted): the run goes on, its curves from there
    shutil.copytree(part, moved)
    (moved / "metrics.jsonl").unlink()
    with caplog.at_level(logging.WARNING, logger="bertqa"):
        train(cfg_for(tiny_dir, small_squad, moved, save_every=2, grad_accum=2, log_every=3, resume=True))
    assert f"no {moved / 'metrics.jsonl'}: its lines up to step 4 are gone; it goes on from there" in caplog.text
    assert [r["step"] for r in read_jsonl(moved / "metrics.jsonl")] == [6]
    before = torch.load(part / "checkpoint.pt", weights_only=True)["train_seconds"]
    summary = train(cfg_for(tiny_dir, small_squad, part, save_every=2, grad_accum=2, log_every=3, resume=True))
    # The summary times the whole run, its steps before the crash included; resumed again, it trains nothing
    # and says the same (it said 0 sequences/s).
    assert (
        0 < before < summary["e2e_train_time"] == torch.load(part / "checkpoint.pt", weights_only=True)["train_seconds"]
    )
    again = train(cfg_for(tiny_dir, small_squad, part, save_every=2, grad_accum=2, log_every=3, resume=True))
    for key in ("e2e_train_time", "training_sequences_per_second"):
        assert again[key] == pytest.approx(summary[key], rel=0.05) and again[key] > 0
    a = load_file(str(full / "model" / "model.safetensors"))
    b = load_file(str(part / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    per_step = {r["step"]: r["loss"] for r in read_jsonl(full / "metrics.jsonl")}
    rows = read_jsonl(part / "metrics.jsonl")
    assert [r["step"] for r in rows] == [3, 6]  # nothing logged after the checkpoint is kept twice
    assert rows[0]["loss"] == pytest.approx(sum(per_step[s] for s in (1, 2, 3)) / 3, rel=1e-6)
    # The checkpoint carried the loss of step 4, logged with 5 and 6 as if the run had never stopped.
    assert rows[1]["loss"] == pytest.approx((per_step[4] + per_step[5] + per_step[6]) / 3, rel=1e-6)
    assert summary["final_loss"] == pytest.approx(per_step[6], rel=1e-6)


def test_a_checkpoint_that_cannot_be_written_is_named_and_the_previous_one_kept(
    tiny_dir, small_squad, tmp_path, monkeypatch
):
    real, saves = torch.save, []

    def disk_full(obj, f, *args, **kwargs):  # the second save's writes fail, as on a full disk
        saves.append(f)
        if len(saves) == 1:
            return real(obj, f, *args, **kwargs)
        with file_size_limit(4096):
            return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    out = tmp_path / "run"
    with pytest.raises(OSError) as caught:
        train(cfg_for(tiny_dir, small_squad, out, save_every=2))
    # torch's own words (2.13: "[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 3994").
    assert cli.message_line(caught.value).startswith(
        f"{out / 'checkpoint.pt'}: cannot write the checkpoint (is the disk full? torch: "
    )
    monkeypatch.setattr(torch, "save", real)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.jsonl"]  # no temporary file left
    # (review) A file size limit (ulimit -f) still set when the save fails is named, not taken for a full disk.
    with contextlib.ExitStack() as limits:

        def limited(obj, f, *args, **kwargs):
            limits.enter_context(file_size_limit(4096))
            return real(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", limited)
        with pytest.raises(OSError) as caught:
            train(cfg_for(tiny_dir, small_squad, tmp_path / "limited", save_every=2))
    assert cli.message_line(caught.value).startswith(
        f"{tmp_path / 'limited' / 'checkpoint.pt'}: cannot write the "
        "checkpoint (the file size limit, ulimit -f, is 4,096 bytes; torch: "
    )
    monkeypatch.setattr(torch, "save", real)
    # Out of memory while torch.save copies tensors is not the file's fault: it stays an out-of-memory error.
    oom = (
        "[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"
    )
    monkeypatch.setattr(torch, "save", lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError(oom)))
    with pytest.raises(RuntimeError) as caught:
        train(cfg_for(tiny_dir, small_squad, tmp_path / "oom", save_every=2))
    assert cli.error_line(caught.value, False).startswith("out of memory (")
    monkeypatch.setattr(torch, "save", real)


def open_files() -> set[str]:
    if not os.path.isdir("/proc/self/fd"):
        platform_skip("no /proc/self/fd to see which files are open or synced")
    return {os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")}


def test_metrics_reach_the_disk_before_each_checkpoint(tiny_dir, small_squad, tmp_path, monkeypatch):
    open_files()  # skips without /proc
    synced, real = [], os.fsync

    def fsync(fd):
        synced.append(os.path.basename(os.path.realpath(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    train(cfg_for(tiny_dir, small_squad, tmp_path / "run", save_every=2))
    order = [
        "metrics" if n == "metrics.jsonl" else "checkpoint"
        for n in synced
        if n.startswith((".checkpoint.", "metrics."))
    ]
    assert order == ["metrics", "checkpoint"] * 3  # steps 2, 4 and 6: a power loss keeps the lines a resume skips


def test_a_fresh_run_into_a_finished_runs_folder_keeps_its_metrics_until_its_first_checkpoint(
    tiny_dir, small_squad, tmp_path
):
    """The earlier run's checkpoint stays until the new run's first save: its lines must stay with it, else a
    --resume of it goes on with the failed run's lines (and the earlier run's curves are lost)."""
    out = tmp_path / "run"
    train(cfg_for(tiny_dir, small_squad, out, max_steps=4, log_every=1))
    os.chmod(out / "metrics.jsonl", 0o640)
    earlier = (out / "metrics.jsonl").read_bytes()

    def crash(step, loss):
        if step == 3:
            raise RuntimeError("a failed step")

    for save_every in (0, 2):  # no checkpoint before the failure; then one at step 2
        with pytest.raises(RuntimeError, match="a failed step"):
            train(cfg_for(tiny_dir, small_squad, out, max_steps=4, log_every=1, seed=7, save_every=save_every),
                  on_step=crash)  # fmt: skip
        assert not list(out.glob(".metrics*"))
        assert os.stat(out / "metrics.jsonl").st_mode & 0o777 == 0o640
        if save_every == 0:
            assert (out / "metrics.jsonl").read_bytes() == earlier
            train(cfg_for(tiny_dir, small_squad, out, max_steps=4, log_every=1, resume=True))  # the finished run
            assert (out / "metrics.jsonl").read_bytes() == earlier
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]  # the new run's, up to its failure


def test_a_fresh_run_into_a_finished_runs_folder_without_its_checkpoint_keeps_its_metrics(tiny_dir, small_squad,
                                                                                         tmp_path):  # fmt: skip
    """(review) With the checkpoint deleted (a finished run's largest file), a fresh run that stopped before its first
    save left its partial lines beside the earlier run's model/, summary and curves: the earlier lines were lost."""
    out = tmp_path / "run"
    train(cfg_for(tiny_dir, small_squad, out, max_steps=4, log_every=1))
    (out / "checkpoint.pt").unlink()
    earlier = (out / "metrics.jsonl").read_bytes()

    def crash(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg_for(tiny_dir, small_squad, out, max_steps=4, log_every=1, seed=7), on_step=crash)
    assert (out / "metrics.jsonl").read_bytes() == earlier and not list(out.glob(".metrics*"))
    train(cfg_for(tiny_dir, small_squad, out, max_steps=4, log_every=1, seed=7))  # a fresh run that finishes
    assert (out / "metrics.jsonl").read_bytes() != earlier and not list(out.glob(".metrics*"))
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4]


def test_a_fresh_run_stopped_once_its_checkpoint_is_renamed_keeps_its_own_lines(tiny_dir, small_squad, tmp_path,
                                                                               monkeypatch):  # fmt: skip
    """Ctrl-C (or an I/O error) while the folder is flushed after the checkpoint's rename: the checkpoint is this
    run's, and so must the lines be (they were put back to the earlier run's)."""
    out = tmp_path / "run"
    train(cfg_for(tiny_dir, small_squad, out, max_steps=4, log_every=1))
    earlier = (out / "metrics.jsonl").read_bytes()
    fsync = bertqa.files.fsync_path

    def interrupted(path):
        if Path(path) == out:
            raise KeyboardInterrupt
        return fsync(path)

    monkeypatch.setattr(bertqa.files, "fsync_path", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(cfg_for(tiny_dir, small_squad, out, max_steps=4, log_every=1, seed=7, save_every=2))
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]
    assert (out / "metrics.jsonl").read_bytes() != earlier[: len((out / "metrics.jsonl").read_bytes())]
    assert not list(out.glob(".metrics*"))


def test_a_fresh_run_killed_before_or_after_its_first_checkpoint_leaves_the_lines_that_go_with_the_checkpoint(
    tmp_path,
):
    from bertqa.train import MetricsLog

    def lines():
        return [(r["step"], r["loss"]) for r in read_jsonl(tmp_path / "metrics.jsonl")]

    def killed(run_id, checkpoint_run_id, steps, loss):  # a fresh run into the folder, killed outright
        log = MetricsLog(tmp_path, False, 0, run_id, checkpoint_run_id, keep_earlier=True)
        for step in steps:
            log.log({"step": step, "loss": loss})
        log.file.close()  # (no close_on_exit: the process is gone)

    log = MetricsLog(tmp_path, False, 0, "a")
    for step in (1, 2, 3, 4):
        log.log({"step": step, "loss": 1.0})
    log.close()
    killed("b", "a", (1, 2), 2.0)  # before its first checkpoint: the folder's checkpoint is still run a's
    assert lines() == [(1, 2.0), (2, 2.0)] and len(list(tmp_path.glob(".metrics.jsonl.before-*"))) == 1
    MetricsLog(tmp_path, False, 4, "a", "a").close()  # --resume of run a (finished at step 4)
    assert lines() == [(s, 1.0) for s in (1, 2, 3, 4)] and not list(tmp_path.glob(".metrics*"))
    killed("c", "a", (1, 2, 3), 3.0)  # after its checkpoint at step 2 was saved, before the lines were its own
    MetricsLog(tmp_path, False, 2, "c", "c").close()  # --resume of run c
    assert lines() == [(1, 3.0), (2, 3.0)] and not list(tmp_path.glob(".metrics*"))


def test_a_fresh_run_whose_metrics_file_cannot_be_started_leaves_the_earlier_one(tmp_path, monkeypatch):
    from bertqa.train import MetricsLog

    (tmp_path / "metrics.jsonl").write_text('{"step": 4, "loss": 1.0}\n')

    def disk_full(path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(bertqa.train, "atomic_path", disk_full)
    with pytest.raises(OSError, match="No space left"):
        MetricsLog(tmp_path, False, 0, "b", "a", keep_earlier=True)
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 4, "loss": 1.0}\n'


def test_the_metrics_file_is_closed_when_a_step_fails(tiny_dir, small_squad, tmp_path):
    def crash(step, loss):
        if step == 3:
            raise RuntimeError("a failed step")

    with pytest.raises(RuntimeError, match="a failed step") as caught:
        train(cfg_for(tiny_dir, small_squad, tmp_path, log_every=1), on_step=crash)
    # The traceback (held here, as a notebook holds it) keeps the run's frames alive, not its files.
    assert caught.tb is not None and str(tmp_path / "metrics.jsonl") not in open_files()


def test_ctrl_c_while_the_previous_model_is_deleted_leaves_no_earlier_results_beside_the_new_one(
    tiny_dir, small_squad, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    train(cfg_for(tiny_dir, small_squad, out, predict_file=str(small_squad[1]), max_steps=2))
    assert (out / "summary.json").is_file() and (out / "curves.png").is_file()
    rmtree = bertqa.files.shutil.rmtree

    def interrupted(path, *args, **kwargs):
        if ".model.old-" in str(path):
            raise KeyboardInterrupt  # the new model/ is in place; the old one was being deleted
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(bertqa.files.shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(cfg_for(tiny_dir, small_squad, out, predict_file=str(small_squad[1]), max_steps=2, seed=7))
    assert json.loads((out / "model" / "run_config.json").read_text())["seed"] == 7
    names = ("summary.json", "predictions.json", "nbest_predictions.json", "curves.png")
    assert not any((out / name).exists() for name in names)


def test_a_resumed_finished_run_whose_model_save_fails_keeps_its_results(tiny_dir, small_squad, tmp_path,
                                                                         monkeypatch):  # fmt: skip
    """Its run id is its checkpoint's, so model/ (still its own) carries it: that is not this save's doing."""
    out = tmp_path / "run"
    train(cfg_for(tiny_dir, small_squad, out, predict_file=str(small_squad[1]), max_steps=2))
    before = {name: (out / name).read_bytes() for name in ("summary.json", "predictions.json", "curves.png")}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bertqa.train, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        train(cfg_for(tiny_dir, small_squad, out, predict_file=str(small_squad[1]), max_steps=2, resume=True))
    assert {name: (out / name).read_bytes() for name in before} == before


def test_a_finished_run_resumed_without_a_predict_file_keeps_its_evaluation(tiny_dir, small_squad, tmp_path):
    """(review) It trains nothing and saves the same weights: their predictions were deleted as an earlier run's,
    and the summary lost their EM and F1."""
    out = tmp_path / "run"
    first = train(cfg_for(tiny_dir, small_squad, out, predict_file=str(small_squad[1]), max_steps=2))
    predictions = (out / "predictions.json").read_bytes()
    again = train(cfg_for(tiny_dir, small_squad, out, max_steps=2, resume=True))
    assert (out / "predictions.json").read_bytes() == predictions and (out / "nbest_predictions.json").is_file()
    assert again["f1"] == first["f1"] and json.loads((out / "summary.json").read_text())["f1"] == first["f1"]
    # (mutation review) Resumed again, with a summary.json that is no object: its final loss is still the run's (the
    # checkpoint keeps it), and the unreadable summary is no crash.
    (out / "summary.json").write_text("[1, 2]")
    third = train(cfg_for(tiny_dir, small_squad, out, max_steps=2, resume=True))
    assert third["final_loss"] == again["final_loss"] == first["final_loss"] is not None


def test_a_failed_run_into_folders_it_made_leaves_none(tiny_dir, small_squad, tmp_path):
    """Not even an empty metrics.jsonl (which kept the folders made for the run from being removed)."""

    def crash(step, loss):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg_for(tiny_dir, small_squad, tmp_path / "x" / "y" / "out", log_every=10), on_step=crash)
    assert list(tmp_path.iterdir()) == []


def test_a_run_without_a_predict_file_removes_an_earlier_runs_predictions(tiny_dir, small_squad, tmp_path,
                                                                          monkeypatch):  # fmt: skip
    out = tmp_path / "run"
    train(cfg_for(tiny_dir, small_squad, out, predict_file=str(small_squad[1])))
    assert (out / "predictions.json").is_file() and (out / "nbest_predictions.json").is_file()
    (out / "curves.png").write_bytes(b"\x89PNG the first run's curves")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "matplotlib", None)  # not installed: this run draws no curves
        summary = train(cfg_for(tiny_dir, small_squad, out))  # the same folder, another model, nothing evaluated
    assert "f1" not in summary and not (out / "predictions.json").exists()
    assert not (out / "nbest_predictions.json").exists() and not (out / "curves.png").exists()
    # Nor does a run whose evaluation fails leave them, or the earlier summary, beside its own model.
    train(cfg_for(tiny_dir, small_squad, out, predict_file=str(small_squad[1])))
    model_before = (out / "model" / "model.safetensors").read_bytes()

    def failing_evaluation(*args, **kwargs):
        raise MemoryError("out of memory in the evaluation")

    monkeypatch.setattr(bertqa.train, "run_evaluation", failing_evaluation)
    with pytest.raises(MemoryError):
        train(cfg_for(tiny_dir, small_squad, out, predict_file=str(small_squad[1]), seed=7))
    assert (out / "model" / "model.safetensors").read_bytes() != model_before  # the new model is there
    assert not any((out / name).exists() for name in ("summary.json", "predictions.json", "nbest_predictions.json"))
    # Nor one that fails drawing its curves (a disk the model filled; Ctrl-C while matplotlib loads).
    monkeypatch.undo()  # the evaluation runs again
    train(cfg_for(tiny_dir, small_squad, out, predict_file=str(small_squad[1])))
    model_before = (out / "model" / "model.safetensors").read_bytes()

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    assert (out / "curves.png").is_file()  # drawn by that run (matplotlib is installed)
    monkeypatch.setattr(bertqa.train, "plot_curves", disk_full)
    with pytest.raises(OSError, match="No space left"):
        train(cfg_for(tiny_dir, small_squad, out, predict_file=str(small_squad[1]), seed=7))
    assert (out / "model" / "model.safetensors").read_bytes() != model_before
    names = ("summary.json", "predictions.json", "nbest_predictions.json", "curves.png")
    assert not any((out / name).exists() for name in names)


def test_a_second_run_on_a_folder_stops_before_loading_anything(tiny_dir, small_squad, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(bertqa.train, "load_tokenizer_and_model", None)  # never reached
    with exclusive(out), pytest.raises(ValueError, match=f"^{out}: another run is writing here"):
        train(cfg_for(tiny_dir, small_squad, out))


def test_a_fresh_start_never_replaces_a_run_that_stopped_short(tiny_dir, small_squad, tmp_path, monkeypatch):
    out = tmp_path / "run"

    def crash(step, loss):
        if step == 5:
            raise KeyboardInterrupt  # after the checkpoint at step 4 of 6

    with pytest.raises(KeyboardInterrupt):
        train(cfg_for(tiny_dir, small_squad, out, save_every=2), on_step=crash)
    kept = {name: (out / name).read_bytes() for name in ("checkpoint.pt", "metrics.jsonl")}
    message = r"checkpoint.pt: a run that stopped at step 4 of 6 is here; --resume continues it, or move it away"
    with pytest.raises(ValueError, match=message):
        train(cfg_for(tiny_dir, small_squad, out, save_every=2))
    with pytest.raises(ValueError, match=message):  # another run's settings: refused all the same
        train(cfg_for(tiny_dir, small_squad, out, max_steps=3, seed=7))
    assert {name: (out / name).read_bytes() for name in kept} == kept
    with monkeypatch.context() as m:  # refused before the slow part: the model and the features
        m.setattr(bertqa.train, "load_tokenizer_and_model", None)
        m.setattr(bertqa.train, "load_examples_and_features", None)
        with pytest.raises(ValueError, match=message):
            train(cfg_for(tiny_dir, small_squad, out, save_every=2))
    # A checkpoint from before the total was recorded: judged against this run's total.
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    older = tmp_path / "older"
    older.mkdir()
    torch.save({k: v for k, v in state.items() if k != "total_steps"}, older / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"stopped at step 4 of 6 is here"):
        train(cfg_for(tiny_dir, small_squad, older))
    with pytest.raises(ValueError, match=r"how far its run got cannot be told \(another run's, from an older"):
        train(cfg_for(tiny_dir, small_squad, older, max_steps=9))  # its total is not this run's: unknown
    # A file that is not a checkpoint (or of torch's legacy format, read without a memory map).
    torch.save({**state, "step": 2}, older / "checkpoint.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match=r"stopped at step 2 of 6 is here"):
        train(cfg_for(tiny_dir, small_squad, older))
    (older / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"how far its run got cannot be told \(UnpicklingError\); move it away"):
        train(cfg_for(tiny_dir, small_squad, older))
    # Resumed with a total of steps that differs (the same settings, other data): refused as another run, even
    # where the saved step is past this run's total.
    torch.save({**state, "step": 8, "total_steps": 9}, older / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"cannot resume a different run \(9 steps -> 6: the training data"):
        train(cfg_for(tiny_dir, small_squad, older, resume=True))
    # Finished by --resume, the folder takes a fresh run again (as the demo reruns into runs/demo).
    train(cfg_for(tiny_dir, small_squad, out, save_every=2, resume=True))
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 6
    assert train(cfg_for(tiny_dir, small_squad, out, max_steps=2))["steps"] == 2


def test_a_resume_over_a_train_file_changed_under_the_same_name_is_refused(tiny_dir, small_squad, tmp_path):
    # With --max-steps the schedule does not depend on the data: only the windows' digest tells the runs apart.
    data = tmp_path / "train.json"
    shutil.copy(small_squad[0], data)
    out = tmp_path / "run"

    def crash(step, loss):
        if step == 3:
            raise KeyboardInterrupt  # after the checkpoint at step 2 of 4

    with pytest.raises(KeyboardInterrupt):
        train(cfg_for(tiny_dir, (data, data), out, save_every=2, max_steps=4), on_step=crash)
    doc = json.loads(data.read_text())
    doc["data"][0]["paragraphs"][0]["qas"][0]["question"] = "What else?"
    data.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"cannot resume a different run \(other training windows: the train file"):
        train(cfg_for(tiny_dir, (data, data), out, save_every=2, max_steps=4, resume=True))
    shutil.copy(small_squad[0], data)  # the same contents again: resumed
    summary = train(cfg_for(tiny_dir, (data, data), out, save_every=2, max_steps=4, resume=True))
    assert summary["steps"] == 4


def test_a_resume_compares_the_model_and_train_file_by_content_not_by_path(tiny_dir, small_squad, tmp_path,
                                                                           monkeypatch):  # fmt: skip
    """The same files named from another folder resume (a job restarted elsewhere was refused: the paths were
    compared as typed); another model's settings under the same name do not (a folder with other dropout was
    taken: nothing compared its config)."""
    for name in ("a", "b"):
        shutil.copytree(tiny_dir, tmp_path / name / "m")
        shutil.copy(small_squad[0], tmp_path / name / "train.json")
    config = json.loads((tiny_dir / "config.json").read_text())
    (tmp_path / "b" / "m" / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.0}))
    out = tmp_path / "run"

    def crash(step, loss):
        if step == 3:
            raise KeyboardInterrupt  # after the checkpoint at step 2 of 4

    monkeypatch.chdir(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        train(cfg_for("m", ("train.json",) * 2, out, save_every=2, max_steps=4), on_step=crash)
    monkeypatch.chdir(tmp_path / "b")
    with pytest.raises(ValueError, match=r"cannot resume a different run \(another model: its config.json"):
        train(cfg_for("m", ("train.json",) * 2, out, save_every=2, max_steps=4, resume=True))
    monkeypatch.chdir(tmp_path)
    summary = train(cfg_for("a/m", (tmp_path / "b" / "train.json",) * 2, out, save_every=2, max_steps=4,
                            resume=True))  # fmt: skip
    assert summary["steps"] == 4


def test_a_finished_run_whose_model_was_not_saved_is_not_replaced_by_a_fresh_start(tiny_dir, small_squad, tmp_path,
                                                                                   monkeypatch):  # fmt: skip
    out = tmp_path / "run"

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:  # the disk fills up while the model is written, after the final checkpoint
        m.setattr(bertqa.train, "save_pretrained", disk_full)
        with pytest.raises(OSError):
            train(cfg_for(tiny_dir, small_squad, out, max_steps=2))
    trained = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    message = r"checkpoint.pt: the run here finished but its model/ was not saved; --resume saves it"
    with pytest.raises(ValueError, match=message):
        train(cfg_for(tiny_dir, small_squad, out, max_steps=2))
    shutil.copytree(tiny_dir, out / "model")  # another model beside it (an earlier run's) is not this run's
    with pytest.raises(ValueError, match=message):
        train(cfg_for(tiny_dir, small_squad, out, max_steps=2))
    train(cfg_for(tiny_dir, small_squad, out, max_steps=2, resume=True))
    saved = bertqa.load_model(out / "model").state_dict()
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)
    # Now replaced as before, also from a copy of the folder whose files were stamped in another order.
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    os.utime(copy / "model" / "model.safetensors", ns=(0, 0))
    assert train(cfg_for(tiny_dir, small_squad, copy, max_steps=1))["steps"] == 1
    # (review) A checkpoint of a bertqa from before 2026-12-05 records no run id: a model/ without weights beside it
    # is all that tells its run stopped before saving one. It was replaced, the trained weights lost.
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    del state["run_id"]
    torch.save(state, out / "checkpoint.pt")
    shutil.rmtree(out / "model")
    with pytest.raises(ValueError, match=message):
        train(cfg_for(tiny_dir, small_squad, out, max_steps=2))


def test_the_model_to_fine_tune_may_not_lie_where_the_run_writes(tiny_dir, tmp_path, small_squad):
    out = tmp_path / "run"
    shutil.copytree(tiny_dir, out / "model")  # an earlier run's model, fine-tuned further
    for model in (out / "model", out / "model" / "model.safetensors", out / "." / "model"):
        with pytest.raises(ValueError, match=rf"^--output-dir {out}: this run would write {out / 'model'} over "
                           rf"--model {model}, its own input$"):  # fmt: skip
            cfg_for(model, small_squad, out).validate()
    # An earlier run's checkpoint (the first save would replace it), and a config.json in the model folder.
    torch.save({"model": bertqa.load_model(tiny_dir).state_dict()}, out / "checkpoint.pt")
    with pytest.raises(ValueError, match=rf"this run would write {out / 'checkpoint.pt'} over --model "):
        cfg_for(out / "checkpoint.pt", small_squad, out).validate()
    with pytest.raises(ValueError, match=rf"this run would write {out / 'model'} over --config "):
        cfg_for(tiny_dir, small_squad, out, config=str(out / "model" / "config.json")).validate()
    cfg_for(out, small_squad, out).validate()  # the output folder itself is not replaced
    cfg_for(tiny_dir, small_squad, out, config="base").validate()  # a preset's name is no file


def test_a_resume_compares_what_auto_and_the_tokenizer_default_resolved_to(tiny_dir, small_squad, tmp_path):
    """A run started with --precision auto and the tokenizer's own lower-casing resumes when those are then
    given explicitly with the values they came to, and is refused when an explicit value differs from them."""
    from bertqa.runtime import Precision
    from bertqa.tokenizer import load_tokenizer

    chosen = Precision.resolve("auto", torch.device("cpu")).name
    other = "fp32" if chosen != "fp32" else "bf16"
    out = tmp_path / "run"
    train(cfg_for(tiny_dir, small_squad, out, precision="auto", lower_case=None, max_steps=2))
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    lower = state["resolved"]["lower_case"]
    assert state["resolved"] == {
        "precision": chosen,
        "lower_case": lower,
        "train_data": state["resolved"]["train_data"],
        "model_config": state["resolved"]["model_config"],
    }
    assert lower is load_tokenizer(tiny_dir).do_lower_case is True  # what the tiny model's tokenizer does
    # (what was typed shown beside what it came to: the user typed "auto", not the precision it chose)
    with pytest.raises(ValueError, match=rf"a different run \(--precision 'auto' \(= '{chosen}'\) -> '{other}'\)"):
        train(cfg_for(tiny_dir, small_squad, out, precision=other, lower_case=lower, max_steps=2, resume=True))
    with pytest.raises(ValueError, match=rf"a different run \(--lower-case the default \(= {lower}\) -> {not lower}\)"):
        train(cfg_for(tiny_dir, small_squad, out, precision=chosen, lower_case=not lower, max_steps=2, resume=True))
    summary = train(cfg_for(tiny_dir, small_squad, out, precision=chosen, lower_case=lower, max_steps=2, resume=True))
    assert summary["steps"] == 2 and summary["precision"] == chosen


def test_a_resume_ignores_epochs_under_max_steps_and_max_train_examples_that_keep_the_windows(
    tiny_dir, small_squad, tmp_path
):
    """--epochs decides nothing where --max-steps is set, and --max-train-examples nothing where it keeps the same
    windows (past the file's questions): a resume that changes them is the same run. Where they do decide, refused."""
    n = len([q for a in json.loads(small_squad[0].read_text())["data"] for p in a["paragraphs"] for q in p["qas"]])

    def crash(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(cfg_for(tiny_dir, small_squad, out, save_every=2, epochs=1), on_step=crash)
    with pytest.raises(ValueError, match=r"a different run \(--max-train-examples the default -> 2\)"):
        train(cfg_for(tiny_dir, small_squad, out, save_every=2, epochs=1, max_train_examples=2, resume=True))
    with pytest.raises(ValueError, match=r"a different run \(--epochs 1 -> 3; --max-steps 6 -> the default\)"):
        train(cfg_for(tiny_dir, small_squad, out, save_every=2, epochs=3, max_steps=None, resume=True))
    summary = train(cfg_for(tiny_dir, small_squad, out, save_every=2, epochs=3, max_train_examples=n + 5, resume=True))
    assert summary["steps"] == 6
    full = tmp_path / "full"
    train(cfg_for(tiny_dir, small_squad, full, save_every=2, epochs=1))
    ours, want = (load_file(str(d / "model" / "model.safetensors")) for d in (out, full))
    assert ours.keys() == want.keys() and all(torch.equal(ours[k], want[k]) for k in want)


def test_train_leaves_a_library_callers_global_state_as_it_was(tiny_dir, small_squad, tmp_path, monkeypatch):
    """train() seeds and draws from generators of its own, draws its curves without pyplot (whose backend is a
    notebook's), and puts back the thread excepthook that quiets TensorBoard's writer: the caller's stay theirs,
    a failed run's too."""
    import threading

    import matplotlib
    import torch.utils.tensorboard

    backend = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        torch.manual_seed(123)
        state, hook = torch.get_rng_state(), threading.excepthook
        train(cfg_for(tiny_dir, small_squad, tmp_path / "run", max_steps=2, tensorboard=True))
        assert torch.equal(torch.get_rng_state(), state)
        assert matplotlib.get_backend() == "svg" and threading.excepthook is hook
        assert (tmp_path / "run" / "curves.png").read_bytes().startswith(b"\x89PNG")

        def stop(step, loss):
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            train(cfg_for(tiny_dir, small_squad, tmp_path / "stopped", max_steps=2, tensorboard=True), on_step=stop)
        assert torch.equal(torch.get_rng_state(), state) and threading.excepthook is hook
        with monkeypatch.context() as m:  # a writer that cannot be made (the hook goes in before it)
            m.setattr(torch.utils.tensorboard, "SummaryWriter", mock.Mock(side_effect=OSError(errno.EACCES, "no")))
            with pytest.raises(OSError):
                train(cfg_for(tiny_dir, small_squad, tmp_path / "refused", max_steps=2, tensorboard=True))
        assert threading.excepthook is hook
    finally:
        matplotlib.use(backend)


def test_training_evaluating_and_answering_with_bars_off_leave_no_thread_behind(tiny_dir, small_squad, tmp_path):
    """(review) A disabled tqdm bar still starts tqdm's monitor thread, which stays for the rest of the process: every
    API call with its bars off (progress=False; QuestionAnswerer draws none) left it in the caller's process. In a
    process of its own: tqdm's thread is started once a process and this one's may have it already."""
    cfg = cfg_for(tiny_dir, small_squad, tmp_path / "run", max_steps=2, predict_file=str(small_squad[1]))
    code = f"""if True:
        import threading
        from bertqa import QuestionAnswerer
        from bertqa.train import TrainConfig, train
        train(TrainConfig(**{dataclasses.asdict(cfg)!r}))
        qa = QuestionAnswerer.from_pretrained({str(tmp_path / "run" / "model")!r})
        print(qa(question="Who?", context="Bob went home."))
        print("threads:", sorted(t.name for t in threading.enumerate()))
    """
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run" / "predictions.json").is_file()
    assert "threads: ['MainThread']" in r.stdout.splitlines(), r.stdout


def test_the_bar_in_a_log_is_drawn_at_start_and_end_and_in_a_notebook_at_each_logged_step(
    tiny_dir, small_squad, tmp_path, monkeypatch
):
    """In a file (a log), every draw of the bar stays as text on one line: it was drawn at every --log-every
    (the loss and learning rate beside it), whatever its interval. A run of seconds: at its start and its end."""
    with open(tmp_path / "err.log", "w", encoding="utf-8") as err:
        monkeypatch.setattr(sys, "stderr", err)
        train(cfg_for(tiny_dir, small_squad, tmp_path / "run", max_steps=6, log_every=1, progress=True))
        monkeypatch.undo()
    text = (tmp_path / "err.log").read_bytes()
    assert 1 <= text.count(b"\r") <= 3, text
    # In a notebook (a stream of no file, as here), or on a terminal, the loss and learning rate are drawn as each
    # line is logged, not later.
    notebook = io.StringIO()
    monkeypatch.setattr(sys, "stderr", notebook)
    monkeypatch.setattr(bertqa.train, "tqdm", functools.partial(bertqa.train.tqdm, mininterval=1e9))  # (no other)
    train(cfg_for(tiny_dir, small_squad, tmp_path / "shown", max_steps=4, log_every=1, progress=True))
    assert notebook.getvalue().count("loss=") >= 4, notebook.getvalue()


def test_an_fp16_run_skips_only_while_calibrating_and_clips_unscaled_gradients(tiny_nodrop, small_squad, tmp_path):
    """(mutation review) The loss scaler's updates are counted as skipped only where it lowered its scale, and the
    gradients are unscaled before they are clipped (clipped scaled, they came out 2^16 times too small)."""
    runs = {}
    for precision in ("fp32", "fp16"):
        summary = train(cfg_for(tiny_nodrop, small_squad, tmp_path / precision, max_steps=4, precision=precision,
                                lr=1e-2, max_grad_norm=1.0))  # fmt: skip
        runs[precision] = load_file(tmp_path / precision / "model" / "model.safetensors")
        # (fp16's scaler may skip while it calibrates, from 2^16 down; the rest were applied)
        assert summary["skipped_steps"] <= (precision == "fp16"), precision
    start = load_file(tiny_nodrop / "model.safetensors")
    for name in ("qa_outputs.weight", "bert.encoder.layer.0.attention.self.query.weight"):  # (3 updates of 4)
        moved = {p: (runs[p][name] - start[name]).abs().max() for p in runs}
        assert 0.5 * moved["fp32"] < moved["fp16"] < 1.5 * moved["fp32"], (name, moved)


def test_the_optimizer_is_the_recipes_adamw():
    """(mutation review) No weight decay on biases and LayerNorm weights, eps 1e-6 (NVIDIA's and HF's run_squad)."""
    from bertqa.config import BertConfig
    from bertqa.model import BertForQuestionAnswering
    from bertqa.train import build_optimizer

    model = BertForQuestionAnswering(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=32))  # fmt: skip
    opt = build_optimizer(
        model, TrainConfig(model="m", train_file="x", output_dir="o", weight_decay=0.01), torch.device("cpu")
    )
    name = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = ([name[id(p)] for p in g["params"]] for g in opt.param_groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert no_decay and all(n.endswith(".bias") or "LayerNorm" in n for n in no_decay)
    assert "bert.embeddings.LayerNorm.weight" in no_decay and "qa_outputs.weight" in decay
    assert all(not n.endswith(".bias") and "LayerNorm" not in n for n in decay)
    assert len(decay) + len(no_decay) == len(name)
    assert opt.defaults["eps"] == 1e-6 and opt.defaults["betas"] == (0.9, 0.999)


def test_accumulation_clipping_epochs_and_the_last_logged_step(tiny_nodrop, small_squad, tmp_path):
    """(mutation review) A batch of 8 is two accumulated halves (the loss divided by the accumulation); a
    --max-grad-norm of 0 is no clipping; --epochs 1 covers every window (the steps rounded up); the last step is
    logged and is the summary's loss whatever --log-every."""

    def weights(name):
        return load_file(tmp_path / name / "model" / "model.safetensors")

    # (The same windows; each half padded to its own longest window, whose padding, as transformers', takes part in
    # the loss's softmax: close, not equal.)
    for name, batch, accum in (("one", 8, 1), ("two", 4, 2)):
        train(cfg_for(tiny_nodrop, small_squad, tmp_path / name, max_steps=3, train_batch_size=batch, grad_accum=accum))
    one, two = (read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("one", "two"))
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=0.05)
    for norm in (0.0, 1e9):
        train(cfg_for(tiny_nodrop, small_squad, tmp_path / f"norm{norm}", max_steps=3, lr=5e-2, max_grad_norm=norm))
    a, b = weights("norm0.0"), weights("norm1000000000.0")
    assert all(torch.equal(a[k], b[k]) for k in a)
    summary = train(cfg_for(tiny_nodrop, small_squad, tmp_path / "epoch", max_steps=None, epochs=1.0,
                            train_batch_size=5, log_every=2))  # fmt: skip
    assert summary["steps"] == math.ceil(summary["train_features"] / 5) and summary["train_features"] % 5
    rows = read_jsonl(tmp_path / "epoch" / "metrics.jsonl")
    assert [r["step"] for r in rows][-2:] == [6, 7] and rows[-1]["loss"] == pytest.approx(summary["final_loss"])


def test_length_grouped_batches_pad_little_come_shuffled_and_differ_by_epoch():
    """(mutation review) Nothing held what --group-by-length does: windows of similar length share a batch (sorted in
    chunks of GROUP_CHUNK batches), the batches come in shuffled order, and each epoch is another shuffle."""
    from bertqa.batching import epoch_batches

    lengths = np.random.default_rng(0).integers(8, 385, 4096)

    def padding(batches):
        return int(sum(lengths[b].max() * len(b) - lengths[b].sum() for b in batches))

    grouped = epoch_batches(4096, 32, 0, 0, lengths)
    assert sorted(grouped.ravel().tolist()) == list(range(4096))
    assert padding(grouped) < 0.1 * padding(epoch_batches(4096, 32, 0, 0))
    maxima = [int(lengths[b].max()) for b in grouped]
    assert sum(a > b for a, b in zip(maxima, maxima[1:])) > len(maxima) // 4  # not in runs of rising lengths
    for with_lengths in (None, lengths):
        assert np.array_equal(epoch_batches(4096, 32, 0, 1, with_lengths), epoch_batches(4096, 32, 0, 1, with_lengths))
        assert not np.array_equal(
            epoch_batches(4096, 32, 0, 0, with_lengths), epoch_batches(4096, 32, 0, 1, with_lengths)
        )


def test_the_same_seed_gives_the_same_loss_curve_bit_for_bit(tiny_dir, small_squad, tmp_path):
    # Dropout on (the tiny model's 0.1) and length-grouped shuffling: everything random comes from the seed.
    runs = {}
    for name, seed in (("a", 42), ("b", 42), ("c", 7)):
        train(cfg_for(tiny_dir, small_squad, tmp_path / name, max_steps=6, seed=seed))
        losses = [r["loss"] for r in read_jsonl(tmp_path / name / "metrics.jsonl")]
        runs[name] = losses, load_file(str(tmp_path / name / "model" / "model.safetensors"))
    (la, wa), (lb, wb), (lc, _) = runs["a"], runs["b"], runs["c"]
    assert len(la) == 6 and la == lb  # exactly equal floats, not approximately
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert lc != la  # the seed really decides something
    # --deterministic (for GPUs) changes nothing on a CPU, whose kernels are deterministic already.
    train(cfg_for(tiny_dir, small_squad, tmp_path / "d", max_steps=6, seed=42, deterministic=True))
    assert [r["loss"] for r in read_jsonl(tmp_path / "d" / "metrics.jsonl")] == la
    assert json.loads((tmp_path / "d" / "model" / "run_config.json").read_text())["attention"] == "auto"  # GPUs: eager
    assert not torch.are_deterministic_algorithms_enabled()  # put back after the run


@pytest.fixture
def poison(monkeypatch):
    """Training forward passes whose loss is NaN at the given call numbers (1-based); records the model."""
    from bertqa.model import BertForQuestionAnswering

    forward = BertForQuestionAnswering.forward
    state = {"calls": 0, "bad": set(), "model": None}

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            state["calls"] += 1
            state["model"] = self
            if state["calls"] in state["bad"]:
                out = out._replace(loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(BertForQuestionAnswering, "forward", poisoned)
    return state


def test_a_non_finite_loss_skips_its_update(tiny_nodrop, small_squad, tmp_path, poison, capsys):
    poison["bad"] = {3}
    weights = {}
    tensorboard = importlib.util.find_spec("tensorboard") is not None  # (a step without a loss to plot)
    summary = train(cfg_for(tiny_nodrop, small_squad, tmp_path / "out", max_steps=5, tensorboard=tensorboard),
                    on_step=lambda step, loss: weights.setdefault(step, poison["model"].qa_outputs.weight.clone()))  # fmt: skip
    assert "step 3: non-finite loss or gradients, update skipped (1 in a row)" in capsys.readouterr().out
    assert torch.equal(weights[3], weights[2]) and not torch.equal(weights[4], weights[3])
    assert all(torch.isfinite(w).all() for w in weights.values())
    rows = {r["step"]: r for r in read_jsonl(tmp_path / "out" / "metrics.jsonl")}
    assert rows[3]["loss"] is None and rows[3]["skipped_steps"] == 1 and rows[4]["loss"] > 0
    assert summary["skipped_steps"] == 1 and summary["final_loss"] > 0


def test_updates_that_fail_apart_from_each_other_do_not_stop_the_run(tiny_nodrop, small_squad, tmp_path, poison):
    """(mutation review) --max-nonfinite-steps counts updates skipped in a row: a good one between resets it."""
    poison["bad"] = {2, 4, 6}
    summary = train(cfg_for(tiny_nodrop, small_squad, tmp_path / "out", max_steps=8, max_nonfinite_steps=2))
    assert summary["steps"] == 8 and summary["skipped_steps"] == 3


def test_a_skipped_first_update_does_not_make_torch_warn_about_the_schedule(tiny_nodrop, small_squad, tmp_path, poison):
    """What fp16's scaler does on every rank while it calibrates: torch warned that the schedule stepped first."""
    import warnings

    poison["bad"] = {1}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = train(cfg_for(tiny_nodrop, small_squad, tmp_path / "out", max_steps=2))
    assert summary["skipped_steps"] == 1
    assert not [w for w in caught if "lr_scheduler" in str(w.message)], [str(w.message) for w in caught]


def test_consecutive_non_finite_steps_stop_the_run_and_keep_the_checkpoint(tiny_dir, small_squad, tmp_path, poison):
    from bertqa.train import NonFiniteError

    poison["bad"] = set(range(3, 100))
    out = tmp_path / "out"
    with pytest.raises(
        NonFiniteError,
        match=r"stopped at step 6: 4 updates in a row skipped .* the last checkpoint, "
        r".*checkpoint\.pt \(step 4\), is intact; --resume keeps a run's "
        r"settings: to retry with a lower --lr, move it away or use another "
        r"--output-dir$",
    ):  # fmt: skip (fp32: no other precision to advise)
        train(cfg_for(tiny_dir, small_squad, out, max_steps=10, save_every=2, max_nonfinite_steps=4))
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (out / "model").exists() and not (out / "summary.json").exists()
    # (review) The advice, followed: it read "try a lower --lr", which --resume refuses (another run's settings), as
    # does a fresh run beside the checkpoint. Moved away, the retry runs; with none saved, it runs in place.
    (out / "checkpoint.pt").rename(tmp_path / "diverged.pt")
    poison["bad"] = set()
    assert train(cfg_for(tiny_dir, small_squad, out, max_steps=2, lr=1e-5))["skipped_steps"] == 0
    poison["bad"] = set(range(1, 100))
    with pytest.raises(NonFiniteError, match=r"no checkpoint was saved \(see --save-every\); to retry with a lower "
                                             r"--lr, or fp32, run again$"):  # fmt: skip
        train(cfg_for(tiny_dir, small_squad, tmp_path / "fresh", max_steps=10, max_nonfinite_steps=2, precision="bf16"))
    poison["bad"] = set()
    assert train(cfg_for(tiny_dir, small_squad, tmp_path / "fresh", max_steps=2, lr=1e-5))["skipped_steps"] == 0


def test_fp16_runs_with_a_gradient_scaler_and_counts_skipped_steps(tiny_dir, small_squad, tmp_path, poison):
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.nn.Linear(2, 2)(torch.ones(1, 2))
    except RuntimeError as e:
        platform_skip(f"fp16 autocast unsupported on this CPU build: {e}")
    poison["bad"] = {2}
    summary = train(cfg_for(tiny_dir, small_squad, tmp_path / "fp16", precision="fp16", max_steps=4))
    assert summary["precision"] == "fp16" and math.isfinite(summary["final_loss"])
    assert summary["skipped_steps"] >= 1  # the poisoned step, plus any the scaler skipped while calibrating
    assert read_jsonl(tmp_path / "fp16" / "metrics.jsonl")[1]["skipped_steps"] >= 1
    scaler = torch.load(tmp_path / "fp16" / "checkpoint.pt", weights_only=True)["scaler"]
    # The scaler saw the NaN and backed off: its scale is below where it starts.
    assert scaler is not None and scaler["scale"] < 65536.0


def run_cli(*args, env=None, module=("-m", "bertqa")):
    return subprocess.run([sys.executable, *module, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)  # fmt: skip


def common_args(model, squad, out):
    return ["--model", model, "--train-file", squad[0], "--output-dir", out, "--max-seq-length", 128,
            "--doc-stride", 64, "--max-query-length", 32, "--cache-dir", "none", "--no-progress", "--precision", "fp32"]  # fmt: skip


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--train-file": "missing.json"}, "missing.json: no such file"),
        ({"--model": "no/such/model"}, "no/such/model: no such file or folder"),
        ({"--batch-size": 0}, "--batch-size must be a positive integer"),
        ({"--precision": "fp8"}, "invalid choice: 'fp8'"),
        ({"--max-seq-length": 20}, "--max-seq-length 20 leaves no room for context"),
        ({"--doc-stride": 0}, "--doc-stride must be a positive integer, got 0"),
        ({"--epochs": -3}, "--epochs must be positive, got -3.0"),  # with --max-steps too
        ({"--warmup": 1.5}, "--warmup must be a fraction of the steps in [0, 1], got 1.5"),  # each flag named alone
        ({"--weight-decay": -0.1}, "--weight-decay must be >= 0, got -0.1"),
        ({"--lr": 0}, "--lr must be positive, got 0.0"),  # (mutation review: the boundaries)
        ({"--save-every": -1}, "--save-every must be >= 0, got -1"),
        ({"--max-nonfinite-steps": 0}, "--max-nonfinite-steps must be a positive integer, got 0"),
        ({"--doc-stride": 94}, "--doc-stride 94 is longer than the shortest context window (93 = --max-seq-length -"),
        ({"--max-seq-length": 600}, "exceeds the model's 512 position embeddings"),
        ({"--device": "cuda:7"}, "--device cuda:7: not usable here"),
        ({"--predict-file": "nowhere.json"}, "nowhere.json: no such file"),
    ],
)
def test_bad_arguments_exit_with_one_line_and_write_nothing(change, message, tiny_dir, small_squad, tmp_path):
    args = common_args(tiny_dir, small_squad, tmp_path / "out") + ["--max-steps", 1]
    for flag, value in change.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    r = run_cli("train", *args)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


def test_predict_checks_its_output_on_rank_0_alone(tiny_dir, small_squad, tmp_path, monkeypatch):
    # Only rank 0 writes it: on another machine of a torchrun the folder may not be there, or not be writable.
    from bertqa.evaluate import PredictConfig, predict

    (tmp_path / "file").write_text("")
    cfg = PredictConfig(model=str(tiny_dir), predict_file=str(small_squad[1]), output=str(tmp_path / "file" / "p.json"),
                        cache_dir=None, progress=False, precision="fp32")  # fmt: skip
    with pytest.raises(ValueError, match=r"p\.json: cannot write in .*file"):
        predict(cfg)

    class Reached(Exception):
        pass

    def prepared(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(bertqa.evaluate, "is_rank_zero", lambda: False)
    monkeypatch.setattr(bertqa.evaluate, "_prepared", prepared)
    with pytest.raises(Reached):
        predict(cfg)


def test_evaluate_bad_input_writes_nothing(tiny_dir, small_squad, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": 3, "qas": []}]}]}')
    args = ["--model", tiny_dir, "--output-dir", tmp_path / "out", "--cache-dir", "none", "--no-progress"]
    for extra, message in ((["--predict-file", bad], "article 0 paragraph 0"),
                           (["--predict-file", small_squad[1], "--batch-size", -1], "--batch-size must be")):  # fmt: skip
        r = run_cli("evaluate", *args, *extra)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode != 0 and len(lines) == 1 and message in lines[0], r.stderr
        assert not (tmp_path / "out").exists()


def torchrun(nproc, *args):
    # --standalone: a free port of its own, not the fixed default 29500 that concurrent runs would share.
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m", "bertqa")
    return run_cli(*args, module=launcher, env={"OMP_NUM_THREADS": "1"})


def test_two_processes_match_one(tiny_nodrop, small_squad, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    base = common_args(tiny_nodrop, small_squad, None)[2:]  # without --model/--output-dir
    args = ["--model", tiny_nodrop, "--max-steps", 4, "--log-every", 1, *base, "--predict-file", small_squad[1]]
    # One process accumulating two micro-batches of 4 sees the same rows, padded the same way, as two ranks of
    # 4 (the loss's softmax runs over padding too, as in transformers, so a batch of 8 would pad differently).
    r1 = run_cli("train", *args, "--output-dir", one, "--batch-size", 4, "--grad-accum", 2, "--device", "cpu")
    assert r1.returncode == 0, r1.stderr
    r2 = torchrun(2, "train", *args, "--output-dir", two, "--batch-size", 4, "--device", "cpu")
    assert r2.returncode == 0, r2.stderr
    assert "world size 2" in r2.stdout and r2.stdout.count("world size") == 1  # rank 0 alone prints
    l1 = [r["loss"] for r in read_jsonl(one / "metrics.jsonl")]
    l2 = [r["loss"] for r in read_jsonl(two / "metrics.jsonl")]
    assert l1 == pytest.approx(l2, abs=1e-5)  # 2 ranks x 4 == 1 x 4 x 2 micro-batches
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert s2["world_size"] == 2 and s2["final_loss"] == pytest.approx(s1["final_loss"], abs=1e-5)
    # Evaluation sharded over two ranks and gathered gives exactly one process's predictions and metrics.
    ev1, ev2 = tmp_path / "ev1", tmp_path / "ev2"
    eval_args = ["--model", one / "model", "--predict-file", small_squad[1], "--max-seq-length", 128,
                 "--doc-stride", 64, "--max-query-length", 32, "--cache-dir", "none", "--no-progress",
                 "--batch-size", 3, "--precision", "fp32"]  # fmt: skip
    assert run_cli("evaluate", *eval_args, "--output-dir", ev1).returncode == 0
    r = torchrun(2, "evaluate", *eval_args, "--output-dir", ev2)
    assert r.returncode == 0, r.stderr
    assert (ev1 / "predictions.json").read_text() == (ev2 / "predictions.json").read_text()
    m1, m2 = (json.loads((d / "summary.json").read_text()) for d in (ev1, ev2))
    assert (m1["exact_match"], m1["f1"]) == (m2["exact_match"], m2["f1"])


def test_compile_without_a_cpp_compiler_is_one_line_before_anything(tiny_dir, small_squad, tmp_path):
    """On a CPU, torch.compile builds its kernels in C++ at the first step: without a compiler that was inductor's
    error after the model and the data were loaded, read as bertqa's bug ("internal error ... please report it")."""
    import torch._inductor.config as inductor

    out = tmp_path / "run"
    message = (r"^--compile: no working C\+\+ compiler for torch.compile's CPU kernels \(.*; \$CXX .*\); install one "
               r"\(g\+\+\), name it in \$CXX, or leave --compile out$")  # fmt: skip
    for cxx in ("no-such-g++", ""):  # none there; a folder (CXX=/usr/bin/, say): its OSError named nothing
        # (inductor's own patch: a monkeypatch's undo left the setting hidden from later compiles in the process)
        with inductor.patch({"cpp.cxx": (None, str(tmp_path / cxx))}), pytest.raises(ValueError, match=message):
            train(cfg_for(tiny_dir, small_squad, out, compile=True))
        assert not out.exists()


SIGTERM_IN_THE_SWAP = """
import dataclasses, json, os, signal, sys
from bertqa import files
from bertqa.train import TrainConfig, train

real = files._locked_temp_dir

def swapping(path, prefix, *args, **kwargs):  # model/ is being swapped in: SIGTERM now (a scheduler's preemption)
    if path.name == "model" and prefix.endswith(".old-"):
        os.kill(os.getpid(), signal.SIGTERM)
    return real(path, prefix, *args, **kwargs)

files._locked_temp_dir = swapping
train(TrainConfig(**json.loads(sys.argv[1])))
"""


def test_a_sigterm_held_while_model_is_swapped_in_leaves_no_earlier_results_beside_it(tiny_dir, small_squad,
                                                                                        tmp_path):  # fmt: skip
    """SIGTERM is held while model/ is swapped in, then delivered: its default ends the process at once, and the
    earlier run's predictions and summary, which the new model replaces, were removed only in a `finally:` after
    that, so that they stayed beside it (and a --resume then carried their EM/F1 over to the new model)."""
    out = tmp_path / "out"
    train(cfg_for(tiny_dir, small_squad, out, predict_file=str(small_squad[1])))
    assert (out / "summary.json").is_file() and (out / "predictions.json").is_file()
    cfg = dataclasses.asdict(cfg_for(tiny_dir, small_squad, out, seed=7))
    r = subprocess.run([sys.executable, "-c", SIGTERM_IN_THE_SWAP, json.dumps(cfg)], capture_output=True, timeout=300)
    assert r.returncode == -signal.SIGTERM, r.stderr.decode()
    assert json.loads((out / "model" / "run_config.json").read_text())["seed"] == 7  # the new model is in place
    assert not [
        name for name in ("summary.json", "predictions.json", "nbest_predictions.json") if (out / name).exists()
    ]


def test_curves_show_a_lone_point(tmp_path):
    """A run of one logged line (one step, or --log-every past the last step) drew two empty panels, and a finite
    loss between two non-finite ones was drawn nowhere: lines without markers show no lone point."""
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    from bertqa.train import plot_curves

    def blue_pixels(rows) -> int:  # the loss curve's colour (matplotlib's first, tab:blue)
        (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
        rgb = imread(tmp_path / "curves.png")[..., :3]
        return int((abs(rgb - np.array([0.12, 0.47, 0.71])).max(axis=-1) < 0.08).sum())

    assert blue_pixels([{"step": 1, "loss": 4.9, "lr": 1e-3}]) > 0
    assert blue_pixels([{"step": s, "loss": loss, "lr": 1e-3} for s, loss in ((1, None), (2, 4.7), (3, None))]) > 0


def test_curves_of_no_finite_loss_say_so(tmp_path, monkeypatch):
    """(mutation review) A run whose every logged loss was non-finite draws an empty loss panel, labelled."""
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    from bertqa.train import plot_curves

    texts, text = [], Axes.text
    monkeypatch.setattr(Axes, "text", lambda self, x, y, s, *a, **k: texts.append(s) or text(self, x, y, s, *a, **k))
    for losses, said in (((None, None), ["no finite loss logged"]), ((None, 4.7), [])):
        rows = [{"step": s, "loss": loss, "lr": 1e-3} for s, loss in enumerate(losses, 1)]
        (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        texts.clear()
        plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
        assert texts == said and (tmp_path / "curves.png").is_file()


@pytest.mark.parametrize("error, said", [
    (ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib"),
     "matplotlib is not installed (pip install 'bertqa[plot]')"),
    (ImportError("libXau.so.6: failed to map segment from shared object"),
     "matplotlib: libXau.so.6: failed to map segment from shared object"),
])  # fmt: skip
def test_no_curves_says_why(error, said, tmp_path, monkeypatch, caplog):
    """(review) matplotlib failing to import (a library it loads not mapped, under ulimit -v) was said to be
    "not installed", with advice to install what is installed."""
    import builtins

    from bertqa.train import plot_curves

    real_import = builtins.__import__

    def failing(name, *args, **kwargs):
        if name.partition(".")[0] == "matplotlib":
            raise error
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", failing)
    caplog.set_level(logging.INFO, logger="bertqa")
    plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert caplog.messages == [f"no curves.png: {said}"] and not (tmp_path / "curves.png").exists()


def test_every_text_file_is_read_and_written_as_utf_8_whatever_the_locale(tiny_dir, tiny_squad, tmp_path):
    """(review) summary.json (UTF-8, with the paths as given) was read back in the locale's encoding (cp1252 on
    Windows: mojibake carried into the next summary), and metrics.jsonl, the tokenizer's and config's JSON and
    save_pretrained's extra files written in it. Python's -X warn_default_encoding flags every such open; here
    each flag from bertqa's code is an error, through train (and its resume once finished), evaluate,
    predict, score, convert, ask and bench."""
    script = tmp_path / "run.py"
    script.write_text(
        "import json, sys, warnings\n"
        "warnings.filterwarnings('error', category=EncodingWarning, module=r'bertqa(\\.|$)')\n"
        "from bertqa.cli import main\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    code = main(args)\n"
        "    if code:\n"
        "        sys.exit(f'{args!r}: exit {code}')\n",
        encoding="utf-8",
    )
    out, squad = tmp_path / "run é", str(tiny_squad)  # (a path that is not ASCII, in the summary)
    windows = ["--max-seq-length", "128", "--doc-stride", "32", "--cache-dir", "none", "--no-progress"]
    train = ["train", "--model", str(tiny_dir), "--train-file", squad, "--output-dir", str(out), "--max-steps", "2",
             "--batch-size", "4", "--save-every", "1", *windows]  # fmt: skip
    model = str(out / "model")
    commands = [
        [*train, "--predict-file", squad],
        [*train, "--resume"],  # (finished: it keeps the evaluation in summary.json, read back)
        ["evaluate", "--model", model, "--predict-file", squad, "--output-dir", str(tmp_path / "ev"), *windows],
        ["predict", "--model", model, "--input", squad, "--output", str(tmp_path / "p.json"), *windows],
        ["score", squad, str(tmp_path / "p.json")],
        ["convert", model, str(tmp_path / "conv")],
        ["ask", "--model", model, "--question", "Who?", "--context", "Zoë won."],
        [
            "bench",
            "--model",
            model,
            "--mode",
            "infer",
            "--steps",
            "1",
            "--segments",
            "1",
            "--warmup",
            "0",
            "--seq-len",
            "64",
            "--batch-size",
            "2",
        ],  # fmt: skip
    ]
    result = subprocess.run([sys.executable, "-X", "warn_default_encoding", str(script), json.dumps(commands)],
                            capture_output=True, text=True, encoding="utf-8", cwd=tmp_path, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    run_config = json.loads((out / "model" / "run_config.json").read_text(encoding="utf-8"))
    assert summary["exact_match"] >= 0 and run_config["output_dir"] == str(out)


def test_a_resumed_run_logs_and_sums_its_throughput_over_the_steps_it_timed(tiny_dir, small_squad, tmp_path,
                                                                            monkeypatch):  # fmt: skip
    """A fake clock where each step takes 1 s: the sequences/s logged after a resume count the steps since the resume
    (not since step 0, over the resumed part's time), and the summary's rate is the whole run's where the checkpoint
    recorded its time, the resumed part's alone where it did not."""
    import types

    import bertqa.train as train_module

    clock = [0.0]
    real_to_batch = train_module.to_batch

    def timed_to_batch(*args, **kwargs):
        clock[0] += 0.5  # two micro-batches a step: 1 s a step
        return real_to_batch(*args, **kwargs)

    monkeypatch.setattr(train_module, "to_batch", timed_to_batch)
    monkeypatch.setattr(train_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def crash(step, loss):
        if step == 5:
            raise KeyboardInterrupt  # after the checkpoint at step 4

    kw = dict(save_every=4, grad_accum=2, log_every=2, max_steps=8)  # 8 sequences a step
    for recorded in (True, False):
        out = tmp_path / f"recorded-{recorded}"
        with pytest.raises(KeyboardInterrupt):
            train(cfg_for(tiny_dir, small_squad, out, **kw), on_step=crash)
        state = torch.load(out / "checkpoint.pt", weights_only=True)
        assert state["step"] == 4 and state["train_seconds"] == 4.0
        if not recorded:  # a checkpoint from before train_seconds was kept
            del state["train_seconds"]
            torch.save(state, out / "checkpoint.pt")
        clock[0] = 100.0  # a resume's clock starts anywhere
        summary = train(cfg_for(tiny_dir, small_squad, out, resume=True, **kw))
        logged = {r["step"]: r["sequences_per_second"] for r in read_jsonl(out / "metrics.jsonl")}
        assert logged[6] == logged[8] == 8.0  # steps 5-6 in 2 s, 5-8 in 4 s: 8 sequences a second
        if recorded:  # the whole run: 8 steps in 4 + 4 s
            assert summary["e2e_train_time"] == 8.0 and summary["training_sequences_per_second"] == 8.0
        else:  # this part alone: 4 steps in 4 s
            assert summary["e2e_train_time"] == 4.0 and summary["training_sequences_per_second"] == 8.0
