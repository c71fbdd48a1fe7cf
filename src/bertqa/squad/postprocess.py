"""Start/end logits of every window -> the n-best answer spans of every example -> predictions.

Per example, over all its windows: the top `n_best_size` start and end positions, spans that lie in the
context, start at a max-context token, end at or after the start and are at most `max_answer_length`
tokens long; score = start logit + end logit; the text is cut from the original context by character
offsets; probabilities are a softmax over the n-best. SQuAD v2.0 adds the null answer, scored as the
lowest [CLS] start + end over the example's windows, which wins when it beats the best span by more than
`null_score_diff_threshold`.

One difference from Google's/NVIDIA's code, on purpose: positions that can never start (or end) an answer
are masked before the top-n is taken, not filtered after, so a window always offers n real candidates.
The best span is the same whenever it is within their top n; the n-best list can only be longer.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from bertqa.files import write_json_files
from bertqa.squad.data import Example, check_bool
from bertqa.squad.features import Features, check_finite, check_positive, examples_digest

# Start-end pairs scored at once (each costs about 20 bytes of temporary arrays, up to 50 where max_answer_length
# lets most pairs be valid): a deep search (the server's 2,048 windows of 384 tokens; --n-best-size 384 over
# SQuAD dev's 10,833 windows, 1.6 billion pairs) stays within 40-100 MB (measured: 104 MB for the server's at
# max_answer_len 384) instead of taking several or tens of GB.
PAIR_BUDGET = 1 << 21

# The null odds of a question with no valid span in any window: the null answer wins at any threshold. Finite,
# because JSON has no infinity (json.dumps would write `Infinity`, which JSON readers refuse).
NO_SPAN_ODDS = 1e30


def _softmax(scores: list[float]) -> list[float]:
    # At most n_best + 1 values: plain Python beats numpy's per-call overhead here.
    top = max(scores)
    exps = [math.exp(x - top) for x in scores]
    total = sum(exps)
    return [x / total for x in exps]


def _ranked(columns: list[np.ndarray], lo: int, hi: int, chunk: int):
    """Rows lo..hi of some candidate columns as Python tuples, converted a chunk at a time: an example
    usually needs only its first n-best candidates, not the hundreds it may have."""
    for a in range(lo, hi, chunk):
        yield from zip(*(c[a : min(a + chunk, hi)].tolist() for c in columns), strict=True)


def span_candidates(features: Features, start, end, n_best_size: int, max_answer_length: int):
    """Every valid (window, start, end) pair built from each window's top-n starts and ends, as flat
    arrays sorted by example, then score (highest first)."""
    width = start.shape[1]
    in_context = features.offsets[:, :width, 0] >= 0  # (N, W)
    start = np.where(in_context & features.max_context[:, :width], start, -np.inf)
    end = np.where(in_context, end, -np.inf)
    n = min(n_best_size, width)
    # Best first, equal logits by position (Google's stable _get_best_indexes): which of them make the top n,
    # and the order of equal scores below, are Google's.
    top_s = np.argsort(-start, axis=1, kind="stable")[:, :n]  # (N, n)
    top_e = np.argsort(-end, axis=1, kind="stable")[:, :n]
    s_logit = np.take_along_axis(start, top_s, axis=1)
    e_logit = np.take_along_axis(end, top_e, axis=1)
    score = s_logit[:, :, None] + e_logit[:, None, :]  # (N, n, n): every start with every end
    span = top_e[:, None, :] - top_s[:, :, None] + 1
    rows, i, j = np.nonzero(np.isfinite(score) & (span >= 1) & (span <= max_answer_length))
    cand = {
        "row": rows,
        "start": top_s[rows, i],
        "end": top_e[rows, j],
        "start_logit": s_logit[rows, i],
        "end_logit": e_logit[rows, j],
        "score": score[rows, i, j],
        "example": features.example_index[rows],
    }
    cand["char_start"] = features.offsets[rows, cand["start"], 0]
    cand["char_end"] = features.offsets[rows, cand["end"], 1]
    # Two stable sorts (faster than a lexsort over five keys); equal scores keep np.nonzero's order, Google's
    # (window, then the start's rank, then the end's).
    order = np.argsort(-cand["score"], kind="stable")
    order = order[np.argsort(cand["example"][order], kind="stable")]
    return {k: v[order] for k, v in cand.items()}


def best_spans(contexts, features: Features, start, end, rows, n: int, k: int, max_answer_length: int,
               align=None) -> dict[int, list[tuple]]:  # fmt: skip
    """{example: its best `k` distinct spans (score, char start, char end, start logit, end logit), best first}
    among the pairs of the top-n starts and ends of each of the windows `rows` (grouped by example), scoring at
    most PAIR_BUDGET pairs at a time. `align(context, char_start, char_end)`, if given, moves a span's ends (to
    whole words, say) before its text is compared. An answer in the top k over all windows is in the top k of the
    group of windows it comes from, so the groups' top k, merged, hold it; equal scores keep window order.
    Examples without any valid span are left out."""
    found, split = {}, set()
    step = max(1, PAIR_BUDGET // min(n, start.shape[1]) ** 2)
    for a in range(0, len(rows), step):
        group = rows[a : a + step]
        cand = span_candidates(features.select(group), start[group], end[group], n, max_answer_length)
        ids, first = np.unique(cand["example"], return_index=True)  # sorted by example: where each one starts
        bounds = [*first.tolist(), len(cand["example"])]
        columns = [cand[c] for c in ("score", "char_start", "char_end", "start_logit", "end_logit")]
        for e, lo, hi in zip(ids.tolist(), bounds, bounds[1:]):
            if e in found:
                split.add(e)
            found.setdefault(e, []).extend(_distinct(contexts[e], _ranked(columns, lo, hi, 2 * k), k, align))
    for e in split:  # (a stable sort: equal scores keep window order)
        found[e] = _distinct(contexts[e], sorted(found[e], key=lambda span: -span[0]), k)
    return found


def _distinct(context: str, spans, k: int, align=None) -> list[tuple]:
    """The first `k` spans (score, char start, char end, ...) of distinct text: the same text at two places (a
    repeated phrase) is one answer, with the better score."""
    out, seen = [], set()
    for span in spans:
        if len(out) == k:
            break
        if align is not None:
            span = (span[0], *align(context, span[1], span[2]), *span[3:])
        text = context[span[1] : span[2]]
        if text not in seen:
            seen.add(text)
            out.append(span)
    return out


def postprocess(
    examples: list[Example],
    features: Features,
    start_logits,
    end_logits,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    version_2: bool = False,
    null_score_diff_threshold: float = 0.0,
):
    """Returns (predictions qid -> text, nbest qid -> [{text, probability, start_logit, end_logit}],
    null_odds qid -> null score - best span score, or None unless `version_2`).

    `start_logits`/`end_logits` are (N, L') for the N windows of `features`, L' <= L: batches padded to
    their longest window may be narrower than max_seq_length; columns beyond L' are treated as padding.
    An example with no valid span predicts "" (Google's code writes the word "empty").
    """
    start = np.asarray(start_logits, dtype=np.float64)
    end = np.asarray(end_logits, dtype=np.float64)
    N, L = len(features), features.max_seq_length
    if start.shape != end.shape or start.ndim != 2 or start.shape[0] != N or not 1 <= start.shape[1] <= L:
        raise ValueError(
            f"logits must both be (N={N}, L'<={L}) for the features' windows, got start {start.shape} "
            f"and end {end.shape}"
        )
    check_positive(n_best_size=n_best_size, max_answer_length=max_answer_length)  # (nan passed `< 1`: answers "")
    check_finite(null_score_diff_threshold=null_score_diff_threshold)  # (a string: a TypeError deep inside)
    check_bool(version_2=version_2)
    if any(np.isnan(a).any() or np.isposinf(a).any() for a in (start, end)):  # (NaN ranks nowhere: every answer "")
        raise ValueError("start_logits and end_logits hold NaN or +infinity (-infinity marks a position never taken)")
    counts = np.bincount(features.example_index, minlength=len(examples))
    made_from = features.params.get("examples")  # (None: windows built by hand)
    if len(counts) > len(examples) or not counts.all() or made_from not in (None, examples_digest(examples)):
        raise ValueError(
            f"features do not match the {len(examples)} examples (pass the very list they were built from, in its "
            "order)"
        )
    seen: set[str] = set()
    for ex in examples:  # (the answers are keyed by id: one would overwrite another)
        if ex.qid in seen:
            raise ValueError(f"question id {ex.qid!r}: duplicate question id (the answers are keyed by id)")
        seen.add(ex.qid)

    rows = np.argsort(features.example_index, kind="stable")
    found = best_spans([ex.context for ex in examples], features, start, end, rows, n_best_size, n_best_size,
                       max_answer_length)  # fmt: skip

    if version_2:
        # Null score: [CLS] start + end, the lowest over the example's windows (Google's choice: the
        # window least sure that there is an answer is the most sure that there is none).
        null = start[:, 0] + end[:, 0]
        by_null = np.lexsort((null, features.example_index))
        null_row = by_null[np.searchsorted(features.example_index[by_null], np.arange(len(examples)))]

    predictions, nbest, null_odds = {}, {}, {} if version_2 else None
    for e, ex in enumerate(examples):
        entries = [
            {"text": ex.context[cs:ce], "start_logit": s, "end_logit": t} for _, cs, ce, s, t in found.get(e, [])
        ]
        best = entries[0] if entries else None
        if version_2:
            row = null_row[e]
            null_entry = {"text": "", "start_logit": float(start[row, 0]), "end_logit": float(end[row, 0])}
            null_score = null_entry["start_logit"] + null_entry["end_logit"]
            # The null answer takes its place in the ranking; it stays even when it ranks below the n-best.
            at = sum(1 for x in entries if x["start_logit"] + x["end_logit"] >= null_score)
            entries.insert(at, null_entry)
            if len(entries) > n_best_size and at < n_best_size:
                entries.pop()
            odds = null_score - (best["start_logit"] + best["end_logit"]) if best else NO_SPAN_ODDS
            null_odds[ex.qid] = odds
            predictions[ex.qid] = "" if best is None or odds > null_score_diff_threshold else best["text"]
        else:
            predictions[ex.qid] = best["text"] if best else ""
        if not entries:
            entries = [{"text": "", "start_logit": 0.0, "end_logit": 0.0}]
        probs = _softmax([x["start_logit"] + x["end_logit"] for x in entries])
        nbest[ex.qid] = [{"text": x["text"], "probability": p, "start_logit": x["start_logit"],
                          "end_logit": x["end_logit"]} for x, p in zip(entries, probs, strict=True)]  # fmt: skip
    return predictions, nbest, null_odds


PREDICTION_FILES = ("predictions.json", "nbest_predictions.json", "null_odds.json")


def write_predictions(output_dir, predictions: dict, nbest: dict, null_odds: dict | None = None,
                      remove=()) -> list[Path]:  # fmt: skip
    """Write PREDICTION_FILES into `output_dir` (see write_prediction_files), made if need be (and removed again
    when the write fails)."""
    out = Path(output_dir)
    return write_prediction_files([out / name for name in PREDICTION_FILES], predictions, nbest, null_odds, remove)


def write_prediction_files(paths, predictions: dict, nbest: dict, null_odds: dict | None = None,
                           remove=()) -> list[Path]:  # fmt: skip
    """Write the predictions, n-best and (v2.0 only) null odds into `paths` as one set
    (bertqa.files.write_json_files): a failure while writing leaves an earlier set whole, and the predictions land
    last. A v1.1 set removes the null odds an earlier v2.0 set left at paths[2], which would not belong to it;
    the paths in `remove` (files of the earlier set's run) go at the same moment, once the new set is written."""
    files = dict(zip(paths, (predictions, nbest, null_odds)))
    stale = [remove] if isinstance(remove, str | os.PathLike) else list(remove)  # (a str: not a list of letters)
    if null_odds is None:
        del files[paths[2]]
        stale.append(paths[2])
    write_json_files(files, remove=stale)
    return list(files)
