"""Logits -> n-best spans -> predictions, with logits placed by hand on known spans."""

import importlib
import json
import math
import re
import time

import numpy as np
import pytest

from bertqa.squad.data import Example, read_squad
from bertqa.squad.features import featurize
from bertqa.squad.metrics import evaluate_v1
from bertqa.squad.postprocess import postprocess, write_predictions
from bertqa.tokenizer import load_tokenizer

# "0 1 2 ... 99": every number is one token, so token n is the word n and windows are easy to read.
WORDS = [str(n) for n in range(100)]
CONTEXT = " ".join(WORDS)
CHAR = np.cumsum([0] + [len(w) + 1 for w in WORDS[:-1]])  # character start of word n


@pytest.fixture(scope="module")
def tok(minilm_dir):
    return load_tokenizer(minilm_dir)


@pytest.fixture(scope="module")
def setup(tok):
    """One example over 100 tokens in windows of 27 context tokens every 8 (max_seq_length 32)."""
    ex = [Example("q", "what ?", CONTEXT, ["17 18"], [int(CHAR[17])])]
    f = featurize(ex, tok, max_seq_length=32, doc_stride=8, max_query_length=8)
    assert f.lengths.max() == 32 and len(f) > 5
    return ex, f


def col(f, row, n):
    """Column of word n in window `row` (None when that window does not hold it)."""
    hit = np.flatnonzero(f.offsets[row, :, 0] == CHAR[n])
    return int(hit[0]) if len(hit) else None


def windows_with(f, n):
    return [r for r in range(len(f)) if col(f, r, n) is not None]


def max_context_window(f, n):
    (row,) = [r for r in windows_with(f, n) if f.max_context[r, col(f, r, n)]]
    return row


def logits(f, *spans):
    """Logits of -100 except the (row, start word, end word, start logit, end logit) placements, so that
    a placed start or end never wins by pairing with an unplaced one."""
    start, end = np.full(f.input_ids.shape, -100.0, np.float32), np.full(f.input_ids.shape, -100.0, np.float32)
    for row, s, e, sl, el in spans:
        start[row, col(f, row, s)] = sl
        end[row, col(f, row, e)] = el
    return start, end


def google_softmax(entries):
    """Google's `_compute_softmax` over the n-best's start + end logits: the probabilities its n-best lists."""
    scores = [x["start_logit"] + x["end_logit"] for x in entries]
    exps = [math.exp(v - max(scores)) for v in scores]
    return [v / sum(exps) for v in exps]


def test_known_span_comes_back(setup):
    ex, f = setup
    row = max_context_window(f, 17)
    preds, nbest, null_odds = postprocess(ex, f, *logits(f, (row, 17, 19, 5.0, 4.0)))
    assert preds == {"q": "17 18 19"} and null_odds is None
    top = nbest["q"][0]
    assert top == {"text": "17 18 19", "probability": top["probability"], "start_logit": 5.0, "end_logit": 4.0}
    assert len(nbest["q"]) == 20
    assert sum(x["probability"] for x in nbest["q"]) == pytest.approx(1.0)
    assert [x["probability"] for x in nbest["q"]] == pytest.approx(google_softmax(nbest["q"]), rel=1e-12)
    scores = [x["start_logit"] + x["end_logit"] for x in nbest["q"]]
    assert scores == sorted(scores, reverse=True)
    assert len({x["text"] for x in nbest["q"]}) == 20


def test_a_repeated_phrase_is_one_answer(tok):
    context = "red fox and red fox"
    ex = [Example("r", "what ?", context, [], [])]
    f = featurize(ex, tok)
    cols = np.flatnonzero(f.offsets[0, :, 0] >= 0)  # red fox and red fox
    start, end = np.full((1, 384), -100.0), np.full((1, 384), -100.0)
    start[0, cols[[0, 3]]] = [1.0, 3.0]
    end[0, cols[[1, 4]]] = [1.0, 2.0]
    preds, nbest, _ = postprocess(ex, f, start, end)
    texts = [x["text"] for x in nbest["r"]]
    assert preds["r"] == "red fox" and texts.count("red fox") == 1
    assert nbest["r"][0]["start_logit"] == 3.0 and nbest["r"][0]["end_logit"] == 2.0


