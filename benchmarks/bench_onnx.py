"""ONNX Runtime against PyTorch on the CPU: file size, windows/s and EM/F1 of one fine-tuned QA model as PyTorch
fp32, ONNX fp32 and ONNX int8 (dynamic quantisation), on the same windows, with the same threads, in one run.

    python benchmarks/bench_onnx.py --model runs/onnx-ft/model [--data dev-a.json] [--limit N] [--threads 2]

Both graphs are exported by `bertqa.export.export_onnx` into a temporary folder (checked against PyTorch on
the data's first windows). Every engine then runs every window in batches of `--batch-size` windows sorted
by length and trimmed to their longest (as `bertqa evaluate` batches), after a warm-up on the shortest and
longest batch that is not timed. The batches are dealt into rounds and the engines take turns round by
round, so a slow moment of a shared machine falls on all of them alike. Logits -> n-best -> official
v1.1 EM/F1. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from _common import cpu_threads, positive, run

from bertqa.checkpoint import load_model
from bertqa.export import OnnxRunner, export_onnx
from bertqa.inference import predict_logits
from bertqa.squad.data import load_json, read_squad
from bertqa.squad.features import check_window_params, featurize
from bertqa.squad.metrics import evaluate_v1
from bertqa.squad.postprocess import postprocess
from bertqa.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "squad-v1.1" / "dev-a.json"
ROUNDS = 5


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def int8_flags() -> list[str]:
    """The CPU's int8 dot-product extensions: without VNNI, onnxruntime's u8s8 kernels are much slower."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return sorted(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def subset(dataset: list, qids: set) -> list:
    """The SQuAD "data" list cut to the questions `qids`, so --limit does not count the rest as wrong."""
    out = []
    for article in dataset:
        paragraphs = [{**p, "qas": [qa for qa in p["qas"] if qa["id"] in qids]} for p in article["paragraphs"]]
        paragraphs = [p for p in paragraphs if p["qas"]]
        if paragraphs:
            out.append({**article, "paragraphs": paragraphs})
    return out


