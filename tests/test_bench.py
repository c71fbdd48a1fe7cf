"""`bertqa bench`: a short real run against transformers, the FLOP count, and bad arguments."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from skips import platform_skip

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
    import transformers

    assert result["mode"] == mode and result["precision"] == "fp32"
    assert "PyTorch CPU capability" in result["device"]
    assert result["versions"] == {"torch": torch.__version__, "transformers": transformers.__version__}
    assert f"torch {torch.__version__}, transformers {transformers.__version__}" in r.stdout
    assert set(result["rows"]) == {"bertqa", "hf-run_qa", "hf-best"}
    for row in result["rows"].values():
        assert row["windows_per_s"] > 0 and 0 < row["mfu"] < 1.5 and len(row["segments"]) == 2
    assert result["speedup_vs_hf-best"] == pytest.approx(
        result["rows"]["bertqa"]["windows_per_s"] / result["rows"]["hf-best"]["windows_per_s"]
    )
    ours, best = result["rows"]["bertqa"]["segments"], result["rows"]["hf-best"]["segments"]
    assert result["speedup_vs_hf-best_by_segment"] == [round(a / b, 3) for a, b in zip(ours, best)]
    assert "vs hf-best, segment by segment: " in r.stdout
    # run_qa.py pads every window to --seq-len: the same real tokens take longer.
    assert "| hf-run_qa |" in r.stdout and result["mean_window_length"] < 128
    # Training: transformers keeps the config's attention dropout, bertqa's default drops it; the JSON says so.
    assert result.get("attention_dropout") == ({"bertqa": False, "hf": True} if mode == "train" else None)


def test_more_steps_than_the_data_has_batches_is_refused(minilm_dir, tiny_squad):
    """More would time some batches twice; refused before anything is timed."""
    import bertqa.bench as bench

    cfg = bench.BenchConfig(model=str(minilm_dir), data=str(tiny_squad), mode="infer", seq_len=128, steps=2,
                            batch_size=16, device="cpu")  # fmt: skip
    with pytest.raises(ValueError, match=r"^--steps 3: the 20 windows make only 2 batches of 16; time at most"):
        bench.bench(dataclasses.replace(cfg, steps=3))
    cfg.batch_size = 32
    with pytest.raises(ValueError, match=r"make only 1 batch of 32"):
        bench.bench(cfg)


def test_inference_reads_its_data_as_predict_does(minilm_dir, tiny_squad, tmp_path):
    """Every question, answered or not, and no answer realigned: the windows evaluation runs. Training reads
    labelled questions alone, and skips one whose answer is not in its context."""
    import bertqa.bench as bench
    from bertqa.squad.data import SquadFormatError
    from bertqa.tokenizer import load_tokenizer

    tok = load_tokenizer(minilm_dir)
    doc = json.loads(tiny_squad.read_text())
    qas = [qa for article in doc["data"] for paragraph in article["paragraphs"] for qa in paragraph["qas"]]
    qas[0]["answers"] = [{"text": "no such words", "answer_start": 0}]
    (tmp_path / "moved.json").write_text(json.dumps(doc))
    for qa in qas:
        del qa["answers"]
    (tmp_path / "questions.json").write_text(json.dumps(doc))
    every = len(bench.data_windows(tiny_squad, tok, 128, mode="infer").lengths)
    for name in ("moved.json", "questions.json"):
        assert len(bench.data_windows(tmp_path / name, tok, 128, mode="infer").lengths) == every
    assert len(bench.data_windows(tmp_path / "moved.json", tok, 128).lengths) < every
    with pytest.raises(SquadFormatError, match="no answers and not marked is_impossible"):
        bench.data_windows(tmp_path / "questions.json", tok, 128)


def test_weights_without_a_config_beside_them_take_config(tmp_path, capsys):
    """The error for such weights says to pass --config: bench has it too, as the other commands do."""
    from bertqa import BertForQuestionAnswering
    from bertqa.cli import main

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    config.to_json(tmp_path / "tiny.json")
    torch.save(BertForQuestionAnswering(config).state_dict(), tmp_path / "bare.pt")
    argv = ["bench", "--model", str(tmp_path / "bare.pt"), "--mode", "infer", "--seq-len", "32", "--steps", "1",
            "--segments", "1", "--warmup", "0", "--device", "cpu", "--precision", "fp32"]  # fmt: skip
    assert main(argv) == 1 and "pass config= (CLI: --config)" in capsys.readouterr().err
    torch.manual_seed(3)
    state = torch.get_rng_state()
    assert main([*argv, "--config", str(tmp_path / "tiny.json")]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["rows"]["bertqa"]["windows_per_s"] > 0
    assert torch.equal(torch.get_rng_state(), state)  # (it seeds its own: the API's caller keeps theirs)


def test_data_for_weights_without_a_tokenizer_beside_them_takes_tokenizer(tmp_path, tiny_squad):
    import bertqa.bench as bench
    from bertqa import BertForQuestionAnswering

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)  # fmt: skip
    config.to_json(tmp_path / "config.json")
    torch.save(BertForQuestionAnswering(config).state_dict(), tmp_path / "bare.pt")
    cfg = bench.BenchConfig(model=str(tmp_path / "bare.pt"), data=str(tiny_squad), seq_len=96, device="cpu")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer.json or vocab.txt beside it .*; or pass --tokenizer$"):
        bench.bench(cfg)


def test_hf_rows_can_train_without_attention_dropout(tiny_dir):
    from bertqa.bench import hf_model
    from bertqa.checkpoint import load_model

    model = load_model(tiny_dir, verbose=False)
    assert model.config.attention_probs_dropout_prob > 0
    state = model.state_dict()
    assert (
        hf_model(model.config, state).config.attention_probs_dropout_prob == model.config.attention_probs_dropout_prob
    )
    assert hf_model(model.config, state, attention_dropout=False).config.attention_probs_dropout_prob == 0.0


def test_hf_rows_run_the_model_bertqa_runs_whatever_else_config_json_holds(tiny_dir, tmp_path):
    """Entries of config.json that bertqa ignores do not reach transformers' rows: with "return_dict": false their
    training step failed on a tuple, and "gradient_checkpointing" (older transformers wrote it) or
    "output_attentions" changed what HF computed, and so every ratio, without a word."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    settings = json.loads((folder / "config.json").read_text())
    extra = {"return_dict": False, "gradient_checkpointing": True, "output_attentions": True,
             "output_hidden_states": True}  # fmt: skip
    (folder / "config.json").write_text(json.dumps({**settings, **extra}))
    from bertqa.bench import hf_model
    from bertqa.checkpoint import load_model

    model = load_model(folder, verbose=False)
    assert model.config.extra["return_dict"] is False  # kept (and written back) by bertqa
    hf = hf_model(model.config, model.state_dict()).train()
    ids = torch.randint(5, model.config.vocab_size, (2, 12))
    out = hf(input_ids=ids, start_positions=torch.tensor([1, 2]), end_positions=torch.tensor([3, 4]))
    assert out.loss is not None and out.attentions is None and out.hidden_states is None
    assert not any(getattr(m, "gradient_checkpointing", False) for m in hf.modules())
    # (mutation review) Weights without the QA head would build transformers' model with a random one: refused.
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("qa_outputs")}
    with pytest.raises(RuntimeError, match=r"weights do not map onto transformers' BERT: missing \['qa_outputs"):
        hf_model(model.config, state)