@pytest.mark.parametrize("answer", ["Jose\u0301", "में", "ที่"])
def test_an_answer_keeps_the_combining_marks_that_end_it(tok, answer):
    """An uncased tokenizer strips accents: a combining mark after a word's last letter (a decomposed "é",
    Devanagari's and Thai's vowel signs) is in no token, and the prediction, cut at the last token's end, lost
    it ("Jose", a Hindi or Thai word as its first letter), which the official metric scores 0."""
    context = f"They met {answer} again."
    ex = [Example("m", "who ?", context, [], [])]
    f = featurize(ex, tok)
    cols = np.flatnonzero(f.offsets[0, :, 0] >= 0)
    at = context.index(answer)
    first = cols[f.offsets[0, cols, 0] == at][0]
    last = cols[f.offsets[0, cols, 0] < at + len(answer)][-1]
    start, end = np.full((1, 384), -100.0), np.full((1, 384), -100.0)
    start[0, first], end[0, last] = 5.0, 5.0
    preds, _, _ = postprocess(ex, f, start, end)
    assert preds["m"] == answer


def test_answer_in_the_overlap_is_taken_from_its_max_context_window(setup):
    ex, f = setup
    rows = windows_with(f, 30)
    best = max_context_window(f, 30)
    assert len(rows) >= 3 and best != rows[0]  # in the overlap of several windows, max-context in a later one
    others = [r for r in rows if r != best]
    # The start scores higher where 30 is not max-context, but it may not start an answer there.
    start, end = logits(f, (best, 30, 31, 3.0, 3.0), *[(r, 30, 31, 9.0, 9.0) for r in others])
    preds, nbest, _ = postprocess(ex, f, start, end)
    assert preds["q"] == "30 31"
    assert nbest["q"][0]["start_logit"] == 3.0 and nbest["q"][0]["end_logit"] == 3.0


def test_max_context_filter_falls_back_to_a_valid_span(setup):
    ex, f = setup
    best = max_context_window(f, 30)
    other = next(r for r in windows_with(f, 30) if r != best)
    valid = max_context_window(f, 50)
    start, end = logits(f, (other, 30, 31, 20.0, 20.0), (valid, 50, 51, 2.0, 2.0))
    preds, _, _ = postprocess(ex, f, start, end)
    assert preds["q"] == "50 51"


def test_max_answer_length_and_order(setup):
    ex, f = setup
    row = max_context_window(f, 10)
    far = max_context_window(f, 60)
    start, end = logits(f, (row, 10, 20, 9.0, 9.0), (far, 60, 61, 2.0, 2.0))
    assert postprocess(ex, f, start, end, max_answer_length=30)[0]["q"] == " ".join(WORDS[10:21])
    assert postprocess(ex, f, start, end, max_answer_length=11)[0]["q"] == " ".join(WORDS[10:21])
    assert postprocess(ex, f, start, end, max_answer_length=10)[0]["q"] == "60 61"
    # An end before the start is never a span.
    start, end = logits(f, (row, 20, 12, 9.0, 9.0), (far, 60, 61, 2.0, 2.0))
    assert postprocess(ex, f, start, end)[0]["q"] == "60 61"


