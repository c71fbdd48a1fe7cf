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


def official_v2(data, preds) -> dict:
    rows = []  # (has_answer, exact, f1)
    for qa in questions(data):
        golds = [a["text"] for a in qa["answers"] if normalize(a["text"])] or [""]
        pred = preds[qa["id"]]
        rows.append((bool(qa["answers"]), max(float(normalize(pred) == normalize(g)) for g in golds),
                     max(f1_v2(pred, g) for g in golds)))  # fmt: skip
    out = {"exact": 100.0 * sum(r[1] for r in rows) / len(rows), "f1": 100.0 * sum(r[2] for r in rows) / len(rows),
           "total": len(rows)}  # fmt: skip
    for name, has in (("HasAns", True), ("NoAns", False)):
        part = [r for r in rows if r[0] is has]
        if part:
            out.update({f"{name}_exact": 100.0 * sum(r[1] for r in part) / len(part),
                        f"{name}_f1": 100.0 * sum(r[2] for r in part) / len(part), f"{name}_total": len(part)})  # fmt: skip
    return out
