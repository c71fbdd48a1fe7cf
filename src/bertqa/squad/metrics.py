"""The official SQuAD v1.1 and v2.0 evaluation, reimplemented to give the same numbers.

Definitions follow the official `evaluate-v1.1.py` and `evaluate-v2.0.py` scripts: same normalisation,
same token F1, max over gold answers, same output keys in the same order. Where the official scripts
print or crash, this module logs or raises a one-line error instead; see `evaluate_v2` for the only
case where the numbers are defined here and not there (missing predictions).
"""

from __future__ import annotations

import logging
import math
import numbers
import re
import string
from collections import Counter, OrderedDict

from bertqa.squad.data import SquadFormatError, check_gold, is_squad_v2, load_json

log = logging.getLogger(__name__)

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """Lower-case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match_score(prediction: str, ground_truth: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def f1_score(prediction: str, ground_truth: str) -> float:
    """v1.1 token F1 (0 when nothing overlaps, including when either side normalises to nothing)."""
    pred = normalize_answer(prediction).split()
    gold = normalize_answer(ground_truth).split()
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def _questions(dataset: list):
    for article in dataset:
        for paragraph in article["paragraphs"]:
            yield from paragraph["qas"]


def _check_arguments(dataset, predictions: dict, na_probs: dict | None = None, na_prob_thresh: float = 1.0,
                     v2: bool = False) -> None:  # fmt: skip
    """The Python API's arguments, refused in one line where scoring would fail deep inside, or (a NaN) score
    wrongly without a word: NaN passes no comparison, so nothing abstained."""
    if not isinstance(dataset, list):
        hint = " (pass the document's ['data'])" if isinstance(dataset, dict) and "data" in dataset else ""
        raise TypeError(f"dataset must be a SQuAD file's 'data' list, not {type(dataset).__name__}{hint}")
    check_gold({"data": dataset}, "dataset", v2)  # (what is read of it: ids and answer texts)
    if not isinstance(predictions, dict):
        raise TypeError(f"predictions must be a dict of question id -> str, not {type(predictions).__name__}")
    for qid, value in predictions.items():
        if not isinstance(value, str):
            raise TypeError(f"predictions[{qid!r}] must be an answer string, not {type(value).__name__}")
    if na_probs is not None and not isinstance(na_probs, dict):
        raise TypeError(f"na_probs must be a dict of question id -> float, not {type(na_probs).__name__}")
    for qid, value in (na_probs or {}).items():
        _check_number(f"na_probs[{qid!r}]", value)
    _check_number("na_prob_thresh", na_prob_thresh)


def _check_number(name: str, value) -> None:
    """A finite number (numpy's too; not a bool), else one line naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def evaluate_v1(dataset: list, predictions: dict) -> dict:
    """`{"exact_match", "f1"}` over every question of `dataset` (the JSON's "data" list); a question
    without a prediction scores 0 and still counts (logged once), predictions for unknown ids are ignored."""
    _check_arguments(dataset, predictions)
    exact = f1 = total = 0
    missing = []
    for qa in _questions(dataset):
        total += 1
        if qa["id"] not in predictions:
            missing.append(qa["id"])
            continue
        golds = [a["text"] for a in qa["answers"]]
        pred = predictions[qa["id"]]
        exact += max(exact_match_score(pred, g) for g in golds)
        f1 += max(f1_score(pred, g) for g in golds)
    _warn_missing(missing, total)
    if not total:
        raise ValueError("no questions to score")  # (not a division by zero)
    return {"exact_match": 100.0 * exact / total, "f1": 100.0 * f1 / total}


def _warn_missing(missing: list[str], total: int) -> None:
    # The official scripts print one line per missing id; one line in all is easier to read.
    if missing:
        log.warning("%d of %d questions have no prediction and score 0 (first ids: %s)",
                    len(missing), total, ", ".join(missing[:5]))  # fmt: skip


# ---- v2.0: a no-answer is the empty string, and F1 with an empty side is 1 only when both are empty.


def _v2_tokens(s: str) -> list[str]:
    return normalize_answer(s).split() if s else []


def _v2_exact(gold: str, pred: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(pred))


def _v2_f1(gold: str, pred: str) -> float:
    gold_toks, pred_toks = _v2_tokens(gold), _v2_tokens(pred)
    if not gold_toks or not pred_toks:
        return int(gold_toks == pred_toks)
    same = sum((Counter(gold_toks) & Counter(pred_toks)).values())
    if same == 0:
        return 0
    precision, recall = same / len(pred_toks), same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def _eval_dict(exact: dict, f1: dict, qids) -> OrderedDict:
    total = len(qids)
    return OrderedDict(
        [
            ("exact", 100.0 * sum(exact[q] for q in qids) / total),
            ("f1", 100.0 * sum(f1[q] for q in qids) / total),
            ("total", total),
        ]
    )


def _best_threshold(preds: dict, scores: dict, na_probs: dict, has_ans: dict, answered: set):
    """Sweep the no-answer threshold upwards over the sorted probabilities, as the official script does:
    start from "abstain on everything" and move one question at a time to "answer"."""
    # Questions without a prediction score 0 at every threshold, so they never join the sweep.
    score = best = sum(1 for q in answered if not has_ans[q])
    best_thresh = 0.0
    for qid in sorted(na_probs, key=lambda k: na_probs[k]):
        if qid not in answered:
            continue
        if has_ans[qid]:
            score += scores[qid]
        elif preds[qid]:
            score -= 1
        if score > best:
            best, best_thresh = score, na_probs[qid]
    return 100.0 * best / len(scores), best_thresh


def evaluate_v2(dataset: list, predictions: dict, na_probs: dict | None = None, na_prob_thresh: float = 1.0):
    """The official v2.0 result: exact, f1, total, HasAns_*, NoAns_* and, given `na_probs`, best_exact,
    best_exact_thresh, best_f1, best_f1_thresh.

    A question without a prediction is logged and scores 0 everywhere
    while still counting in every total (the official script prints the same line and then fails with a
    KeyError, so for complete predictions the numbers are identical). Unknown ids are ignored.
    """
    _check_arguments(dataset, predictions, na_probs, na_prob_thresh, v2=True)
    # (numpy's numbers as Python's: the best thresholds are some of them, and the result goes to JSON)
    na_prob_thresh = float(na_prob_thresh)
    na_probs = None if na_probs is None else {qid: float(p) for qid, p in na_probs.items()}
    # A question without an "answers" list has none (the parser lets v2.0 files leave it out).
    has_ans = {qa["id"]: bool(qa.get("answers")) for qa in _questions(dataset)}
    if not has_ans:
        raise ValueError("no questions to score")  # (not a division by zero)
    sweep = na_probs is not None  # the best thresholds only mean something with real probabilities
    if na_probs is None:
        na_probs = {k: 0.0 for k in predictions}
    lacking = [q for q in has_ans if q in predictions and q not in na_probs]
    if lacking:
        raise ValueError(f"no-answer probabilities lack {len(lacking)} predicted question ids, e.g. {lacking[0]}")
    exact_raw, f1_raw, answered, missing = {}, {}, set(), []
    for qa in _questions(dataset):
        qid = qa["id"]
        golds = [a["text"] for a in qa.get("answers") or [] if normalize_answer(a["text"])] or [""]
        if qid not in predictions:
            missing.append(qid)
            exact_raw[qid] = f1_raw[qid] = 0
            continue
        answered.add(qid)
        pred = predictions[qid]
        exact_raw[qid] = max(_v2_exact(g, pred) for g in golds)
        f1_raw[qid] = max(_v2_f1(g, pred) for g in golds)
    _warn_missing(missing, len(has_ans))

    def thresholded(scores: dict) -> dict:
        # Above the threshold the system abstains: right exactly when the question has no answer.
        return {
            q: float(not has_ans[q]) if q in answered and na_probs[q] > na_prob_thresh else s for q, s in scores.items()
        }

    exact, f1 = thresholded(exact_raw), thresholded(f1_raw)
    out = _eval_dict(exact, f1, list(exact))
    for prefix, qids in (
        ("HasAns", [q for q, v in has_ans.items() if v]),
        ("NoAns", [q for q, v in has_ans.items() if not v]),
    ):
        if qids:
            for key, value in _eval_dict(exact, f1, qids).items():
                out[f"{prefix}_{key}"] = value
    if sweep:
        out["best_exact"], out["best_exact_thresh"] = _best_threshold(
            predictions, exact_raw, na_probs, has_ans, answered
        )
        out["best_f1"], out["best_f1_thresh"] = _best_threshold(predictions, f1_raw, na_probs, has_ans, answered)
    return out


def _load_mapping(path, value_type, what: str) -> dict:
    doc = load_json(path)
    if not isinstance(doc, dict):
        raise SquadFormatError(f"{path}: expected a JSON object of question id -> {what}")
    for qid, value in doc.items():
        # JSON's NaN and Infinity (Python reads them) would print as invalid JSON and sort nowhere.
        bad_number = isinstance(value, float) and not math.isfinite(value)
        if not isinstance(value, value_type) or isinstance(value, bool) or bad_number:
            raise SquadFormatError(f"{path}: question id {qid!r}: expected {what}, got {value!r:.40}")
    return doc


def score_files(data_path, predictions_path, na_prob_path=None, v2: bool = False, na_prob_thresh: float = 1.0) -> dict:
    """Score a predictions file against a SQuAD file, picking the v1.1 or v2.0 metric from the data (v2.0 with
    `v2`, whatever the file says, as running the official v2.0 script on it does). v2.0: a question whose
    no-answer probability (from `na_prob_path`, else 0) is above `na_prob_thresh` counts as unanswered.

    The result is what the official script of that version prints (as a dict, in the same key order).
    """
    _check_number("na_prob_thresh", na_prob_thresh)
    doc = load_json(data_path)
    v2 = v2 or is_squad_v2(doc)
    # In v2.0, as the official script reads it, a question with no answers is unanswerable, is_impossible or not
    # (HF's squad_v2 exports leave it out).
    check_gold(doc, data_path, v2)
    if not any(True for _ in _questions(doc["data"])):
        raise SquadFormatError(f"{data_path}: no questions to score")
    predictions = _load_mapping(predictions_path, str, "an answer string")
    if not v2:
        if na_prob_path is not None or na_prob_thresh != 1.0:
            log.warning("%s is SQuAD v1.1: no-answer probabilities and their threshold are not used", data_path)
        return evaluate_v1(doc["data"], predictions)
    na_probs = None
    if na_prob_path is not None:
        na_probs = _load_mapping(na_prob_path, (int, float), "a finite number")
        lacking = [qa["id"] for qa in _questions(doc["data"]) if qa["id"] in predictions and qa["id"] not in na_probs]
        if lacking:
            raise SquadFormatError(f"{na_prob_path}: no probability for question id {lacking[0]!r}")
    return evaluate_v2(doc["data"], predictions, na_probs, na_prob_thresh)