def google_prelim_order(f, start, end, n_best_size, max_answer_length):
    """(window, start, end) in the order of Google's run_squad prelim predictions, on logits masked as
    postprocess masks them: each window's n best indexes (a stable sort, best first), every start with every
    end, then a stable sort by start + end logit."""
    prelim = []
    for row in range(len(f)):
        ctx = f.offsets[row, :, 0] >= 0
        s = np.where(ctx & f.max_context[row], start[row], -np.inf).tolist()
        e = np.where(ctx, end[row], -np.inf).tolist()
        best_s = [i for i, _ in sorted(enumerate(s), key=lambda x: x[1], reverse=True)[:n_best_size]]
        best_e = [i for i, _ in sorted(enumerate(e), key=lambda x: x[1], reverse=True)[:n_best_size]]
        for i in best_s:
            for j in best_e:
                if s[i] > -np.inf and e[j] > -np.inf and i <= j and j - i + 1 <= max_answer_length:
                    prelim.append((s[i] + e[j], (row, i, j)))
    return [key for _, key in sorted(prelim, key=lambda x: x[0], reverse=True)]


def test_equal_scores_are_ranked_as_googles_code_ranks_them(setup, monkeypatch):
    # Low-precision logits are often equal: which of them make a window's top n, and which equal-scoring span
    # wins, follow Google's stable sorts (a partial sort would pick among them at random).
    from bertqa.squad.postprocess import span_candidates

    ex, f = setup
    rng = np.random.default_rng(0)
    for levels in (1, 2, 4):
        start = rng.integers(0, levels, f.input_ids.shape).astype(np.float64)
        end = rng.integers(0, levels, f.input_ids.shape).astype(np.float64)
        cand = span_candidates(f, start, end, 20, 30)
        got = list(zip(cand["row"].tolist(), cand["start"].tolist(), cand["end"].tolist()))
        assert got == google_prelim_order(f, start, end, 20, 30)
        best = google_prelim_order(f, start, end, 20, 30)[0]
        assert (
            postprocess(ex, f, start, end)[0]["q"]
            == CONTEXT[f.offsets[best[0], best[1], 0] : f.offsets[best[0], best[2], 1]]
        )
        # Scored a window at a time, the n-best is the same, equal scores in the same order.
        whole = postprocess(ex, f, start, end)
        monkeypatch.setattr(importlib.import_module("bertqa.squad.postprocess"), "PAIR_BUDGET", 1)
        assert postprocess(ex, f, start, end) == whole
        monkeypatch.undo()


def test_no_valid_span_predicts_empty(setup, tmp_path):
    ex, f = setup
    start, end = logits(f)
    start[:], end[:] = -1.0, -1.0
    for r in range(len(f)):  # in every window the only end candidate lies before the only start
        end[r, np.flatnonzero(f.offsets[r, :, 0] >= 0)[0]] = 5.0
        start[r, np.flatnonzero(f.max_context[r])[-1]] = 5.0
    preds, nbest, _ = postprocess(ex, f, start, end, n_best_size=1)
    assert preds["q"] == "" and nbest["q"] == [{"text": "", "probability": 1.0, "start_logit": 0.0, "end_logit": 0.0}]
    # v2.0: the null answer wins at any threshold, with finite odds (JSON has no infinity), written as JSON.
    for threshold in (0.0, 1e35):
        preds, nbest, odds = postprocess(ex, f, start, end, n_best_size=1, version_2=True,
                                         null_score_diff_threshold=threshold)  # fmt: skip
        assert preds["q"] == "" and odds["q"] == 1e30
    write_predictions(tmp_path, preds, nbest, odds)
    assert json.loads((tmp_path / "null_odds.json").read_text(), parse_constant=pytest.fail) == odds


