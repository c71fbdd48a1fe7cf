"""Batches of SQuAD windows: the collate (rows -> padded tensors) and the training epoch's batch order."""

from __future__ import annotations

import math

import numpy as np
import torch

GROUP_CHUNK = 64  # batches sorted together by --group-by-length


def to_batch(features, idx: np.ndarray, device: torch.device, with_labels: bool = False,
             pad_to: int | None = None) -> dict:  # fmt: skip
    """Rows `idx` of the features as tensors, trimmed to the longest real sequence among them (dynamic
    padding: a batch of short windows costs what short windows cost), or padded to `pad_to` tokens."""
    lengths = features.lengths[idx]
    T = int(lengths.max()) if pad_to is None else pad_to
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


def epoch_batches(n: int, global_batch: int, seed: int, epoch: int, lengths=None) -> np.ndarray:
    """(steps, global_batch) feature indices of one epoch: a seeded shuffle, the last batch topped up from
    the start of the shuffle so every rank always gets a full batch (as DistributedSampler pads).

    With `lengths`, windows of similar length are batched together: the shuffle is cut into chunks of
    GROUP_CHUNK batches, each chunk sorted by length, and the order of the batches shuffled again. On
    SQuAD (mean window 162 of 384 tokens) this halves the padded tokens a random batch carries."""
    rng = np.random.default_rng([seed, epoch])
    steps = math.ceil(n / global_batch)
    idx = np.resize(rng.permutation(n), steps * global_batch)
    if lengths is None:
        return idx.reshape(steps, global_batch)
    chunk = global_batch * GROUP_CHUNK
    for i in range(0, len(idx), chunk):
        part = idx[i : i + chunk]
        idx[i : i + chunk] = part[np.argsort(lengths[part], kind="stable")]
    return idx.reshape(steps, global_batch)[rng.permutation(steps)]
