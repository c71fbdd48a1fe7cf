"""Evaluation speed by batch size: every window of a SQuAD file through the evaluation path (`predict_logits`,
sorted batches, `--precision auto` unless given) at each batch size, the fastest of `--repeat` passes after one
untimed pass, and the peak memory the passes added (allocated on a GPU, resident on a CPU). With `--large`, a randomly initialised
BERT-large runs on the same windows too. What set `--eval-batch-size`'s default (inference.default_batch_size).

    python benchmarks/eval_batch.py --model DIR --data dev-a.json [--sizes 32,64,128] [--large 32,64,128]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import positive, positives, run

from bertqa.bench import PeakMemory, device_name
from bertqa.checkpoint import load_model
from bertqa.config import BertConfig, check_seq_len
from bertqa.distributed import resolve_device
from bertqa.inference import predict_logits
from bertqa.model import BertForQuestionAnswering
from bertqa.runtime import Precision, synchronize
from bertqa.squad.data import read_squad
from bertqa.squad.features import featurize
from bertqa.tokenizer import load_tokenizer


def measure(model, features, device, precision: Precision, name: str, batch_sizes: list[int], repeat: int) -> None:
    rows = np.arange(len(features))

    def one_pass() -> float:
        synchronize(device)
        t0 = time.perf_counter()
        predict_logits(model, features, rows, batch_size, device, precision.autocast())
        synchronize(device)
        return time.perf_counter() - t0

    with precision.scope():
        for batch_size in batch_sizes:
            one_pass()  # every length's kernels chosen once
            with PeakMemory(device) as mem:
                times = [one_pass() for _ in range(repeat)]
            memory = "" if mem.grown is None else f", peak +{mem.grown / 2**20:,.0f} MB"
            print(f"{name}, eval batch {batch_size:4d}: {len(rows) / min(times):9.1f} windows/s "
                  f"(passes: {', '.join(f'{t:.3f}' for t in times)} s{memory})", flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="checkpoint folder (its tokenizer beside it)")
    ap.add_argument("--data", required=True, help="SQuAD JSON")
    ap.add_argument("--sizes", type=positives, default=[32, 64, 128, 256])
    ap.add_argument("--large", type=positives, default=[], help="batch sizes for a random BERT-large too")
    ap.add_argument("--repeat", type=positive, default=3, help="timed passes (the fastest is kept)")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--device")
    args = ap.parse_args()
    device = resolve_device(args.device)
    precision = Precision.resolve(args.precision, device)
    model = load_model(args.model, device=device, verbose=False)
    tokenizer = load_tokenizer(args.model, config=model.config)
    check_seq_len(384, model.config.max_position_embeddings, f"--model {args.model}: the windows' length")
    features = featurize(read_squad(args.data, is_training=False), tokenizer, 384, 128, 64, is_training=False)
    print(
        f"{device_name(device)}: {len(features)} windows of {args.data}, precision {precision.describe()}", flush=True
    )
    measure(model, features, device, precision, args.model, args.sizes, args.repeat)
    if args.large:
        config = BertConfig.preset("large")
        config.vocab_size = model.config.vocab_size  # the windows' token ids are the tokenizer's
        del model
        large = BertForQuestionAnswering(config).to(device)
        measure(large, features, device, precision, "BERT-large (random weights)", args.large, args.repeat)


if __name__ == "__main__":
    run(main)
