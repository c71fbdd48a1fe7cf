"""Batched inference over SQuAD windows: features -> start/end logits, sorted by length, sharded over ranks.

Evaluation, prediction, the Python API and the server all run the model through here; none of them imports
the training code.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from tqdm import tqdm

from .batching import to_batch
from .files import NoBar, bar_options
from .squad.features import check_positive


class NonFiniteLogits(ValueError):
    """The model returned NaN or infinite logits: a fault of its weights or of the precision, not of the
    input (the server answers it with a 500, the commands with one line)."""


class Abandoned(RuntimeError):
    """Nobody waits for these logits any more (every server request they were for has timed out)."""


def batched_logits(features, indices, batch_size: int, run, progress: bool = False, should_stop=None):
    """Start and end logits (len(indices), L) float32 of the given feature rows, `run(rows)` giving a batch's
    (start, end) float32 arrays trimmed to its longest window; positions beyond that hold -inf (never a
    candidate). Batches are sorted by length, so dynamic padding wastes little; results go back in place. NaN or
    infinite logits raise NonFiniteLogits, where every answer would silently be "" (evaluation) or have a NaN
    score (the API). The PyTorch model (predict_logits) and an ONNX graph (export.OnnxRunner) run through here.
    `should_stop()`, asked before each batch, abandons the work when True (raises Abandoned)."""
    check_positive(batch_size=batch_size)  # (0 raised inside range(), a negative one gave every logit -inf)
    L = features.max_seq_length
    indices = np.asarray(indices)
    if not len(indices):  # ([] is an array of floats, which cannot index)
        indices = indices.astype(np.intp)
    start = np.full((len(indices), L), -np.inf, dtype=np.float32)
    end = np.full((len(indices), L), -np.inf, dtype=np.float32)
    order = np.argsort(features.lengths[indices], kind="stable")
    # A context manager: the bar is closed on an error too, not printed after the error line.
    bar = tqdm(total=len(indices), desc="evaluate", unit="seq", dynamic_ncols=True, **bar_options()) if progress \
        else NoBar()  # fmt: skip
    with bar:
        for i in range(0, len(order), batch_size):
            if should_stop is not None and should_stop():
                raise Abandoned(f"abandoned after {i} of {len(order)} windows: nobody waits for them")
            pos = order[i : i + batch_size]
            s, e = run(indices[pos])
            finite = np.isfinite(s).all(axis=1) & np.isfinite(e).all(axis=1)
            if not finite.all():
                raise NonFiniteLogits(
                    f"the model's logits are NaN or infinite for window {indices[pos[np.argmin(finite)]]}: its "
                    "weights hold NaN or infinite values, or the precision overflowed (fp16's narrow range is the "
                    "usual cause: try bf16 or fp32)"
                )
            start[pos, : s.shape[1]] = s
            end[pos, : e.shape[1]] = e
            bar.update(len(pos))
    return start, end


@torch.inference_mode()
def predict_logits(model, features, indices, batch_size: int, device, autocast=None, progress: bool = False,
                   should_stop=None):  # fmt: skip
    """batched_logits of the PyTorch `model`. Runs in inference mode, which skips no_grad's version counters
    and view tracking: 1% faster on the CPU bench batches, the same logits."""
    if model.training:  # (not on every call: eval() drops the fused layers' packed weights, see model.Linear)
        model.eval()

    def run(rows):
        with autocast or contextlib.nullcontext():
            s, e, _ = model(**to_batch(features, rows, device))
        return s.float().cpu().numpy(), e.float().cpu().numpy()

    return batched_logits(features, indices, batch_size, run, progress, should_stop)


def default_batch_size(device) -> int:
    """Windows per forward pass when none is given: 128 on CUDA GPUs, where small batches leave them idle
    (benchmarks/eval_batch.py, README), else 32: on CPUs larger batches ran slower (64: 0.97x, 128: 0.86x on the
    bench's CPU), and other accelerators are unmeasured."""
    return 128 if torch.device(device).type == "cuda" else 32


def shard(n: int, rank: int, world_size: int) -> np.ndarray:
    """Contiguous, near-equal slices of range(n), one per rank."""
    bounds = np.linspace(0, n, world_size + 1).round().astype(int)
    return np.arange(bounds[rank], bounds[rank + 1])