def test_the_peak_memory_is_read_whatever_the_programs_name(monkeypatch):
    """(review) /proc/self/status begins with the program's name, in no set encoding (a link `bertqä` to bertqa):
    read as ASCII, bench stopped with a codec's error naming no file."""
    import io

    import bertqa.bench

    status = b"Name:\tbertq\xc3\xa4\nState:\tR (running)\nVmHWM:\t  123456 kB\nVmRSS:\t  100000 kB\n"

    def fake_open(path, mode="r", encoding=None, **kwargs):
        assert path == "/proc/self/status"
        return io.BytesIO(status) if "b" in mode else io.TextIOWrapper(io.BytesIO(status), encoding=encoding)

    monkeypatch.setattr(bertqa.bench, "open", fake_open, raising=False)
    assert bertqa.bench._peak_rss() == 123456 * 1024


def test_the_cpu_is_named_in_any_locale(tmp_path, monkeypatch):
    """(review) lscpu names its fields in the locale's language ("Modellname" in German), and writes the locale's
    encoding: the CPU went unnamed in the bench's JSON line, and under -X warn_default_encoding the text decoding
    was flagged. It runs in the C locale, decoded as UTF-8."""
    from bertqa.bench import cpu_name

    fake = tmp_path / "lscpu"
    fake.write_text('#!/bin/sh\nif [ "$LC_ALL" = C ]; then echo "Model name:  Test CPU 9000"; '
                    'else echo "Modellname:  Test CPU 9000"; fi\n', encoding="utf-8")  # fmt: skip
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("LC_ALL", "de_DE.UTF-8")
    assert cpu_name() == "Test CPU 9000"


def test_the_peak_is_the_fastest_call_not_the_mean():
    import time

    from bertqa.bench import fastest

    pauses = iter([0.08, 0.005, 0.06] * 100)
    calls = []
    best = fastest(lambda: calls.append(time.sleep(next(pauses))), seconds=0.3)
    assert len(calls) >= 3 and 0.005 <= best < 0.03  # the mean of those calls is about 0.048