def drift(logits, reference, real) -> dict:
    """How far logits are from the reference's over real positions, and how often the start they pick is
    the same."""
    diff = max(float(np.abs(a[real] - b[real]).max()) for a, b in zip(logits, reference))
    pick = [np.where(real, x, -np.inf).argmax(1) for x in (logits[0], reference[0])]
    return {"max_abs_diff": diff, "start_argmax_agreement": float(np.mean(pick[0] == pick[1]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a fine-tuned QA checkpoint (HF folder)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--limit", type=positive, help="first N questions only")
    parser.add_argument("--threads", type=cpu_threads, default=torch.get_num_threads(),
                        help="intra-op threads for every engine (default: torch's, one per CPU this process may use, "
                             "or OMP_NUM_THREADS)")  # fmt: skip
    parser.add_argument("--batch-size", type=positive, default=32)
    parser.add_argument("--max-seq-length", type=positive, default=384, help="the windows (as `bertqa evaluate`'s)")
    parser.add_argument("--doc-stride", type=positive, default=128)
    parser.add_argument("--max-query-length", type=positive, default=64)
    args = parser.parse_args()
    windows = {"max_seq_length": args.max_seq_length, "doc_stride": args.doc_stride,
               "max_query_length": args.max_query_length}  # fmt: skip
    check_window_params(**windows, flags=True)

    torch.set_num_threads(args.threads)
    machine = {
        "cpu": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "int8_extensions": int8_flags(),
        "threads": args.threads,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    print(f"bertqa: {machine['cpu']}, torch CPU capability {machine['cpu_capability']}, int8 extensions "
          f"{', '.join(machine['int8_extensions']) or 'none'}; {args.threads} threads; torch {torch.__version__}, "
          f"onnxruntime {onnxruntime.__version__}")  # fmt: skip

    examples = read_squad(args.data, is_training=False)[: args.limit]
    dataset = subset(load_json(args.data)["data"], {ex.qid for ex in examples})
    features = featurize(examples, load_tokenizer(args.model), **windows)
    print(f"bertqa: {len(examples)} questions -> {len(features)} windows of up to {features.max_seq_length} tokens")

    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        graphs = {}
        for name, int8 in (("onnx fp32", False), ("onnx int8", True)):
            path = Path(tmp) / f"{name.split()[1]}.onnx"
            report = export_onnx(args.model, path, int8=int8, check_file=args.data, verbose=False, **windows)
            print(f"bertqa: exported {name} in {report['export_seconds']} s; on the data's first {report['windows']} "
                  f"windows its logits are within {report['max_abs_diff']:.1e} of PyTorch's")  # fmt: skip
            graphs[name] = path
        model = load_model(args.model, verbose=False).float().eval()
        weights = Path(args.model) / "model.safetensors"  # the file PyTorch loads, else what its weights take
        size = weights.stat().st_size if weights.is_file() else sum(p.nbytes for p in model.state_dict().values())
        sizes = {"pytorch fp32": size}
        sizes.update({name: path.stat().st_size for name, path in graphs.items()})
        runners = {name: OnnxRunner(path, threads=args.threads) for name, path in graphs.items()}

        # Each engine maps window indices to (start, end) logits laid out as predict_logits lays them out.
        engines = {"pytorch fp32": lambda idx: predict_logits(model, features, idx, len(idx), torch.device("cpu"))}
        for name, runner in runners.items():
            engines[name] = lambda idx, runner=runner: runner.predict_logits(features, idx, len(idx))
        order = np.argsort(features.lengths, kind="stable")
        batches = [order[i : i + args.batch_size] for i in range(0, len(order), args.batch_size)]
        for run in engines.values():  # warm-up: allocators, thread pools, the shortest and longest shapes
            run(batches[0]), run(batches[-1])

        L = features.max_seq_length
        logits = {name: (np.empty((len(features), L), np.float32), np.empty((len(features), L), np.float32))
                  for name in engines}  # fmt: skip
        seconds = dict.fromkeys(engines, 0.0)
        names = list(engines)
        for r in range(ROUNDS):
            for name in names[r % len(names) :] + names[: r % len(names)]:  # who goes first rotates
                t0 = time.perf_counter()
                for idx in batches[r::ROUNDS]:
                    s, e = engines[name](idx)
                    logits[name][0][idx], logits[name][1][idx] = s, e
                seconds[name] += time.perf_counter() - t0

    real = features.attention_mask()
    rows = {}
    for name, (start, end) in logits.items():
        predictions, _, _ = postprocess(examples, features, start, end)
        scores = evaluate_v1(dataset, predictions)
        rows[name] = {
            "size_mb": round(sizes[name] / 1e6, 1),
            "windows_per_s": round(len(features) / seconds[name], 2),
            "exact_match": round(scores["exact_match"], 2),
            "f1": round(scores["f1"], 2),
            **drift((start, end), logits["pytorch fp32"], real),
        }

    base, fp32 = rows["pytorch fp32"], rows["onnx fp32"]
    print("\n| engine | size MB | windows/s | x PyTorch | x ONNX fp32 | EM | F1 | F1 - PyTorch | max abs diff "
          "vs PyTorch | start argmax = PyTorch |")  # fmt: skip
    print("| --- " * 10 + "|")
    for name, row in rows.items():
        speed = row["windows_per_s"]
        print(f"| {name} | {row['size_mb']} | {speed} | {speed / base['windows_per_s']:.2f} | "
              f"{speed / fp32['windows_per_s']:.2f} | {row['exact_match']:.2f} | {row['f1']:.2f} | "
              f"{row['f1'] - base['f1']:+.2f} | {row['max_abs_diff']:.1e} | {row['start_argmax_agreement']:.1%} |")  # fmt: skip
    print()
    summary = {"machine": machine, "data": str(args.data), "questions": len(examples), "windows": len(features),
               "batch_size": args.batch_size, "results": rows}  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    run(main)
