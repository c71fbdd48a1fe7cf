"""The official SQuAD v1.1 / v2.0 metrics: hand-computed cases and properties."""

import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from official_squad import official_v2

from bertqa.squad import metrics
from bertqa.squad.data import SquadFormatError
from bertqa.squad.metrics import (
    evaluate_v1,
    evaluate_v2,
    exact_match_score,
    f1_score,
    normalize_answer,
    score_files,
)


def dataset(*questions):
    """A one-article, one-paragraph SQuAD "data" list from (id, [gold texts]) pairs."""
    qas = [
        {"id": qid, "question": "?", "answers": [{"text": t, "answer_start": 0} for t in golds]}
        for qid, golds in questions
    ]
    if any(not golds for _, golds in questions):  # v2.0: mark the unanswerable ones
        for qa in qas:
            qa["is_impossible"] = not qa["answers"]
    return [{"title": "t", "paragraphs": [{"context": "c", "qas": qas}]}]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The  Quick, brown fox!", "quick brown fox"),
        ("an apple a day", "apple day"),
        ("theory and anthem", "theory and anthem"),  # articles only as whole words
        ("the-end", "theend"),  # punctuation goes first, so no article is left to drop
        ("A.", ""),
        ("\t tabs\nand  newlines ", "tabs and newlines"),
        ("Café ÜBER", "café über"),  # lower-cased, accents kept
        ("‘curly’ quotes", "‘curly’ quotes"),  # only ASCII punctuation is removed
        ("rock & roll", "rock roll"),
        ("1,000.5 $", "10005"),
        ("Santa Ana", "santa ana"),  # (mutation review) an article only after a word boundary: not "sant"
        ("Ethan and Thea", "ethan and thea"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_and_f1_by_hand():
    assert exact_match_score("The Broncos", "broncos")
    assert not exact_match_score("Broncos!", "Denver Broncos")
    assert f1_score("the cat sat", "cat sat on mat") == pytest.approx(2 / 3)  # P 1, R 1/2
    assert f1_score("x x y", "x y y") == pytest.approx(2 / 3)  # multiset overlap: one x, one y
    assert f1_score("dog", "cat") == 0
    assert f1_score("", "") == 0  # v1.1: no overlap, even when both are empty
    assert f1_score("the", "a") == 0


def test_evaluate_v1_by_hand(caplog):
    data = dataset(("q1", ["Denver Broncos", "Broncos"]), ("q2", ["Santa Clara, California"]), ("q3", ["x"]))
    preds = {"q1": "the Broncos", "q2": "Santa Clara", "extra": "ignored"}  # q3 missing: scores 0
    result = evaluate_v1(data, preds)
    assert "1 of 3 questions have no prediction and score 0 (first ids: q3)" in caplog.text
    assert list(result) == ["exact_match", "f1"]
    assert result["exact_match"] == pytest.approx(100 / 3)
    assert result["f1"] == pytest.approx(100 * (1 + 0.8) / 3)  # q2: P 1, R 2/3 -> F1 0.8


def test_evaluate_v1_max_over_golds():
    data = dataset(("q", ["red car", "a blue car", "car"]))
    assert evaluate_v1(data, {"q": "the blue car"}) == {"exact_match": 100.0, "f1": 100.0}
    # "green car" vs "red car": P = R = 1/2 -> 1/2; vs "car": P 1/2, R 1 -> 2/3, the max
    assert evaluate_v1(data, {"q": "green car"})["f1"] == pytest.approx(200 / 3)


V2 = dataset(("q1", ["Paris"]), ("q2", []), ("q3", []), ("q4", ["the big dog"]))
V2_PREDS = {"q1": "Paris", "q2": "", "q3": "London", "q4": "big cat"}
V2_PROBS = {"q1": 0.1, "q2": 0.9, "q3": 0.8, "q4": 0.3}


def test_evaluate_v2_by_hand():
    out = evaluate_v2(V2, V2_PREDS)
    assert list(out) == ["exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total",
                         "NoAns_exact", "NoAns_f1", "NoAns_total"]  # fmt: skip
    expected = {"exact": 50.0, "f1": 62.5, "total": 4, "HasAns_exact": 50.0, "HasAns_f1": 75.0,
                "HasAns_total": 2, "NoAns_exact": 50.0, "NoAns_f1": 50.0, "NoAns_total": 2}  # fmt: skip
    assert out == pytest.approx(expected)


def test_evaluate_v2_best_thresholds_by_hand():
    out = evaluate_v2(V2, V2_PREDS, V2_PROBS)
    # Sweep in probability order q1 .1, q4 .3, q3 .8, q2 .9 from "abstain everywhere" (2 of 4 right):
    # exact: +1 (q1) -> 3 at .1, +0, -1 (q3 answered wrongly), 0 -> best 3/4 at .1
    # f1:    +1 -> 3 at .1, +0.5 -> 3.5 at .3, -1, 0 -> best 3.5/4 at .3
    assert out["best_exact"] == 75.0 and out["best_exact_thresh"] == 0.1
    assert out["best_f1"] == 87.5 and out["best_f1_thresh"] == 0.3
    assert list(out)[-4:] == ["best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh"]
    # Above na_prob_thresh the system abstains: q2 and q3 become right.
    out = evaluate_v2(V2, V2_PREDS, V2_PROBS, na_prob_thresh=0.5)
    assert out["exact"] == 75.0 and out["f1"] == 87.5 and out["NoAns_exact"] == 100.0


def test_evaluate_v2_quirks():
    # A gold that normalises to nothing ("the") is dropped; with none left the only gold is "".
    data = dataset(("q1", ["the"]), ("q2", ["A cat", "the"]))
    out = evaluate_v2(data, {"q1": "", "q2": "cat"})
    assert out["exact"] == 100.0 and out["HasAns_total"] == 2
    # A missing prediction scores 0 and still counts; unknown ids are ignored.
    out = evaluate_v2(V2, {"q1": "Paris", "q2": "", "q3": "", "zzz": "x"})
    assert out["total"] == 4 and out["exact"] == 75.0 and out["HasAns_exact"] == 50.0
    with pytest.raises(ValueError, match="no-answer probabilities lack 1"):
        evaluate_v2(V2, V2_PREDS, {"q1": 0.1, "q2": 0.9, "q3": 0.8})
    # (mutation review) A missing prediction scores 0 in the threshold sweep too, even an unanswerable question's.
    out = evaluate_v2(dataset(("q1", ["Paris"]), ("q2", [])), {"q1": "Paris"}, {"q1": 0.1})
    assert out["exact"] == out["best_exact"] == 50.0 and out["best_f1"] == 50.0


@settings(max_examples=200)
@given(
    st.lists(
        st.tuples(st.sampled_from([[], ["Paris"], ["the Paris", "France"], ["the"], ["The", "Paris"]]),  # golds
                  st.sampled_from(["", "Paris", "paris.", "the", ".", "France", "Lyon"]),  # the prediction
                  st.sampled_from([0.0, 0.1, 0.3, 0.3, 0.5, 0.9, 1.0])),  # no-answer probability (ties)
        min_size=1, max_size=8),
    st.sampled_from([1.0, 0.5, 0.3, 0.0]),
)  # fmt: skip
def test_evaluate_v2_matches_the_official_thresholds_and_sweep(rows, na_prob_thresh):
    """Against evaluate-v2.0.py's apply_no_ans_threshold and find_best_thresh as tests/official_squad.py restates
    them: ties in probability, predictions that normalise to nothing, a sweep where nothing improves."""
    data = dataset(*((f"q{i}", golds) for i, (golds, _, _) in enumerate(rows)))
    preds = {f"q{i}": pred for i, (_, pred, _) in enumerate(rows)}
    probs = {f"q{i}": p for i, (_, _, p) in enumerate(rows)}
    got = evaluate_v2(data, preds, probs, na_prob_thresh=na_prob_thresh)
    assert got == pytest.approx(official_v2(data, preds, probs, na_prob_thresh), abs=1e-9)


@pytest.mark.parametrize("na_prob_thresh", [1.0, 0.0, -1.0])
def test_evaluate_v2_without_probabilities_applies_the_threshold_to_zeros(na_prob_thresh):
    """evaluate-v2.0.py without --na-prob-file makes every probability 0 and still applies --na-prob-thresh: below
    0, every question abstains (the no-answer ones are right, the others wrong)."""
    got = evaluate_v2(V2, V2_PREDS, None, na_prob_thresh=na_prob_thresh)
    assert got == pytest.approx(official_v2(V2, V2_PREDS, None, na_prob_thresh), abs=1e-9)
    if na_prob_thresh < 0:
        no_answer = sum(not qa["answers"] for article in V2 for p in article["paragraphs"] for qa in p["qas"])
        assert got["exact"] == got["f1"] == 100.0 * no_answer / got["total"]


def test_no_questions_is_an_error_not_a_division_by_zero():
    for score in (evaluate_v1, lambda data, preds: evaluate_v2(data, preds)):
        with pytest.raises(ValueError, match="^no questions to score$"):
            score([{"title": "t", "paragraphs": [{"context": "c", "qas": []}]}], {})


def test_the_python_apis_bad_arguments_are_refused_in_one_line(tmp_path):
    """(review) A NaN threshold or no-answer probability scored silently wrong (NaN passes no comparison: nothing
    abstained, best thresholds NaN); a string threshold, the whole document for its "data", or a prediction that is
    no string failed deep inside."""
    data, preds, probs = dataset(("a", ["cat"]), ("b", [])), {"a": "cat", "b": "cat"}, {"a": 0.2, "b": 0.9}
    assert evaluate_v2(data, preds, probs, 0.5)["exact"] == 100.0  # (the threshold works: b abstains)
    numpy_probs = {"a": np.float32(0.2), "b": np.int64(1)}  # numpy's numbers are numbers
    out = evaluate_v2(data, {k: np.str_(v) for k, v in preds.items()}, numpy_probs, np.float32(0.5))
    assert out["exact"] == 100.0 and type(out["best_exact_thresh"]) is float and json.loads(json.dumps(out)) == out
    for args, error, message in (
        ((data, preds, probs, float("nan")), ValueError, "na_prob_thresh must be a finite number, got nan"),
        ((data, preds, probs, "0.5"), TypeError, "na_prob_thresh must be a number, not str"),
        ((data, preds, {"a": float("nan"), "b": 0.9}), ValueError, "na_probs['a'] must be a finite number, got nan"),
        ((data, preds, {"a": True, "b": 0.9}), TypeError, "na_probs['a'] must be a number, not bool"),
        ((data, {"a": None}), TypeError, "predictions['a'] must be an answer string, not NoneType"),
        (({"data": data}, preds), TypeError, "dataset must be a SQuAD file's 'data' list, not dict (pass the document"),
    ):
        with pytest.raises(error, match=re.escape(message)):
            evaluate_v2(*args)
    v1 = dataset(("a", ["cat"]))
    for args, message in ((({"data": v1}, preds), "dataset must be"), ((v1, {"a": 3}), "predictions['a'] must")):
        with pytest.raises(TypeError, match=re.escape(message)):
            evaluate_v1(*args)
    # What is read of the dataset is checked as a file's is (failed with max() of nothing, a KeyError, ...).
    for function, bad, message in ((evaluate_v1, data, "dataset: question id 'b': no answers and not marked"),
                                   (evaluate_v2, data[0]["paragraphs"], "dataset: article 0: "),
                                   (evaluate_v2, dataset(("a", ["cat"]), ("a", [])), "question id 'a': duplicate")):  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(message)):
            function(bad, preds)
    (tmp_path / "d.json").write_text(json.dumps({"version": "v2.0", "data": data}))
    (tmp_path / "p.json").write_text(json.dumps(preds))
    with pytest.raises(ValueError, match="na_prob_thresh must be a finite number, got nan"):
        score_files(tmp_path / "d.json", tmp_path / "p.json", na_prob_thresh=float("nan"))