def test_the_peak_matmul_shrinks_where_the_cpu_emulates_the_precision():
    """2048 x 2048 on a CPU, 8192 on a GPU; on a CPU that takes 50 ms or more at half the size (an emulated fp16 or
    bf16: 20 s or more a call at 2048), the size where it first does, so that the peaks take seconds, not minutes.
    The matmul timed is the last one probed, not built again."""
    from bertqa.bench import sized_matmul

    cpu = torch.device("cpu")

    def probes(seconds_for, log):
        return lambda n: log.append(n) or (f"matmul {n}", seconds_for(n))

    native, slow, gpu = [], [], []
    assert sized_matmul(cpu, probes(lambda n: 2e-11 * n**3, native)) == (2048, "matmul 2048")
    assert native == [256, 512, 1024, 2048]
    # 0.054 s at 512 (the reviewer's fp16: 0.11 s)
    assert sized_matmul(cpu, probes(lambda n: 4e-10 * n**3, slow)) == (512, "matmul 512") and slow == [256, 512]
    assert sized_matmul(cpu, probes(lambda n: 1.0, [])) == (256, "matmul 256")
    assert sized_matmul(torch.device("cuda"), probes(lambda n: 0.0, gpu)) == (8192, "matmul 8192") and gpu == [8192]


TINY = BertConfig(vocab_size=1100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)


@pytest.fixture
def seen(monkeypatch):
    """The row indices of every batch bench collates, in order."""
    import bertqa.bench as bench

    seen = []
    real_to_batch = bench.to_batch
    monkeypatch.setattr(
        bench, "to_batch", lambda w, idx, *a, **k: seen.append(tuple(idx)) or real_to_batch(w, idx, *a, **k)
    )
    return seen


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_every_segment_times_the_same_batches_spread_over_the_lengths(seen, mode):
    """Segments differ by noise alone: the warm-up and each segment run the same batches, and those stand for
    the set: one from the middle of each quarter of the batches sorted by length, not four drawn at random."""
    import torch

    import bertqa.bench as bench
    from bertqa.model import BertForQuestionAnswering

    windows = bench.random_windows(80, 32, TINY.vocab_size)
    windows.lengths[:] = np.random.default_rng(0).integers(8, 33, 80)  # lengths to sort and group by
    row = bench.Row(lambda: BertForQuestionAnswering(TINY), windows, mode, 4, True,
                    bench.Precision.resolve("fp32", torch.device("cpu")), torch.device("cpu"), warmup=2, steps=4,
                    flops=len)  # fmt: skip
    row.start()
    for _ in range(3):
        row.segment()
    assert len(seen) == 2 + 4 * 3 and len(row.result()["segments"]) == 3
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


def test_seconds_makes_segments_whole_passes_over_the_same_batches(monkeypatch, seen):
    import torch

    import bertqa.bench as bench
    from bertqa.model import BertForQuestionAnswering

    clock = iter(range(1000))  # each reading of the clock is a second later than the last
    monkeypatch.setattr(bench.time, "perf_counter", lambda: float(next(clock)))
    windows = bench.random_windows(40, 16, TINY.vocab_size)
    cpu = torch.device("cpu")
    row = bench.Row(lambda: BertForQuestionAnswering(TINY), windows, "infer", 4, True,
                    bench.Precision.resolve("fp32", cpu), cpu, warmup=0, steps=3, seconds=2.5,
                    flops=len)  # fmt: skip
    rate = row.start().segment()
    # The clock reads 0 at the start, then 1 and 2 after the first two passes (under 2.5 s), 3 after the third.
    assert len(seen) == 3 * 3 and seen[:3] == seen[3:6] == seen[6:]
    assert rate == pytest.approx(3 * 3 * 4 / 3)


def test_a_rows_figure_is_the_median_of_its_segments_rates(monkeypatch):
    """With two segments, the mean of their two rates (the median of the printed figures), not the rate of
    their mean time: one pass in 2 s and one in 3 s is 15 and 10 windows/s, so 12.5, not 12."""
    import torch

    import bertqa.bench as bench
    from bertqa.model import BertForQuestionAnswering

    clock = iter([0.0, 2.0, 10.0, 13.0])  # each segment reads the clock at its start and after its one pass
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    windows = bench.random_windows(40, 16, TINY.vocab_size)
    cpu = torch.device("cpu")
    row = bench.Row(lambda: BertForQuestionAnswering(TINY), windows, "infer", 5, True,
                    bench.Precision.resolve("fp32", cpu), cpu, warmup=0, steps=6,
                    flops=lambda lengths: 2.0 * len(lengths))  # fmt: skip
    row.start()
    assert [row.segment(), row.segment()] == [15.0, 10.0]  # 6 batches of 5 windows a pass
    r = row.result()
    assert r["segments"] == [15.0, 10.0] and r["windows_per_s"] == pytest.approx(12.5)
    assert r["tokens_per_s"] == pytest.approx(12.5 * 16) and r["flops_per_s"] == pytest.approx(12.5 * 2.0)


