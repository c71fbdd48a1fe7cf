"""Batched inference over SQuAD features: features -> start/end logits, sharded across ranks.

Independent of the training code, so evaluation, prediction and serving share it.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch
from tqdm import tqdm

log = logging.getLogger("bertqa")
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


def set_precision(precision: str, device: torch.device):
    """Apply `precision` and return the autocast context to run the model under.

    tf32 changes the float32 matmul precision (CUDA and CPUs that support it); bf16 / fp16 autocast the
    matmuls and keep weights, optimizer and loss in fp32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        if device.type == "cpu" and not _cpu_has_native(precision):
            # Without AVX-512 BF16/FP16 or AMX, oneDNN has no kernel and matmuls fall back to a path
            # over 100x slower than fp32 (measured on an AVX2-only EPYC: 0.9 vs 160 GFLOP/s).
            log.warning("this CPU has no native %s matmul; %s will be far slower than fp32", precision, precision)
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


def _cpu_has_native(precision: str) -> bool:
    name = "_is_mkldnn_bf16_supported" if precision == "bf16" else "_is_mkldnn_fp16_supported"
    try:  # private oneDNN probes: an older or newer torch may lack them
        return bool(getattr(torch.ops.mkldnn, name)())
    except (AttributeError, RuntimeError):
        return True  # unknown: do not warn


def to_batch(features, idx: np.ndarray, device: torch.device, with_labels: bool = False) -> dict:
    """Rows `idx` of the features as tensors, trimmed to the longest real sequence among them (dynamic
    padding: a batch of short windows costs what short windows cost)."""
    lengths = features.lengths[idx]
    T = int(lengths.max())
    batch = {
        "input_ids": torch.from_numpy(features.input_ids[idx, :T].astype(np.int64)),
        "token_type_ids": torch.from_numpy(features.token_type_ids[idx, :T].astype(np.int64)),
    }
    if (lengths < T).any():  # decided here on the host, so the model never syncs to ask
        batch["attention_mask"] = torch.from_numpy((np.arange(T) < lengths[:, None]).astype(np.int64))
    if with_labels:
        batch["start_positions"] = torch.from_numpy(features.start_positions[idx].astype(np.int64))
        batch["end_positions"] = torch.from_numpy(features.end_positions[idx].astype(np.int64))
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def predict_logits(model, features, indices, batch_size: int, device, autocast=None, progress: bool = False):
    """Start and end logits (len(indices), L) float32 of the given feature rows; positions beyond a batch's
    trimmed length hold -inf (never a candidate)."""
    model.eval()
    L = features.max_seq_length
    start = np.full((len(indices), L), -np.inf, dtype=np.float32)
    end = np.full((len(indices), L), -np.inf, dtype=np.float32)
    # Sorting by length groups similar windows, so dynamic padding wastes little; results go back in place.
    order = np.argsort(features.lengths[indices], kind="stable")
    bar = tqdm(total=len(indices), desc="evaluate", unit="seq", disable=not progress, dynamic_ncols=True)
    for i in range(0, len(order), batch_size):
        pos = order[i : i + batch_size]
        batch = to_batch(features, np.asarray(indices)[pos], device)
        with autocast or contextlib.nullcontext():
            s, e, _ = model(**batch)
        T = s.shape[1]
        start[pos, :T] = s.float().cpu().numpy()
        end[pos, :T] = e.float().cpu().numpy()
        bar.update(len(pos))
    bar.close()
    return start, end


def shard(n: int, rank: int, world_size: int) -> np.ndarray:
    """Contiguous, near-equal slices of range(n), one per rank."""
    bounds = np.linspace(0, n, world_size + 1).round().astype(int)
    return np.arange(bounds[rank], bounds[rank + 1])


def answer(model, tokenizer, question: str, context: str, device="cpu", max_seq_length: int = 384,
           doc_stride: int = 128, max_query_length: int = 64, n_best_size: int = 20,
           max_answer_length: int = 30) -> dict:  # fmt: skip
    """The best answer span to `question` in `context` (of any length: it is windowed as SQuAD is).
    Returns {"answer", "probability"} (the probability within the n-best list)."""
    from .squad.data import Example
    from .squad.features import featurize
    from .squad.postprocess import postprocess

    if not question.strip() or not context.strip():
        raise ValueError("question and context must both be non-empty")
    examples = [Example("q", question, context, [], [])]
    features = featurize(examples, tokenizer, max_seq_length, doc_stride, max_query_length)
    start, end = predict_logits(model, features, np.arange(len(features)), 8, torch.device(device))
    preds, nbest, _ = postprocess(examples, features, start, end, n_best_size, max_answer_length)
    return {"answer": preds["q"], "probability": nbest["q"][0]["probability"] if nbest["q"] else 0.0}