@pytest.mark.parametrize("kwargs, error", [
    ({"max_answer_length": float("nan")}, "max_answer_length must be a positive integer, got nan"),  # every answer ""
    ({"n_best_size": 2.5}, "n_best_size must be a positive integer, got 2.5"),
    ({"n_best_size": "20"}, "n_best_size must be a positive integer, got '20'"),
    ({"n_best_size": 0}, "n_best_size must be a positive integer, got 0"),
    ({"version_2": True, "null_score_diff_threshold": float("nan")},  # never a null answer
     "null_score_diff_threshold must be a finite number, got nan"),
    ({"version_2": True, "null_score_diff_threshold": "0"}, "null_score_diff_threshold must be a finite number, got '0'"),
    ({"version_2": "no"}, "version_2 must be True or False, got 'no'"),  # ("no" is true: v2.0's null answers)
])  # fmt: skip
def test_bad_settings_are_refused_in_one_line(setup, kwargs, error):
    """The API's settings, checked as the command line's are: not wrong answers and no TypeError from numpy."""
    ex, f = setup
    with pytest.raises(ValueError, match=f"^{re.escape(error)}$"):
        postprocess(ex, f, *logits(f), **kwargs)


def test_version_2_null_decision(setup):
    ex, f = setup
    row = max_context_window(f, 40)
    start, end = logits(f, (row, 40, 41, 4.0, 4.0))  # best span 8.0
    start[:, 0] = end[:, 0] = 6.0  # null 12 in every window ...
    start[2, 0] = end[2, 0] = 5.0  # ... but the lowest over the windows counts: 10
    preds, nbest, odds = postprocess(ex, f, start, end, version_2=True)
    assert odds == {"q": pytest.approx(2.0)} and preds["q"] == ""
    null = [x for x in nbest["q"] if x["text"] == ""]
    assert null == [{"text": "", "probability": null[0]["probability"], "start_logit": 5.0, "end_logit": 5.0}]
    assert nbest["q"][0]["text"] == "" and len(nbest["q"]) == 20
    assert [x["probability"] for x in nbest["q"]] == pytest.approx(google_softmax(nbest["q"]), rel=1e-12)
    assert postprocess(ex, f, start, end, version_2=True, null_score_diff_threshold=2.5)[0]["q"] == "40 41"
    start[2, 0] = end[2, 0] = 4.0  # (mutation review) a tie, null 8 = span 8: the span, ranked before the null
    preds, nbest, odds = postprocess(ex, f, start, end, version_2=True)
    assert preds["q"] == "40 41" and odds["q"] == 0.0
    assert [x["text"] for x in nbest["q"][:2]] == ["40 41", ""]
    start[2, 0] = end[2, 0] = 3.0  # null 6 < 8: the span wins; the null entry ranks below it
    preds, nbest, odds = postprocess(ex, f, start, end, version_2=True)
    assert preds["q"] == "40 41" and odds["q"] == pytest.approx(-2.0)
    assert nbest["q"][0]["text"] == "40 41" and "" in [x["text"] for x in nbest["q"]]
    # A null that ranks below the n-best is still listed.
    start[2, 0] = end[2, 0] = -50.0
    nbest = postprocess(ex, f, start, end, version_2=True, n_best_size=3)[1]["q"]
    assert len(nbest) == 4 and nbest[-1]["text"] == ""


def test_narrower_logits_and_bad_shapes(setup):
    ex, f = setup
    row = max_context_window(f, 17)
    start, end = logits(f, (row, 17, 19, 5.0, 4.0))
    width = col(f, row, 19)  # the end word falls just outside the logits
    preds, _, _ = postprocess(ex, f, start[:, :width], end[:, :width])
    assert preds["q"] != "17 18 19" and preds["q"].startswith("17")
    with pytest.raises(ValueError, match="logits must both be"):
        postprocess(ex, f, start, end[:, :10])
    with pytest.raises(ValueError, match="logits must both be"):
        postprocess(ex, f, start[:-1], end[:-1])
    with pytest.raises(ValueError, match="features do not match the 2 examples"):
        postprocess(ex * 2, f, start, end)
    start[3, 5] = np.nan  # (the model's fault: every answer was "")
    with pytest.raises(ValueError, match=r"^start_logits and end_logits hold NaN or \+infinity"):
        postprocess(ex, f, start, end)