def test_padded_rows_time_batches_spread_over_the_real_lengths():
    """hf-run_qa's windows are all padded to one length, so its batches are chosen by their real tokens: the
    middle batch of each stratum of its own (unsorted) batches, not the first few in data order. Padded as
    run_qa.py pads them, they still carry the attention mask of their real tokens."""
    import torch

    import bertqa.bench as bench
    from bertqa.model import BertForQuestionAnswering

    class Seen(BertForQuestionAnswering):
        def forward(self, **batch):
            fed.append(batch)
            return super().forward(**batch)

    fed = []
    windows = bench.random_windows(80, 32, TINY.vocab_size)
    windows.lengths[:] = np.random.default_rng(0).integers(8, 32, 80)
    cpu = torch.device("cpu")
    row = bench.Row(lambda: Seen(TINY), windows, "infer", 4, False, bench.Precision.resolve("fp32", cpu), cpu,
                    warmup=0, steps=4, flops=len, pad_to=32)  # fmt: skip
    every = sorted(int(windows.lengths[i : i + 4].sum()) for i in range(0, 80, 4))  # data order, cut in 4s
    assert sorted(int(windows.lengths[b].sum()) for b in row.timed) == [every[2], every[7], every[12], every[17]]
    assert row.pass_tokens == sum(every[i] for i in (2, 7, 12, 17))
    row.start().segment()
    for idx, batch in zip(row.timed, fed, strict=True):
        assert batch["input_ids"].shape == (4, 32)
        assert batch["attention_mask"].sum(1).tolist() == windows.lengths[idx].tolist()


def test_random_windows_fit_a_small_vocabulary():
    import bertqa.bench as bench

    w = bench.random_windows(8, 16, vocab=50)
    assert w.input_ids.max() < 50 and w.input_ids.min() >= 1


@pytest.mark.parametrize("compile, device", [(False, "cpu"), (True, "cpu"), (False, "meta")])
def test_rows_take_turns_segment_by_segment(monkeypatch, capsys, compile, device):
    """The machine's drift must not land in the ratios: the rows' segments alternate, and each row's figure is
    the median of its own segments. (Rows, model and transformers are stand-ins: only the order is tested.)"""
    import types

    import bertqa.bench as bench

    monkeypatch.setattr(BertConfig, "preset", staticmethod(lambda name: TINY))
    transformers = types.ModuleType("transformers")
    transformers.__version__ = "0.0-stand-in"
    transformers.BertForQuestionAnswering = None
    monkeypatch.setitem(sys.modules, "transformers", transformers)

    calls = []

    warmups = []

    class FakeRow:
        built = 0

        def __init__(self, *args, **kw):
            self.name, FakeRow.built = FakeRow.built, FakeRow.built + 1
            self.n, self.peak_memory, self.peak_memory_mb = 0, 2**20, 1.0
            warmups.append(kw["warmup"])

        def start(self):
            calls.append(("start", self.name))
            return self

        def segment(self):
            calls.append(("segment", self.name))
            self.n += 1
            return float(self.n)

        def result(self):
            return {"windows_per_s": 2.0, "tokens_per_s": 1.0, "flops_per_s": 1.0, "segments": [1.0, 2.0, 3.0],
                    "peak_memory_mb": 1.0}  # fmt: skip

    monkeypatch.setattr(bench, "Row", FakeRow)
    peaks = iter([2.0, 4.0, 1.0, 3.0])  # before the rows, then after each round: a burst slowed the first

    def matmul_peak(device, precision, seconds=1.0):
        calls.append(("peak",))
        return next(peaks)

    monkeypatch.setattr(bench, "matmul_peak", matmul_peak)
    monkeypatch.setattr(bench, "hf_model", lambda config, state: None)
    monkeypatch.setattr(bench, "memory_in_use", lambda device: calls.append(("baseline",)) or 3 * 2**30)
    monkeypatch.setattr("bertqa.distributed.resolve_device", lambda name: torch.device(device))  # a GPU stand-in
    result = bench.bench(bench.BenchConfig(preset="base", mode="infer", seq_len=32, segments=3, compare="hf",
                                           steps=5, warmup=2, compile=compile))  # fmt: skip
    # Compiled, bertqa warms up on every timed batch, so that no graph is compiled inside a timed segment; on a
    # GPU every row does, so that no kernel for a new length is built inside one.
    # First one untimed step of each kind of model (bertqa's, transformers'), before the memory baseline.
    assert warmups[:2] == [1, 1] and calls[1:4] == [("start", 0), ("start", 1), ("baseline",)]
    calls = calls[:1] + calls[4:]
    assert warmups[2:] == ([5, 5, 5] if device != "cpu" else [5 if compile else 2, 2, 2])
    assert result["memory_baseline_mb"] == 3072.0
    assert next(peaks, None) is None and result["matmul_peak_tflops"] == 4.0 / 1e12
    assert result["versions"] == {"torch": torch.__version__, "transformers": "0.0-stand-in"}
    assert result["rows"]["bertqa"]["mfu"] == 1.0 / 4.0  # FakeRow's 1 FLOP/s against the highest peak measured
    assert [i for i, c in enumerate(calls) if c == ("peak",)] == [0, 7, 11, 15]
    calls = [c for c in calls if c != ("peak",)]  # the peak again after each round of three segments
    starts = [c for c in calls if c[0] == "start"]
    segments = [c[1] for c in calls if c[0] == "segment"]
    assert len(starts) == 3 and calls[:3] == starts  # every row is built and warmed up before any is timed
    assert segments == [s[1] for s in starts] * 3  # then one segment each, in turn, three times
    assert "segment 3/3:" in capsys.readouterr().out