@given(st.text())
def test_normalisation_is_idempotent(s):
    assert normalize_answer(normalize_answer(s)) == normalize_answer(s)


words = st.lists(st.sampled_from(["a", "the", "Cat", "cat,", "dog", "big", "x", "!", "Ünï"]), max_size=6)


@given(words.map(" ".join), words.map(" ".join))
def test_f1_properties(pred, gold):
    assert f1_score(pred, gold) == f1_score(gold, pred)
    assert metrics._v2_f1(gold, pred) == metrics._v2_f1(pred, gold)
    assert 0 <= f1_score(pred, gold) <= 1
    assert metrics._v2_exact(gold, pred) <= metrics._v2_f1(gold, pred)  # v2: both empty -> 1 and 1
    if normalize_answer(gold):  # v1.1 gives F1 0 (and EM 1) when both sides normalise to nothing
        assert exact_match_score(pred, gold) <= f1_score(pred, gold)


@given(st.lists(words.map(" ".join).filter(normalize_answer), min_size=1, max_size=4))
def test_gold_scores_100(golds):
    data = dataset(*[(f"q{i}", [g]) for i, g in enumerate(golds)])
    preds = {f"q{i}": g for i, g in enumerate(golds)}
    assert evaluate_v1(data, preds) == {"exact_match": 100.0, "f1": 100.0}
    out = evaluate_v2(data, preds)
    assert out["exact"] == 100.0 and out["f1"] == 100.0