def test_examples_other_than_those_featurized_are_refused(tok):
    """Another list of the same length (reordered, say) cut each answer from the other question's context."""
    ex = [Example("a", "what ?", CONTEXT, [], []), Example("b", "which ?", "10 11 12 13", [], [])]
    f = featurize(ex, tok, max_seq_length=32, doc_stride=8, max_query_length=8)
    start, end = np.zeros(f.input_ids.shape), np.zeros(f.input_ids.shape)
    row = len(f) - 1  # b's one window: "11" starts at character 3
    start[row, f.offsets[row, :, 0] == 3] = end[row, f.offsets[row, :, 0] == 3] = 9.0
    assert postprocess(ex, f, start, end)[0]["b"] == "11"
    with pytest.raises(ValueError, match=r"features do not match the 2 examples \(pass the very list they were built"):
        postprocess(ex[::-1], f, start, end)


def test_duplicate_question_ids_refused(tok):
    """Answers are keyed by question id: two questions sharing one would lose the first one's answer silently."""
    ex = [Example("d", "what ?", CONTEXT, [], []), Example("d", "which ?", "10 11 12", [], [])]
    f = featurize(ex, tok, max_seq_length=32, doc_stride=8, max_query_length=8)
    start, end = np.zeros((len(f), 32)), np.zeros((len(f), 32))
    with pytest.raises(ValueError, match="question id 'd': duplicate question id"):
        postprocess(ex, f, start, end)
    ex[1] = Example("e", "which ?", "10 11 12", [], [])
    f = featurize(ex, tok, max_seq_length=32, doc_stride=8, max_query_length=8)
    assert set(postprocess(ex, f, start, end, version_2=True)[0]) == {"d", "e"}


@pytest.mark.parametrize("source", ["tiny-squad", "dev-a"])
def test_labels_as_logits_reproduce_the_answers(source, minilm_dir, tiny_squad, request):
    """End to end on our fixture and on the real dev-a.json: logits that point at the labelled spans give back
    the gold answers."""
    path = tiny_squad if source == "tiny-squad" else request.getfixturevalue("squad_dir") / "dev-a.json"
    tok = load_tokenizer(minilm_dir)
    examples = read_squad(path, is_training=False)
    f = featurize(examples, tok)
    rng = np.random.default_rng(0)
    start = rng.normal(size=f.input_ids.shape).astype(np.float32)
    end = rng.normal(size=f.input_ids.shape).astype(np.float32)
    labelled = np.flatnonzero(f.start_positions > 0)
    start[labelled, f.start_positions[labelled]] += 20
    end[labelled, f.end_positions[labelled]] += 20
    t0 = time.perf_counter()
    preds, nbest, _ = postprocess(examples, f, start, end)
    seconds = time.perf_counter() - t0
    data = json.loads(path.read_text())["data"]
    result = evaluate_v1(data, preds)
    print(f"postprocess of {len(f)} windows in {seconds:.2f} s; {result}")
    assert result["exact_match"] > 99.0 and result["f1"] > 99.5
    # Exactly the context's text under each labelled span (EM normalises case, articles and punctuation away), but
    # for labels longer than max_answer_length (30 tokens), which no prediction may be.
    by_qid, exact = {e.qid: e for e in examples}, 0
    for row in labelled:
        ex = examples[f.example_index[row]]
        s_, e_ = f.offsets[row, f.start_positions[row], 0], f.offsets[row, f.end_positions[row], 1]
        if f.end_positions[row] - f.start_positions[row] < 30:
            assert preds[ex.qid] == by_qid[ex.qid].context[s_:e_], ex.qid
            exact += 1
    assert exact >= 0.99 * len(set(f.example_index[labelled]))
    assert len(preds) == len(examples) and all(len(v) == 20 for v in nbest.values())