def test_the_first_row_is_not_charged_what_the_process_pays_once(monkeypatch):
    """A cost paid once in a process, at its first step (lazy imports, thread pools: 13-25 MB on a CPU), here a
    64 MB buffer kept from the first step on, is the process's, not the first row's (bertqa's)."""
    import bertqa.bench as bench

    kept, real_step = [], bench.Row._step

    def step(self, idx):
        if not kept:
            kept.append(torch.ones(64 * 2**20 // 4))
        return real_step(self, idx)

    monkeypatch.setattr(bench.Row, "_step", step)
    monkeypatch.setattr(BertConfig, "preset", staticmethod(lambda name: TINY))
    monkeypatch.setattr(bench, "matmul_peak", lambda device, precision, seconds=1.0: 1e9)
    if bench.memory_in_use(torch.device("cpu")) is None:
        platform_skip("no resident memory to read (no /proc)")
    for mode in ("infer", "train"):
        result = bench.bench(bench.BenchConfig(preset="base", mode=mode, seq_len=32, steps=2, segments=1, warmup=1))
        assert kept and result["rows"]["bertqa"]["peak_memory_mb"] < 32, result
        kept.clear()


def test_inference_batches_are_predicts_with_the_last_one_short():
    """55 windows in batches of 32 are one of 32 and one of 23, as predict runs them: not a last batch topped up
    with copies of the shortest windows padded to the longest, and counted twice."""
    import bertqa.bench as bench
    from bertqa.model import BertForQuestionAnswering

    windows = bench.random_windows(55, 32, TINY.vocab_size)
    windows.lengths[:] = np.random.default_rng(0).integers(8, 33, 55)
    cpu = torch.device("cpu")
    row = bench.Row(lambda: BertForQuestionAnswering(TINY), windows, "infer", 32, True,
                    bench.Precision.resolve("fp32", cpu), cpu, warmup=0, steps=2, flops=len)  # fmt: skip
    assert sorted(len(b) for b in row.timed) == [23, 32] and row.pass_windows == 55
    assert sorted(np.concatenate(row.timed).tolist()) == list(range(55))
    assert row.start().segment() > 0
    train = bench.Row(lambda: BertForQuestionAnswering(TINY), windows, "train", 32, True,
                      bench.Precision.resolve("fp32", cpu), cpu, warmup=0, steps=2, flops=len)  # fmt: skip
    assert [len(b) for b in train.timed] == [32, 32]  # training tops the last one up, as bertqa train does


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel-peak", "sampled"])
def test_peak_memory_counts_what_was_freed_inside_not_what_was_held_before(monkeypatch, kernel):
    import time

    import torch

    import bertqa.bench as bench

    if not kernel:
        monkeypatch.setattr(bench, "_reset_peak_rss", lambda: False)
    elif not bench._reset_peak_rss():
        platform_skip("this kernel does not let a process reset its peak resident memory")
    held = torch.ones(64 * 2**20 // 4)  # held from before: not the measured code's
    with bench.PeakMemory(torch.device("cpu")) as mem:
        x = torch.ones(128 * 2**20 // 4)
        time.sleep(0.05)  # long enough for the sampler to see it
        del x
    assert 120 < mem.grown / 2**20 < 160 and held.sum() > 0


def test_peak_memory_where_it_cannot_be_read_is_unmeasured_not_an_error(monkeypatch):
    """A CPU without /proc (macOS, Windows): the row's memory is None, and the table says so."""
    import torch

    import bertqa.bench as bench
    from bertqa.model import BertForQuestionAnswering

    monkeypatch.setattr(bench, "_rss", lambda: None)
    cpu = torch.device("cpu")
    windows = bench.random_windows(16, 16, TINY.vocab_size)
    row = bench.Row(lambda: BertForQuestionAnswering(TINY), windows, "train", 4, True,
                    bench.Precision.resolve("fp32", cpu), cpu, warmup=1, steps=2,
                    flops=len)  # fmt: skip
    row.start().segment()
    r = row.result()
    assert r["peak_memory_mb"] is None and r["windows_per_s"] > 0
    r["mfu"] = 0.5
    text = bench.table({"rows": {"bertqa": r}})
    assert "| bertqa | " in text and "| unmeasured |" in text


def test_peak_memory_on_an_accelerator_is_its_allocators(monkeypatch):
    """Any device but the CPU reads the allocator's own counters (torch.accelerator's: CUDA, XPU, MPS, ...)."""
    import types

    import torch

    import bertqa.bench as bench

    state = {"now": 100, "peak": 100}
    fake = types.SimpleNamespace(
        memory_allocated=lambda d: state["now"],
        max_memory_allocated=lambda d: state["peak"],
        reset_peak_memory_stats=lambda d: state.update(peak=state["now"]),
    )
    monkeypatch.setattr(bench, "_allocator", lambda device: fake)
    state["peak"] = 10**6  # an earlier high water, which the reset on entry forgets
    with bench.PeakMemory(torch.device("meta")) as mem:
        state["peak"] = 350  # what the measured code reached
    assert mem.base == 100 and mem.grown == 250
    state["peak"] = 10**6
    with bench.PeakMemory(torch.device("meta")) as mem:  # nothing allocated inside: the reset forgot the 10**6
        pass
    assert mem.grown == 0


def test_numpy_numbers_and_paths_through_the_api_run_as_the_command_lines(tmp_path, capsys):
    """(review) A numpy batch size passed the checks, then the JSON line failed after the whole run; a numpy --seconds
    and a Path --model (the JSON's "model") alike."""
    import bertqa.bench as bench
    from bertqa import BertForQuestionAnswering

    TINY.to_json(tmp_path / "tiny.json")
    torch.save(BertForQuestionAnswering(TINY).state_dict(), tmp_path / "tiny.pt")
    model = dict(model=tmp_path / "tiny.pt", config=tmp_path / "tiny.json")
    result = bench.bench(bench.BenchConfig(**model, mode="infer", batch_size=np.int64(4), seq_len=np.int64(32),
                                           steps=np.int32(1), segments=1, warmup=np.int64(0), seconds=np.float32(0.01),
                                           precision="fp32"))  # fmt: skip
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == result
    assert result["model"] == str(tmp_path / "tiny.pt") and result["batch_size"] == 4 and type(result["seq_len"]) is int
    with pytest.raises(ValueError, match=r"^--steps must be a positive integer, got True$"):
        bench.bench(bench.BenchConfig(**model, steps=np.bool_(True)))


def test_a_warmup_given_through_the_api_is_checked_with_the_other_counts(capsys):
    """A float or None got past the check, and failed after the header, in the first row's warm-up."""
    import bertqa.bench as bench

    for warmup in (1.5, None, True):
        with pytest.raises(ValueError, match=rf"^--warmup must be an integer >= 0, got {warmup}$"):
            bench.bench(bench.BenchConfig(preset="base", warmup=warmup))
    for seconds in ("1", True):  # (a TypeError naming nothing, and 1 second)
        with pytest.raises(ValueError, match=rf"^--seconds must be a positive number, got {seconds!r}$"):
            bench.bench(bench.BenchConfig(preset="base", seconds=seconds))
    with pytest.raises(ValueError, match="^attention_dropout must be True, False or None, got 'no'$"):  # (read as on)
        bench.bench(bench.BenchConfig(preset="base", attention_dropout="no"))
    with pytest.raises(ValueError, match=r"^--batch-size 288230376151711744: must be below 2\^31$"):  # (numpy's words)
        bench.bench(bench.BenchConfig(preset="base", batch_size=2**58))
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "huge"], "--preset 'huge': choose base or large"),
        (["--preset", "base", "--batch-size", "0"], "--batch-size must be a positive integer"),
        (["--preset", "base", "--mode", "fly"], "--mode 'fly': choose train or infer"),
        (["--preset", "base", "--seq-len", "4096"], "--seq-len 4096: must be between 16 and 512"),
        (["--preset", "base", "--compare", "tf"], "--compare 'tf': only hf is supported"),
        (["--preset", "base", "--tokenizer", "."], "--tokenizer is for --data's windows (random windows need none)"),
        (["--model", "no/such/dir"], "--model no/such/dir: no such file or folder"),
        (["--preset", "base", "--data", "x.json"], "--data x.json: no such file"),
        ([], "give exactly one of --model or --preset"),
        (["--preset", "base", "--seconds", "0"], "--seconds must be a positive number, got 0.0"),
        (["--preset", "base", "--seconds", "nan"], "--seconds must be a positive number, got nan"),
        (
            ["--preset", "base", "--mode", "infer", "--attention-dropout"],
            "--attention-dropout is for --mode train: inference runs no dropout",
        ),
        (
            ["--preset", "base", "--mode", "infer", "--no-hf-attention-dropout"],
            "--no-hf-attention-dropout is for --mode train: inference runs no dropout",
        ),
        (
            ["--preset", "base", "--mode", "infer", "--hf-attention-dropout"],  # (its default, given)
            "--hf-attention-dropout is for --mode train: inference runs no dropout",
        ),
        (
            ["--preset", "base", "--config", "c.json"],
            "--config and --trust-pickle are for --model weights, not --preset",
        ),
        # Empty, --data was the current folder (random windows instead), --model a preset named None.
        (["--preset", "base", "--data", ""], "--data '': empty"),
        (["--model", ""], "--model '': empty"),
        (["--preset", "base", "--no-hf-attention-dropout"], "--no-hf-attention-dropout is for --compare hf's rows"),
    ],
)
def test_bad_arguments_are_one_line(args, message):
    r = run_cli("bench", *args)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode != 0 and len(lines) == 1 and message in lines[0], r.stderr