def write(tmp_path, name, obj):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def test_score_files_detects_version(tmp_path):
    v1 = write(tmp_path, "v1.json", {"version": "1.1", "data": dataset(("q1", ["Paris"]), ("q2", ["x"]))})
    preds = write(tmp_path, "p1.json", {"q1": "paris"})
    assert score_files(v1, preds) == {"exact_match": 50.0, "f1": 50.0}
    v2 = write(tmp_path, "v2.json", {"version": "v2.0", "data": V2})
    out = score_files(v2, write(tmp_path, "p2.json", V2_PREDS), write(tmp_path, "na.json", V2_PROBS))
    assert out["exact"] == 50.0 and out["best_f1"] == 87.5
    assert "best_f1" not in score_files(v2, tmp_path / "p2.json")
    # The official script's --na-prob-thresh: above it a question counts as unanswered.
    strict = score_files(v2, tmp_path / "p2.json", tmp_path / "na.json", na_prob_thresh=0.5)
    assert strict == evaluate_v2(V2, V2_PREDS, V2_PROBS, na_prob_thresh=0.5) and strict["exact"] != out["exact"]


def test_a_v2_question_without_answers_is_unanswerable_with_or_without_is_impossible(tmp_path):
    """As the official v2.0 script reads it (HF's squad_v2 exports carry no is_impossible)."""
    data = dataset(("q1", ["Paris"]), ("q2", []))
    del data[0]["paragraphs"][0]["qas"][1]["is_impossible"], data[0]["paragraphs"][0]["qas"][0]["is_impossible"]
    path = write(tmp_path, "v2.json", {"version": "v2.0", "data": data})
    out = score_files(path, write(tmp_path, "p.json", {"q1": "Paris", "q2": ""}))
    assert out["exact"] == 100.0 and out["HasAns_total"] == 1 and out["NoAns_total"] == 1
    v1 = write(tmp_path, "v1.json", {"version": "1.1", "data": data})  # v1.1 has no unanswerable questions
    with pytest.raises(SquadFormatError, match="question id 'q2': no answers and not marked is_impossible"):
        score_files(v1, tmp_path / "p.json")
    assert score_files(v1, tmp_path / "p.json", v2=True) == out  # --version-2-with-negative: the v2.0 script's
    del data[0]["paragraphs"][0]["qas"][1]["answers"]  # no "answers" list at all: as unanswerable as an empty one
    path = write(tmp_path, "v2.json", {"version": "v2.0", "data": data})
    assert score_files(path, tmp_path / "p.json") == out


