"""The benchmarks' and helper scripts' own checks of bad input (they run outside CI, by hand): one line naming
what is wrong and a non-zero exit, not a traceback from deep inside after minutes of work."""

import runpy
import sys
from pathlib import Path

import pytest
import torch

from bertqa.checkpoint import save_pretrained
from bertqa.config import BertConfig
from bertqa.model import BertForQuestionAnswering
from bertqa.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def run_script(path, *args, monkeypatch):
    """The script run as `python PATH ARGS` runs it, in this process: its exit status (a message: printed, 1)."""
    monkeypatch.setattr(sys, "argv", [str(path), *map(str, args)])
    monkeypatch.syspath_prepend(str(path.parent))  # (benchmarks/_common.py, as python adds a script's folder)
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(path), run_name="__main__")
    return e.value.code


def test_benchmarks_refuse_bad_input_in_one_line(minilm_dir, tmp_path, monkeypatch, capsys):
    """eval_batch makes 384-token windows: a model with fewer positions failed inside the embedding (IndexError);
    bench_features on a file with no questions failed inside transformers' tokenizer (IndexError)."""
    config = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=128)  # fmt: skip
    torch.manual_seed(0)
    model = save_pretrained(BertForQuestionAnswering(config), load_tokenizer(minilm_dir), tmp_path / "short")
    data = tmp_path / "empty.json"
    data.write_text('{"version": "1.1", "data": []}')
    for script, args, message in [
        ("eval_batch.py", ("--model", model, "--data", data, "--repeat", 1),
         f"eval_batch: error: --model {model}: the windows' length 384 exceeds the model's 128 position embeddings"),
        ("bench_features.py", ("--data", data, "--tokenizer", minilm_dir, "--repeat", 1),
         f"bench_features: error: --data {data}: no questions to featurize"),
    ]:  # fmt: skip
        assert run_script(ROOT / "benchmarks" / script, *args, monkeypatch=monkeypatch) == message


def test_soak_resume_refuses_bad_input_in_one_line(tiny_squad, minilm_dir, tmp_path, monkeypatch):
    """A --workdir that cannot be made was a traceback; a --max-seq-length too short for the windows the script
    asks for failed after a reference run, naming --doc-stride, a flag the user never gave."""
    (tmp_path / "file").write_text("mine")
    common = ("--model", minilm_dir, "--train-file", tiny_squad)
    for args, message in [
        (("--workdir", tmp_path / "file" / "w"), f"soak_resume: error: {tmp_path / 'file'}: is a file, where a folder is needed"),
        (("--workdir", tmp_path / "w", "--max-seq-length", 40), "soak_resume: --max-seq-length 40: too short for its windows"),
    ]:  # fmt: skip
        code = run_script(ROOT / "scripts" / "soak_resume.py", *common, *args, monkeypatch=monkeypatch)
        assert isinstance(code, str) and code.startswith(message) and "\n" not in code, code
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