# --- (mutation review) what each figure is computed from ----------------------------------------------------


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_the_rows_settings_figures_and_ratios_are_each_rows_own(monkeypatch, capsys, mode):
    """hf-run_qa pads every window to --seq-len in data order, hf-best and bertqa group by length; a row's MFU
    counts the forward FLOPs (three times them in training) over the peak; ratios are bertqa's over the row's, its
    memory over theirs; a config without attention dropout trains no row with it. (Stand-in rows and transformers.)"""
    import types

    import bertqa.bench as bench

    no_dropout = dataclasses.replace(TINY, attention_probs_dropout_prob=0.0)
    monkeypatch.setattr(BertConfig, "preset", staticmethod(lambda name: no_dropout))
    transformers = types.ModuleType("transformers")
    transformers.__version__, transformers.BertForQuestionAnswering = "0.0-stand-in", None
    monkeypatch.setitem(sys.modules, "transformers", transformers)
    figures = {"bertqa": (20.0, 100.0), "hf-run_qa": (4.0, 300.0), "hf-best": (16.0, 200.0)}  # windows/s, MB
    built = []

    class FakeRow:
        def __init__(self, make, windows, mode, batch_size, grouped, warmup, flops, pad_to=None, **timing):
            self.settings = dict(grouped=grouped, pad_to=pad_to, flops=flops)
            self.name = list(figures)[len(built) - 2] if len(built) >= 2 else None  # (two untimed rows first)
            built.append(self)

        def start(self):
            self.peak_memory_mb = 0.0
            return self

        def segment(self):
            return figures[self.name][0]

        def result(self):
            rate, mb = figures[self.name]
            return {"windows_per_s": rate, "tokens_per_s": rate, "segments": [rate], "peak_memory_mb": mb,
                    "flops_per_s": self.settings["flops"](np.array([10, 20]))}  # fmt: skip

    monkeypatch.setattr(bench, "Row", FakeRow)
    monkeypatch.setattr(bench, "matmul_peak", lambda device, precision, seconds=1.0: 1e9)
    monkeypatch.setattr(bench, "hf_model", lambda config, state: None)
    result = bench.bench(bench.BenchConfig(preset="base", mode=mode, seq_len=32, segments=1, compare="hf", steps=5,
                                           precision="fp32"))  # fmt: skip
    rows = {row.name: row.settings for row in built[2:]}
    assert {name: (s["grouped"], s["pad_to"]) for name, s in rows.items()} == {
        "bertqa": (True, None), "hf-run_qa": (False, 32), "hf-best": (True, None)}  # fmt: skip
    factor = 3 if mode == "train" else 1
    assert result["rows"]["bertqa"]["mfu"] == factor * forward_flops(no_dropout, np.array([10, 20])) / 1e9
    assert result["speedup_vs_hf-best"] == 1.25 and result["memory_vs_hf-best"] == 0.5
    assert result["speedup_vs_hf-run_qa"] == 5.0 and result["memory_vs_hf-run_qa"] == pytest.approx(1 / 3)
    assert "| hf-best | 16.00 | 16 |" in capsys.readouterr().out and "| 200 | 1.25x |" in bench.table(result)
    assert result.get("attention_dropout") == ({"bertqa": False, "hf": False} if mode == "train" else None)