def test_score_reads_only_what_the_official_scripts_read(tmp_path):
    """Ids and answer texts: answers without answer_start, a blank context, a question without text, "answers":
    null in v2.0 (unanswerable; it was a TypeError) are all scored as the official scripts score them."""
    data = dataset(("q1", ["Paris"]), ("q2", []))
    qas = data[0]["paragraphs"][0]["qas"]
    for qa in qas:
        del qa["is_impossible"], qa["question"]
    del qas[0]["answers"][0]["answer_start"]
    qas[1]["answers"] = None
    data[0]["paragraphs"][0]["context"] = " "
    preds = write(tmp_path, "p.json", {"q1": "the Paris", "q2": ""})
    out = score_files(write(tmp_path, "v2.json", {"version": "v2.0", "data": data}), preds)
    assert out["exact"] == 100.0 and out["HasAns_total"] == 1 and out["NoAns_total"] == 1
    assert evaluate_v2(data, {"q1": "Paris", "q2": "x"})["NoAns_exact"] == 0.0
    v1 = write(tmp_path, "v1.json", {"version": "1.1", "data": data})
    with pytest.raises(SquadFormatError, match=r"v1\.json: question id 'q2': 'answers' is missing or null$"):
        score_files(v1, preds)
    qas[1]["answers"] = [{"text": 5}]
    with pytest.raises(SquadFormatError, match=r"question id 'q2': 'answers\[0\]\.text' must be a JSON string"):
        score_files(write(tmp_path, "v2.json", {"version": "v2.0", "data": data}), preds)
    qas[1]["id"] = "q1"
    with pytest.raises(SquadFormatError, match=r"question id 'q1': duplicate question id$"):
        score_files(write(tmp_path, "v2.json", {"version": "v2.0", "data": data}), preds)