def test_write_predictions(tmp_path, setup):
    ex, f = setup
    start, end = logits(f)
    preds, nbest, odds = postprocess(ex, f, start, end, version_2=True)
    paths = write_predictions(tmp_path / "out", preds, nbest, odds)
    assert [p.name for p in paths] == ["predictions.json", "nbest_predictions.json", "null_odds.json"]
    assert json.loads(paths[0].read_text()) == preds and json.loads(paths[2].read_text()) == odds
    assert json.loads(paths[1].read_text()) == nbest
    paths = write_predictions(tmp_path / "v1", preds, nbest)
    assert sorted(p.name for p in (tmp_path / "v1").iterdir()) == ["nbest_predictions.json", "predictions.json"]
    # A v1.1 run into a v2.0 run's folder: the null odds left there would not belong to its predictions.
    write_predictions(tmp_path / "out", preds, nbest)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["nbest_predictions.json", "predictions.json"]
    # A set that fails part-way (here the n-best holds a value JSON cannot) leaves every file as it was: no new
    # predictions.json beside the older n-best, and no temporary files.
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    first = next(iter(nbest))
    bad_nbest = {**nbest, first: [{**nbest[first][0], "probability": float("nan")}]}
    changed = {q: "another answer" for q in preds}
    with pytest.raises(ValueError, match="not JSON compliant"):
        write_predictions(tmp_path / "out", changed, bad_nbest, odds)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    # A v1.1 set that fails over a v2.0 one keeps the v2.0 null odds too: they go only with a set that is written.
    write_predictions(tmp_path / "v2", preds, nbest, odds)
    before = {p.name: p.read_bytes() for p in (tmp_path / "v2").iterdir()}
    with pytest.raises(ValueError, match="not JSON compliant"):
        write_predictions(tmp_path / "v2", changed, bad_nbest)
    assert {p.name: p.read_bytes() for p in (tmp_path / "v2").iterdir()} == before
    # Into folders made for it: removed again (write_predictions made them itself, beyond the write's clean-up).
    with pytest.raises(ValueError, match="not JSON compliant"):
        write_predictions(tmp_path / "new" / "deep", changed, bad_nbest)
    assert not (tmp_path / "new").exists()
    # One file to remove, named by a string, is that file (it was read as a list of one-letter names).
    for name in ("p", "old.json"):
        (tmp_path / name).write_text("mine")
    write_predictions(tmp_path / "v1", preds, nbest, remove=str(tmp_path / "old.json"))
    assert (tmp_path / "p").read_text() == "mine" and not (tmp_path / "old.json").exists()


def test_a_deep_n_best_stays_within_its_pair_budget(tok, monkeypatch):
    """--n-best-size 384 pairs every start with every end: scored in groups of PAIR_BUDGET pairs, not all at once
    (76 windows of 384 tokens: 11 M pairs, 250 MB before; SQuAD dev's 10,833 windows would take 44 GB), and with
    the same n-best whether an example's windows are scored together or one at a time."""
    import tracemalloc

    module = importlib.import_module("bertqa.squad.postprocess")  # (bertqa.squad.postprocess is the function)

    text = " ".join(f"Ada Lovelace wrote program {j}." for j in range(400))  # no span text twice
    examples = [Example(str(i), "Who?", f"{text} {i}", ["Ada"], [0]) for i in range(4)]
    features = featurize(examples, tok, 384, 128, 64)
    assert len(features) > 70
    start, end = np.random.default_rng(0).normal(size=(2, *features.input_ids.shape))
    monkeypatch.setattr(module, "PAIR_BUDGET", 1 << 16)
    tracemalloc.start()
    try:
        deep = postprocess(examples, features, start, end, n_best_size=384, max_answer_length=30, version_2=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20
    assert [len(deep[1][ex.qid]) for ex in examples] == [385] * 4  # the n-best and the null answer
    for budget in (1, 1 << 40):  # each window alone; every window at once
        monkeypatch.setattr(module, "PAIR_BUDGET", budget)
        assert postprocess(examples, features, start, end, n_best_size=384, max_answer_length=30,
                           version_2=True) == deep  # fmt: skip