def test_the_matmul_peak_is_two_flops_per_multiply_add_in_the_precisions_dtype(monkeypatch):
    import contextlib
    import types

    import bertqa.bench as bench

    dtypes = []
    randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *shape, **kw: dtypes.append(kw["dtype"]) or randn(*shape, **kw))
    monkeypatch.setattr(bench, "sized_matmul", lambda device, probe: (256, probe(64)[0]))
    monkeypatch.setattr(bench, "fastest", lambda call, seconds: 0.5)
    bf16 = types.SimpleNamespace(autocast_dtype=torch.bfloat16, scope=contextlib.nullcontext)
    assert bench.matmul_peak(torch.device("cpu"), bf16) == 2 * 256**3 / 0.5
    assert dtypes == [torch.bfloat16] * 2
    fp32 = types.SimpleNamespace(autocast_dtype=None, scope=contextlib.nullcontext)
    bench.matmul_peak(torch.device("cpu"), fp32)
    assert dtypes[2:] == [torch.float32] * 2


def test_the_fastest_call_is_of_two_at_least_and_the_cpus_matmul_stops_at_2048():
    import time

    from bertqa.bench import fastest, sized_matmul

    pauses = iter([0.2, 0.001])
    assert fastest(lambda: time.sleep(next(pauses)), seconds=0) < 0.1  # the second call's
    assert sized_matmul(torch.device("cpu"), lambda n: (n, 0.0)) == (2048, 2048)  # however fast the calls