@pytest.mark.parametrize(
    "which, content, message",
    [
        ("data", "{not json", "not valid JSON"),
        ("data", {"data": [{"paragraphs": [{"context": "c", "qas": [{"id": 1}]}]}]}, "'id' must be a JSON string"),
        ("data", {"data": []}, "no questions"),
        ("preds", ["Paris"], "expected a JSON object"),
        ("preds", {"q1": 3}, "question id 'q1': expected an answer string"),
        ("na", {"q1": "high"}, "expected a finite number"),
        ("na", {"q1": float("nan")}, "question id 'q1': expected a finite number, got nan"),
        ("na", {"q1": float("-inf")}, "question id 'q1': expected a finite number, got -inf"),
        # Not SQuAD's shape at all: named in one line, not an internal error while telling v1.1 from v2.0.
        ("data", [], "not a SQuAD file"),
        ("data", {"data": 5}, "not a SQuAD file"),
        ("data", {"data": {"a": 1}}, "not a SQuAD file"),
        ("data", {"data": ["x"]}, "article 0: 'data[]' must be a JSON object"),
        ("data", {"data": [{"paragraphs": ["x"]}]}, "paragraph 0: 'paragraphs[]' must be a JSON object"),
        ("data", {"data": [{"paragraphs": [{"context": "c", "qas": ["x"]}]}]}, "must be a JSON object"),
        ("data", {"data": [{"id": "q1", "context": "c", "question": "q?"}]}, "article 0: a question record ('context'"),
        ("data", [{"id": "q1", "context": "c", "question": "q?"}], "a list of question records ('context'"),
        ("data", {"id": "q1", "context": "c", "question": "q?"}, ": a question record ('context'"),
        ("na", {"q9": 0.5}, "no probability for question id 'q1'"),
    ],
)
def test_score_files_errors_are_one_line_and_name_the_file(tmp_path, which, content, message):
    files = {
        "data": write(tmp_path, "data.json", {"version": "v2.0", "data": V2}),
        "preds": write(tmp_path, "preds.json", V2_PREDS),
        "na": write(tmp_path, "na.json", V2_PROBS),
    }
    files[which] = write(tmp_path, f"bad-{which}.json", content)
    with pytest.raises(SquadFormatError) as err:
        score_files(files["data"], files["preds"], files["na"])
    text = str(err.value)
    assert message in text and str(files[which]) in text and "\n" not in text
