"""`bertqa bench`: a short real run against transformers, the FLOP count, and bad arguments."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bertqa.bench import forward_flops
from bertqa.config import BertConfig


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "bertqa", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip


def test_forward_flops_of_bert_base_match_the_usual_count():
    cfg = BertConfig.preset("base")
    # 2 FLOPs per multiply-add of every weight (85M in the encoder) per token, plus attention's 4 T^2 C per layer.
    encoder_params = 12 * (4 * 768 * 768 + 2 * 768 * 3072)
    T = 384
    expected = 2 * T * encoder_params + 12 * 4 * T * T * 768 + 2 * T * 768 * 2
    assert forward_flops(cfg, np.array([T])) == pytest.approx(expected)
    assert forward_flops(cfg, np.array([100, 284])) < forward_flops(cfg, np.array([T]))


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_bench_against_transformers_prints_a_table_and_a_json_line(tiny_dir, tiny_squad, mode):
    r = run_cli("bench", "--model", tiny_dir, "--mode", mode, "--data", tiny_squad, "--seq-len", 128, "--batch-size", 4,
                "--steps", 2, "--segments", 2, "--warmup", 1, "--compare", "hf", "--precision", "fp32")  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert (
        result["mode"] == mode
        and result["precision"] == "fp32"
        and "AMD" in result["device"]
        or "CPU" in result["device"]
    )
    assert set(result["rows"]) == {"bertqa", "hf-run_qa", "hf-best"}
    for row in result["rows"].values():
        assert row["windows_per_s"] > 0 and 0 < row["mfu"] < 1.5 and len(row["segments"]) == 2
    assert result["speedup_vs_hf-best"] == pytest.approx(
        result["rows"]["bertqa"]["windows_per_s"] / result["rows"]["hf-best"]["windows_per_s"]
    )
    # run_qa.py pads every window to --seq-len: the same real tokens take longer.
    assert "| hf-run_qa |" in r.stdout and result["mean_window_length"] < 128


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_every_segment_times_the_same_batches_spread_over_the_lengths(monkeypatch, mode):
    """Segments differ by noise alone: the warm-up and each segment run the same batches, and those stand for
    the set: one from the middle of each quarter of the batches sorted by length, not four drawn at random."""
    import torch

    import bertqa.bench as bench
    from bertqa.model import BertForQuestionAnswering

    seen = []
    real_to_batch = bench.to_batch
    monkeypatch.setattr(
        bench, "to_batch", lambda w, idx, *a, **k: seen.append(tuple(idx)) or real_to_batch(w, idx, *a, **k)
    )
    cfg = BertConfig(vocab_size=1100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    windows = bench.random_windows(80, 32, cfg.vocab_size)
    windows.lengths[:] = np.random.default_rng(0).integers(8, 33, 80)  # lengths to sort and group by
    row = bench.run_row(BertForQuestionAnswering(cfg), windows, mode, 4, True, bench.Precision.resolve("fp32",
                        torch.device("cpu")), torch.device("cpu"), warmup=2, steps=4, segments=3)  # fmt: skip
    assert len(seen) == 2 + 4 * 3 and len(row["segments"]) == 3
    timed = seen[2:6]
    assert seen[:2] == timed[:2] and seen[6:10] == timed and seen[10:14] == timed
    assert len(set(timed)) == 4
    chosen = sorted(int(windows.lengths[list(b)].max()) for b in timed)
    every = [int(windows.lengths[b].max()) for b in bench.epoch_batches(80, 4, 0, 0, windows.lengths)]
    if mode == "infer":
        order = np.argsort(windows.lengths, kind="stable")
        every = [int(windows.lengths[order[i : i + 4]].max()) for i in range(0, 80, 4)]
    every.sort()  # 20 batches: quarters of 5, whose middle ones are the 3rd, 8th, 13th and 18th
    assert chosen == [every[2], every[7], every[12], every[17]]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "huge"], "--preset 'huge': choose base or large"),
        (["--preset", "base", "--batch-size", "0"], "--batch-size must be a positive integer"),
        (["--preset", "base", "--mode", "fly"], "--mode 'fly': choose train or infer"),
        (["--preset", "base", "--seq-len", "4096"], "--seq-len 4096: must be between 16 and 512"),
        (["--preset", "base", "--compare", "tf"], "--compare 'tf': only hf is supported"),
        (["--model", "no/such/dir"], "--model no/such/dir: no such file or folder"),
        (["--preset", "base", "--data", "x.json"], "--data x.json: no such file"),
        ([], "give exactly one of --model or --preset"),
    ],
)
def test_bad_arguments_are_one_line(args, message):
    r = run_cli("bench", *args)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode != 0 and len(lines) == 1 and message in lines[0], r.stderr