def test_a_rows_figure_is_the_median_of_three_segments_and_its_memory_what_it_kept_plus_a_segments_most(
    monkeypatch,
):
    """Rates 10, 5 and 1: 5, not their mean. Warmed up it grew 100 MB and kept 80; a segment adding 50 to what it
    kept makes its peak 130."""
    import bertqa.bench as bench
    from bertqa.model import BertForQuestionAnswering

    grown = iter([100 * 2**20, 50 * 2**20, 0, 0])

    class FakePeak:
        def __init__(self, device):
            pass

        def __enter__(self):
            self.base = 0
            return self

        def __exit__(self, *exc):
            self.grown = next(grown)

    monkeypatch.setattr(bench, "PeakMemory", FakePeak)
    monkeypatch.setattr(bench, "memory_in_use", lambda device: 80 * 2**20)
    clock = iter([0.0, 1.0, 10.0, 12.0, 20.0, 30.0])  # passes of 1, 2 and 10 s
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    windows = bench.random_windows(40, 16, TINY.vocab_size)
    cpu = torch.device("cpu")
    row = bench.Row(lambda: BertForQuestionAnswering(TINY), windows, "infer", 5, True,
                    bench.Precision.resolve("fp32", cpu), cpu, warmup=0, steps=2, flops=len)  # fmt: skip
    row.start()
    assert [row.segment() for _ in range(3)] == [10.0, 5.0, 1.0]
    r = row.result()
    assert r["windows_per_s"] == 5.0 and r["peak_memory_mb"] == 130.0


def test_batches_stand_for_the_set_by_the_length_they_are_padded_to_first():
    """32 windows of 100 tokens and 23 of 120: one step takes the longer batch (the middle of two sorted by padded
    length), though it holds fewer real tokens."""
    import bertqa.bench as bench

    windows = bench.random_windows(55, 128, TINY.vocab_size)
    windows.lengths[:] = [100] * 32 + [120] * 23
    (batch,) = bench._batches(windows, "infer", 32, True, 1)
    assert len(batch) == 23 and set(windows.lengths[batch]) == {120}


def test_the_argument_checks_edges(minilm_dir, tiny_squad, tmp_path, monkeypatch):
    import bertqa.bench as bench

    for seq_len in (16, 512):
        bench._check(bench.BenchConfig(preset="base", seq_len=seq_len))
    for cfg, message in (
        (dict(preset="base", batch_size=2**31), r"^--batch-size 2147483648: must be below 2\^31$"),
        (dict(preset="base", trust_pickle=True), "^--config and --trust-pickle are for --model weights, not --preset$"),
        (dict(preset="base", data=str(tiny_squad)), r"^--data with --preset needs --tokenizer \(vocab.txt or"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            bench._check(bench.BenchConfig(**cfg))
    # As many steps as the data has batches: taken (the bench goes on to its matmul peak).
    monkeypatch.setattr(bench, "matmul_peak", lambda *args, **kwargs: pytest.fail("checked"))
    with pytest.raises(pytest.fail.Exception, match="checked"):
        bench.bench(bench.BenchConfig(model=str(minilm_dir), data=str(tiny_squad), mode="infer", seq_len=128, steps=2,
                                      batch_size=16, device="cpu"))  # fmt: skip
    # Training data without one question it can train on is named as such.
    squad = json.loads(tiny_squad.read_text())
    for article in squad["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                qa["answers"] = [{"text": "nowhere in the context", "answer_start": 0}]
    (tmp_path / "bad.json").write_text(json.dumps(squad))
    from bertqa.tokenizer import load_tokenizer

    with pytest.raises(ValueError, match=f"^--data {tmp_path / 'bad.json'}: no usable training questions$"):
        bench.data_windows(tmp_path / "bad.json", load_tokenizer(minilm_dir), 128)
