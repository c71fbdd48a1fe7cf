"""The official SQuAD evaluation scripts' semantics (v1.1 `evaluate-v1.1.py`, v2.0 `evaluate-v2.0.py`),
restated independently of bertqa.squad.metrics from the rules in DESIGN.md, to check what `evaluate` reports."""

import collections
import re
import string


def normalize(s: str) -> str:
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def f1_v1(pred: str, gold: str) -> float:
    p, g = normalize(pred).split(), normalize(gold).split()
    common = sum((collections.Counter(p) & collections.Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def f1_v2(pred: str, gold: str) -> float:
    p, g = normalize(pred).split(), normalize(gold).split()
    if not p or not g:
        return float(p == g)
    return f1_v1(pred, gold)


def questions(data):
    for article in data:
        for paragraph in article["paragraphs"]:
            yield from paragraph["qas"]


def official_v1(data, preds) -> dict:
    em = f1 = 0.0
    n = 0
    for qa in questions(data):
        n += 1
        if qa["id"] not in preds:
            continue  # unanswered: scores 0, still counts
        golds = [a["text"] for a in qa["answers"]]
        em += max(float(normalize(preds[qa["id"]]) == normalize(g)) for g in golds)
        f1 += max(f1_v1(preds[qa["id"]], g) for g in golds)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n}


def official_v2(data, preds, na_probs=None, na_prob_thresh=1.0) -> dict:
    """evaluate-v2.0.py's result; with `na_probs`, its thresholding (a question whose no-answer probability is
    above `na_prob_thresh` counts as answered with no answer) and its sweep for the best threshold. Without
    `na_probs` every probability is 0, as the script makes them, and the threshold still applies."""
    probs = na_probs if na_probs is not None else {k: 0.0 for k in preds}
    rows = []  # (has_answer, exact, f1)
    raw = {}  # qid -> (has_answer, exact, f1) before any threshold, for the sweep
    for qa in questions(data):
        golds = [a["text"] for a in qa["answers"] if normalize(a["text"])] or [""]
        pred = preds[qa["id"]]
        em, f1 = max(float(normalize(pred) == normalize(g)) for g in golds), max(f1_v2(pred, g) for g in golds)
        raw[qa["id"]] = (bool(qa["answers"]), em, f1)
        if probs[qa["id"]] > na_prob_thresh:
            em = f1 = float(not qa["answers"])
        rows.append((bool(qa["answers"]), em, f1))
    out = {"exact": 100.0 * sum(r[1] for r in rows) / len(rows), "f1": 100.0 * sum(r[2] for r in rows) / len(rows),
           "total": len(rows)}  # fmt: skip
    for name, has in (("HasAns", True), ("NoAns", False)):
        part = [r for r in rows if r[0] is has]
        if part:
            out.update({f"{name}_exact": 100.0 * sum(r[1] for r in part) / len(part),
                        f"{name}_f1": 100.0 * sum(r[2] for r in part) / len(part), f"{name}_total": len(part)})  # fmt: skip
    if na_probs is not None:
        for i, name in ((1, "exact"), (2, "f1")):
            # find_best_thresh: start from predicting no answer everywhere (threshold 0), then answer the
            # questions in order of rising no-answer probability; a no-answer question answered with any
            # non-empty string (raw, not normalised) loses its point.
            score = best = sum(1 for has, *_ in raw.values() if not has)
            thresh = 0.0
            for qid in sorted(na_probs, key=lambda k: na_probs[k]):
                if qid not in raw:
                    continue
                has = raw[qid][0]
                score += raw[qid][i] if has else (-1 if preds[qid] else 0)
                if score > best:
                    best, thresh = score, na_probs[qid]
            out[f"best_{name}"], out[f"best_{name}_thresh"] = 100.0 * best / len(raw), thresh
    return out
