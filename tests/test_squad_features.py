"""Windows, labels, max-context flags and the feature cache, checked on every question of the real
SQuAD training sample plus a small-window configuration that forces many overlapping windows."""

import json
import logging
import os
import re
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from bertqa.squad import features as features_module
from bertqa.squad.data import Example, read_squad
from bertqa.squad.features import Features, featurize, load_features
from bertqa.tokenizer import load_tokenizer

SMALL = {"max_seq_length": 64, "doc_stride": 16, "max_query_length": 16}


@pytest.fixture(scope="module")
def tok(minilm_dir):
    return load_tokenizer(minilm_dir)


@pytest.fixture(scope="module")
def train(squad_dir):
    return read_squad(squad_dir / "train-subset.json", is_training=True)


@pytest.fixture(scope="module", params=["tiny", "default", "small"])
def case(request, tok, tiny_squad):
    """(examples, features, params): our fixture's 20 questions at 40/16/16; of the real train-subset, all
    11,877 questions at 384/128/64, or 600 at 64/16/16."""
    if request.param == "tiny":
        examples, params = read_squad(tiny_squad, is_training=True), {**SMALL, "max_seq_length": 40}
        return examples, featurize(examples, tok, is_training=True, **params), params
    train = request.getfixturevalue("train")
    if request.param == "default":
        return train, featurize(train, tok, is_training=True), {}
    examples = train[:600]
    return examples, featurize(examples, tok, is_training=True, **SMALL), SMALL


def google_windows(n_tokens, window, stride):
    """Google's run_squad.py doc spans: (start, length) pairs."""
    spans, start = [], 0
    while start < n_tokens:
        length = min(n_tokens - start, window)
        spans.append((start, length))
        if start + length == n_tokens:
            break
        start += min(length, stride)
    return spans


def google_is_max_context(spans, k, position):
    best, best_score = None, None
    for i, (start, length) in enumerate(spans):
        end = start + length - 1
        if not start <= position <= end:
            continue
        score = min(position - start, end - position) + 0.01 * length
        if best_score is None or score > best_score:
            best, best_score = i, score
    return best == k


def context_columns(f: Features, i: int) -> np.ndarray:
    return np.flatnonzero(f.offsets[i, :, 0] >= 0)


def test_layout_and_limits(case, tok):
    examples, f, params = case
    L = params.get("max_seq_length", 384)
    max_q = params.get("max_query_length", 64)
    assert f.input_ids.shape == (len(f), L) and f.offsets.shape == (len(f), L, 2)
    assert f.input_ids.dtype == np.int32 and f.lengths.dtype == np.int32 and f.max_context.dtype == bool
    assert np.all(f.lengths <= L) and np.all(f.input_ids[:, 0] == tok.cls_id)
    rows = np.arange(len(f))
    assert np.all(f.input_ids[rows, f.lengths - 1] == tok.sep_id)
    first_sep = np.argmax(f.input_ids == tok.sep_id, axis=1)
    assert np.all(first_sep - 1 <= max_q)  # question tokens between [CLS] and the first [SEP]
    col = np.arange(L)
    assert np.all(f.input_ids[col >= f.lengths[:, None]] == tok.pad_id)
    context = (col > first_sep[:, None]) & (col < (f.lengths - 1)[:, None])
    assert np.array_equal(f.offsets[:, :, 0] >= 0, context)
    assert np.array_equal(f.token_type_ids == 1, context | (col == (f.lengths - 1)[:, None]))
    assert np.all(f.max_context <= context)
    assert np.array_equal(f.attention_mask(), col < f.lengths[:, None])
    # The question part is the question's tokens, truncated to max_query_length.
    for i in rows[:: max(1, len(f) // 500)]:
        q = tok.tokenize([examples[f.example_index[i]].question])[0].ids[:max_q]
        assert f.input_ids[i, 1 : first_sep[i]].tolist() == q


def with_marks(text: str, offsets) -> np.ndarray:
    """Token offsets with each end moved over the combining marks after it that are in no token (an uncased
    tokenizer strips them as accents), restated one character at a time."""
    out = [list(o) for o in offsets]
    for j, (_, end) in enumerate(out):
        stop = out[j + 1][0] if j + 1 < len(out) else len(text)
        while end < stop and unicodedata.category(text[end]).startswith("M"):
            end += 1
        out[j][1] = max(out[j][1], end)
    return np.array(out, np.int32).reshape(-1, 2)


def test_windows_cover_context_and_max_context_is_unique(case, tok):
    """Every context token is in some window, gets max-context in exactly one, and the windows and the
    flags are those of Google's run_squad.py (checked one by one where there are several windows)."""
    examples, f, params = case
    L = params.get("max_seq_length", 384)
    stride = params.get("doc_stride", 128)
    contexts = sorted({ex.context for ex in examples})
    enc = {c: with_marks(c, e.offsets) for c, e in zip(contexts, tok.tokenize(contexts), strict=True)}
    bounds = np.searchsorted(f.example_index, np.arange(len(examples) + 1))
    multi = 0
    for e, ex in enumerate(examples):
        rows = range(bounds[e], bounds[e + 1])
        want = enc[ex.context]
        q_len = int(np.argmax(f.input_ids[rows[0]] == tok.sep_id)) - 1
        spans = google_windows(len(want), L - q_len - 3, stride) or [(0, 0)]
        assert len(spans) == len(rows), ex.qid
        assert spans[-1][0] + spans[-1][1] == len(want)  # stride <= window, so no gaps before the end
        for (start, length), i in zip(spans, rows, strict=True):
            assert np.array_equal(f.offsets[i, context_columns(f, i)], want[start : start + length]), ex.qid
        flagged = np.concatenate([f.offsets[i][f.max_context[i]] for i in rows])
        assert np.array_equal(flagged, want), ex.qid  # every token, in order, exactly once
        if len(rows) > 1:
            multi += 1
            for k, ((start, length), i) in enumerate(zip(spans, rows, strict=True)):
                expected = [google_is_max_context(spans, k, start + j) for j in range(length)]
                assert f.max_context[i, context_columns(f, i)].tolist() == expected, ex.qid
    print(f"{len(examples)} examples, {len(f)} windows, {multi} examples with several windows")
    assert multi > min(50, len(examples) // 2)


def test_labels_are_the_smallest_covering_span(case):
    examples, f, _ = case
    labelled = np.flatnonzero(f.start_positions > 0)
    on_boundaries = exact_text = 0
    for i in labelled:
        ex = examples[f.example_index[i]]
        a = ex.answer_starts[0]
        b = a + len(ex.answers[0])
        s, e = f.start_positions[i], f.end_positions[i]
        cols = context_columns(f, i)
        assert cols[0] <= s <= e <= cols[-1]
        starts, ends = f.offsets[i, :, 0], f.offsets[i, :, 1]
        # Covers the answer, and dropping either end token would not.
        assert starts[s] <= a and ends[e] >= b, ex.qid
        assert ends[s] > a and starts[e] < b, ex.qid
        assert s == cols[0] or ends[s - 1] <= a, ex.qid
        assert e == cols[-1] or starts[e + 1] >= b, ex.qid
        if starts[s] == a and ends[e] == b:
            on_boundaries += 1
            exact_text += ex.context[starts[s] : ends[e]] == ex.answers[0]
    # Windows without a label must not hold the whole answer (and every answer lands in some window).
    has_label = np.zeros(len(examples), bool)
    has_label[f.example_index[labelled]] = True
    assert has_label.all()
    print(f"{len(labelled)} labelled windows; {on_boundaries} answers on token boundaries, "
          f"{exact_text} of those decode to the exact answer text")  # fmt: skip
    assert exact_text == on_boundaries and on_boundaries > 0.97 * len(labelled)


def test_unlabelled_windows_do_not_hold_the_answer(case):
    examples, f, _ = case
    for i in np.flatnonzero(f.start_positions == 0)[:3000]:
        ex = examples[f.example_index[i]]
        a, b = ex.answer_starts[0], ex.answer_starts[0] + len(ex.answers[0])
        cols = context_columns(f, i)
        starts, ends = f.offsets[i, cols, 0], f.offsets[i, cols, 1]
        assert not (starts[0] <= a and ends[-1] >= b), ex.qid


def test_small_edge_cases(tok):
    long_q = "why " * 100
    examples = [
        Example("imp", "Is it?", "Some context here.", [], [], is_impossible=True),
        Example("long", long_q, "Tiny.", ["Tiny"], [0]),
        Example("empty", "Q?", "   ", [], [], is_impossible=True),
        Example("eval", "Q?", "A B C", ["B"], [7]),  # a wrong start in an evaluation file: no label
    ]
    f = featurize(examples, tok, max_seq_length=80, doc_stride=8, max_query_length=10)
    assert f.example_index.tolist() == [0, 1, 2, 3]  # every example has a window, even with no context
    assert f.start_positions.tolist() == [0, 12, 0, 0] and f.end_positions.tolist() == [0, 12, 0, 0]
    assert f.lengths[1] == 1 + 10 + 1 + 1 + 1 + 1  # [CLS] 10 question tokens [SEP] tiny . [SEP]
    assert f.lengths[2] == 1 + 2 + 1 + 0 + 1
    with pytest.raises(ValueError, match="question id 'eval': the first answer is not in the context"):
        featurize(examples, tok, max_seq_length=80, doc_stride=8, max_query_length=10, is_training=True)
    assert len(f.select([1, 3])) == 2 and f.select([1, 3]).example_index.tolist() == [1, 3]
    empty = featurize([], tok)
    assert empty.input_ids.shape == (0, 384)


def test_token_ends_cover_trailing_marks_within_their_own_context(tok):
    """A mark that ends a context joins its last token, and one that starts the next context does not join the
    previous context's last token (the contexts are processed as one text)."""
    contexts = ["Jose\u0301", "\u0301x Jose\u0301 y"]
    f = featurize([Example(str(i), "who ?", c, [], []) for i, c in enumerate(contexts)], tok)
    spans = [[c[a:b] for a, b in f.offsets[i][f.offsets[i, :, 0] >= 0]] for i, c in enumerate(contexts)]
    assert spans == [["Jose\u0301"], ["x", "Jose\u0301", "y"]]


def test_a_label_starts_at_the_answers_token_not_the_one_that_ends_where_it_starts(tok):
    """(mutation review) The punctuation token before "war" in "pre-war" ends where the answer starts: a label
    taken from the first token ending at or after the answer's start would begin at "-"."""
    context = "It ended the pre-war era."
    f = featurize([Example("q", "when ?", context, ["war"], [17])], tok, is_training=True)
    s, e = f.start_positions[0], f.end_positions[0]
    assert (f.offsets[0, s, 0], f.offsets[0, e, 1]) == (17, 20) and s == e


def test_a_token_end_takes_in_spacing_marks_too(tok):
    """(mutation review) A spacing mark (Unicode category Mc, U+1734 after a Hanunoo letter), which the tokenizer
    leaves out of every token, joins the token before it as a nonspacing one (Mn) does: an answer ending on it keeps
    it."""
    # (U+1734 is Mc from Unicode 14, Python 3.11's; the tokenizer's tables have it Mn and drop it. On an older Python
    # it is Mn there too, and only the Mn case is left.)
    for mark in ("\u1734", "\u0301")[unicodedata.category("\u1734") != "Mc" :]:
        f = featurize([Example("q", "who ?", f"\u1720{mark} y", [], [])], tok)
        assert f.offsets[0][f.offsets[0, :, 0] >= 0].tolist() == [[0, 2], [3, 4]], mark


def test_each_distinct_question_and_context_is_tokenised_once(tok, monkeypatch):
    """One question asked of several contexts (a server's batch) and several questions of one context: the
    windows are those each example gets alone, and every distinct text is tokenised once (a long question
    asked of 256 contexts was tokenised 256 times)."""
    long_q = "which of the many tokens " * 30
    contexts = ["Paris is the capital of France. " * 12, "Tiny.", "Berlin lies on the Spree. " * 9]
    examples = [Example(f"q{i}", q, c, [], []) for i, (q, c) in
                enumerate([(long_q, contexts[0]), (long_q, contexts[1]), ("Where?", contexts[0]),
                           (long_q, contexts[2]), ("Where?", contexts[2])])]  # fmt: skip
    seen = []
    real = tok.tokenize
    monkeypatch.setattr(tok, "tokenize", lambda texts: seen.extend(texts) or real(texts))
    f = featurize(examples, tok, **SMALL)
    assert sorted(seen) == sorted([*contexts, long_q, "Where?"])
    for e, ex in enumerate(examples):
        alone = featurize([ex], tok, **SMALL)
        rows = f.example_index == e
        assert rows.sum() == len(alone) > 0
        for name in ("input_ids", "token_type_ids", "offsets", "max_context", "lengths"):
            assert np.array_equal(getattr(f, name)[rows], getattr(alone, name)), (ex.qid, name)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"doc_stride": 400}, "doc_stride 400 is longer than the shortest context window"),
        ({"max_seq_length": 60, "max_query_length": 64}, "max_seq_length 60 leaves no room"),
        ({"max_seq_length": 0}, "max_seq_length must be a positive integer"),
        ({"doc_stride": 1.5}, "doc_stride must be a positive integer"),
        ({"max_query_length": True}, "max_query_length must be a positive integer"),
    ],
)
def test_invalid_parameters(tok, params, message):
    with pytest.raises(ValueError, match=message) as err:
        featurize([], tok, **params)
    assert "\n" not in str(err.value)


def test_a_stride_of_a_whole_window_is_taken_and_one_more_is_refused(tok):
    """(mutation review) At 384/64 a question of 64 tokens leaves windows of 317 context tokens: a stride of 317 puts
    them side by side, none unseen; 318 is refused."""
    words = [str(n % 100) for n in range(700)]  # one token each
    at = np.cumsum([0] + [len(w) + 1 for w in words[:-1]])  # each word's first character
    ex = [Example("q", "who " * 64, " ".join(words), [], [])]
    f = featurize(ex, tok, max_seq_length=384, doc_stride=317, max_query_length=64)
    held = [f.offsets[r][f.offsets[r, :, 0] >= 0][:, 0].tolist() for r in range(len(f))]
    assert [len(h) for h in held] == [317, 317, 66]
    assert sum(held, []) == at.tolist()
    with pytest.raises(ValueError, match="doc_stride 318 is longer than the shortest context window \\(317 = "):
        featurize(ex, tok, max_seq_length=384, doc_stride=318, max_query_length=64)


# ---- cache


@pytest.fixture
def small_file(tmp_path, tiny_squad):
    """The first two articles of tests/data/tiny-squad.json, as a file the cache can hash."""
    doc = json.loads(tiny_squad.read_text())
    doc["data"] = doc["data"][:2]
    path = tmp_path / "small.json"
    path.write_text(json.dumps(doc))
    return path


def same(a: Features, b: Features) -> bool:
    return all(np.array_equal(getattr(a, n), getattr(b, n)) for n in Features.ARRAYS) and a.params == b.params


def test_an_empty_cache_dir_is_refused_not_the_current_folder(small_file, tok, tmp_path, monkeypatch):
    """(review) Path("") is the current folder: the API wrote its cache wherever the process ran."""
    examples = read_squad(small_file, is_training=False)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    for empty in ("", " "):
        with pytest.raises(ValueError, match="^cache_dir '': empty; name a folder, or None for no features cache$"):
            load_features(examples, tok, empty, doc_stride=100)
    assert list((tmp_path / "cwd").iterdir()) == []


def test_wrong_kinds_of_input_are_refused_in_one_line(small_file, tok, tmp_path, minilm_dir):
    """(review) "no" for is_training read as True (training windows, or int("no") in the cache's key); another
    tokenizer, a dict of examples or a path failed deep inside with an AttributeError; a file's own examples read
    with is_training="no" were read as training data (answers re-anchored, questions skipped)."""
    examples = read_squad(small_file, is_training=False)
    with pytest.raises(ValueError, match="^is_training must be True or False, got 'no'$"):
        read_squad(small_file, "no")
    for call in (lambda: featurize(examples, tok, is_training="no"),
                 lambda: load_features(examples, tok, tmp_path / "cache", is_training="no")):  # fmt: skip
        with pytest.raises(ValueError, match="^is_training must be True or False, got 'no'$"):
            call()
    for bad_tok in (str(minilm_dir), tok.backend):  # (a path; the `tokenizers` library's own Tokenizer)
        with pytest.raises(
            TypeError, match=rf"^tokenizer must be bertqa's BertTokenizer .*, not {type(bad_tok).__name__}$"
        ):
            featurize(examples, bad_tok)
    for bad in ({e.qid: e for e in examples}, [vars(e) for e in examples], iter(examples), str(small_file)):
        for call in (featurize, lambda ex, t: load_features(ex, t, tmp_path / "cache")):
            with pytest.raises(TypeError, match=r"^examples must be a list of bertqa.squad.Example"):
                call(bad, tok)
    assert not (tmp_path / "cache").exists()
    # Examples built by hand, named by their question id: a str of answers labelled its first letter ("B" of "Bob
    # Smith"); a string start, a None question or a lone surrogate failed inside, naming nothing.
    for bad, error, message in [
        (Example("q1", "who?", "Bob Smith", "Bob Smith", [0]), TypeError, "answers must be a list of strings"),
        (Example("q1", "who?", "Bob Smith", ["Bob"], ["0"]), TypeError, "answer_starts must be a list of integers"),
        (Example("q1", "who?", "Bob Smith", ["Bob"], []), TypeError, "answer_starts must be a list of integers"),
        (Example("q1", "who?", "Bob Smith", [], [0]), TypeError, "answer_starts must be a list of integers"),
        (Example("q1", None, "Bob Smith", [], []), TypeError, "question must be a string, not NoneType"),
        (Example("q1", "who?", "Bob \ud800 Smith", ["Bob"], [0]), ValueError,
         "context holds an unpaired surrogate at character 4"),
    ]:  # fmt: skip
        with pytest.raises(error, match=f"^question id 'q1': {re.escape(message)}"):
            featurize([bad], tok, is_training=True)
    with pytest.raises(ValueError, match="^do_lower_case must be True, False or None, got 'yes'$"):
        load_tokenizer(minilm_dir, do_lower_case="yes")
    assert load_tokenizer(minilm_dir, do_lower_case=np.False_).do_lower_case is False  # (numpy's: saved as JSON)
    # What such checks must let through: numpy arrays (pandas, HF datasets), every gold text with the first start
    # alone (evaluation reads only the first), numpy ints, none for an unanswerable question.
    context = "Bob Smith lives here"
    fine = [Example("a", "who?", context, np.array(["Bob Smith"]), np.array([0])),
            Example("b", "who?", context, ("Bob Smith", "Bob"), [np.int64(0)]),
            Example("d", "who?", context, np.array(["Bob Smith", "Bob"]), np.array([0, 0])),  # (no truth value)
            Example("c", "who?", context, [], [], is_impossible=True)]  # fmt: skip
    f = load_features(fine, tok, tmp_path / "cache", is_training=True)
    assert list(f.start_positions) == [4, 4, 4, 0] and same(f, featurize(fine, tok, is_training=True))


def test_cache_hits_and_misses(small_file, tok, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    examples = read_squad(small_file, is_training=False)
    first = load_features(examples, tok, cache, doc_stride=100)
    assert len(list(cache.glob("*.npz"))) == 1 and same(first, featurize(examples, tok, doc_stride=100))

    def no_featurize(*args, **kwargs):
        raise AssertionError("cache miss")

    with monkeypatch.context() as m:
        m.setattr(features_module, "featurize", no_featurize)
        assert same(load_features(examples, tok, cache, doc_stride=100), first)
        # Spelling out a default is the same key.
        load_features(examples, tok, cache, doc_stride=100, max_seq_length=384)

    # Each change is a miss that writes its own file.
    load_features(examples, tok, cache, doc_stride=64)
    load_features(examples, tok, cache, doc_stride=100, is_training=True)
    load_features(examples[:-1], tok, cache, doc_stride=100)
    load_features(examples, _lowercase_off(tok, tmp_path), cache, doc_stride=100)
    # A context edited in the file, the questions' ids and answer positions unchanged: a miss.
    doc = json.loads(small_file.read_text())
    context = doc["data"][0]["paragraphs"][0]["context"]
    doc["data"][0]["paragraphs"][0]["context"] = context.replace(context.split()[-1], "elsewhere")
    small_file.write_text(json.dumps(doc))
    edited = read_squad(small_file, is_training=False)
    assert [(e.qid, e.answer_starts) for e in edited] == [(e.qid, e.answer_starts) for e in examples]
    assert not same(load_features(edited, tok, cache, doc_stride=100), first)
    assert len(list(cache.glob("*.npz"))) == 6
    # The features are filed under the examples they were built from, not under the file as it is when the cache is
    # written: the file replaced after it was read (a copy finishing) left the old text's windows filed as the new's.
    with monkeypatch.context() as m:
        m.setattr(features_module, "featurize", no_featurize)
        assert same(load_features(examples, tok, cache, doc_stride=100), first)
        # A file that reads as the same examples (reformatted) is a hit.
        small_file.write_text(json.dumps(doc, indent=1))
        assert same(load_features(read_squad(small_file, is_training=False), tok, cache, doc_stride=100),
                    load_features(edited, tok, cache, doc_stride=100))  # fmt: skip
    assert load_features(examples, tok, None).params["doc_stride"] == 128  # no cache: no file
    assert len(list(cache.iterdir())) == 6


def _lowercase_off(tok, tmp_path):
    """The same vocabulary without lower-casing: a different tokenizer, so a different fingerprint."""
    spec = json.loads(tok.backend.to_str())
    spec["normalizer"]["lowercase"] = False
    path = tmp_path / "cased" / "tokenizer.json"
    path.parent.mkdir()
    path.write_text(json.dumps(spec))
    other = load_tokenizer(path)
    assert other.fingerprint != tok.fingerprint
    return other


def test_cache_write_removes_what_killed_writes_left(small_file, tok, tmp_path):
    # A run killed while writing a cache entry (SIGKILL, or SIGTERM, which Python does not turn into an exception)
    # leaves the temporary file: the next write into the folder removes those untouched for an hour, and no other.
    cache = tmp_path / "cache"
    cache.mkdir()
    examples = read_squad(small_file, is_training=False)
    old = cache / ".squad-features-0123456789abcdef01234567.k1ll3d00.tmp.npz"
    fresh = cache / ".squad-features-0123456789abcdef01234567.wr1t1ng0.tmp.npz"  # another run, writing now
    other = cache / ".notes.abcdefgh.tmp.npz"  # not the cache's
    for path in (old, fresh, other):
        path.write_bytes(b"PK half a zip")
    stale = time.time() - features_module.STALE_WRITE_S - 60
    for path in (old, other):
        os.utime(path, (stale, stale))
    load_features(examples, tok, cache)
    assert not old.exists() and fresh.exists() and other.exists()
    assert len(list(cache.glob("squad-features-*.npz"))) == 1


def test_cache_write_is_atomic_and_corruption_rebuilds(small_file, tok, tmp_path, monkeypatch, caplog):
    cache = tmp_path / "cache"
    examples = read_squad(small_file, is_training=False)

    def broken_savez(f, **arrays):
        f.write(b"PK half a zip")
        raise OSError("disk full")

    with monkeypatch.context() as m, caplog.at_level(logging.WARNING):
        m.setattr(np, "savez", broken_savez)
        # The cache only saves time: the features come back all the same, with one warning naming the file.
        assert same(load_features(examples, tok, cache), featurize(examples, tok))
    assert not cache.exists()  # neither a final file nor a temporary one, nor the folder made for them
    assert "cannot write the feature cache (disk full); going on without it" in caplog.text
    caplog.clear()
    blocked = tmp_path / "a-file"
    blocked.write_text("")  # a cache folder that cannot be made: its parent is a file
    with caplog.at_level(logging.WARNING):
        assert same(load_features(examples, tok, blocked / "cache"), featurize(examples, tok))
    assert f"{blocked / 'cache'}" in caplog.text and "cannot write the feature cache" in caplog.text
    caplog.clear()

    good = load_features(examples, tok, cache)
    (path,) = cache.glob("*.npz")
    path.write_bytes(path.read_bytes()[:1000])  # e.g. a copy cut short
    with caplog.at_level(logging.WARNING):
        again = load_features(examples, tok, cache)
    assert same(again, good) and "unreadable feature cache" in caplog.text
    assert again.params["max_seq_length"] == 384
    # Damage that zipfile and numpy report with other exceptions (they stopped every later run on that data):
    # an empty file, as a power loss can leave one (EOFError), and a compression method zipfile does not know,
    # as a flipped bit in the zip's directory makes one (NotImplementedError).
    raw = path.read_bytes()
    entry = raw.index(b"PK\x01\x02")  # the first entry of the zip's central directory; +10: its method
    for damaged in (b"", raw[: entry + 10] + (99).to_bytes(2, "little") + raw[entry + 12 :]):
        path.write_bytes(damaged)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert same(load_features(examples, tok, cache), good)
        assert "unreadable feature cache" in caplog.text
    path.write_bytes(b"\x80\x04 junk, not a zip")  # numpy read it as a pickle, and said to allow pickles
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert same(load_features(examples, tok, cache), good)
    assert "unreadable feature cache (not a features file: no .npz archive); rebuilding it" in caplog.text
    # One that cannot be read is named so (zipfile.is_zipfile(path) takes an unreadable file for no zip).
    from bertqa.squad import features as module

    def unreadable(file, *args, **kwargs):
        if Path(file).parent == cache:
            raise PermissionError(13, "Permission denied", str(file))
        return open(file, *args, **kwargs)

    caplog.clear()
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING):
        m.setattr(module, "open", unreadable, raising=False)
        assert same(load_features(examples, tok, cache), good)
    assert "unreadable feature cache (Permission denied); rebuilding it" in caplog.text
    # A folder whose name is too long (or inside one not to be entered): its clean-up stopped the command.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert same(load_features(examples, tok, tmp_path / ("x" * 300)), good)
    assert "File name too long" in caplog.text
    # A cache folder that cannot be searched (one left by another user) is a warning too, not an error.
    real_is_file = Path.is_file

    def is_file(self, *args, **kwargs):
        if self.parent == cache:
            raise PermissionError(13, "Permission denied", str(self))
        return real_is_file(self, *args, **kwargs)

    monkeypatch.setattr(Path, "is_file", is_file)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert same(load_features(examples, tok, cache), good)
    assert "unreadable feature cache (Permission denied)" in caplog.text


def test_the_default_cache_folder_follows_xdg_cache_home(monkeypatch, tmp_path):
    from bertqa.evaluate import default_cache_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home = str(tmp_path / "home" / ".cache" / "bertqa" / "features")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == str(tmp_path / "xdg" / "bertqa" / "features")
    # Empty or relative, the spec's default: it was the current folder's bertqa/features.
    for value in ("", "relative/cache"):
        monkeypatch.setenv("XDG_CACHE_HOME", value)
        assert default_cache_dir() == home
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == home
    # No home folder (HOME unset for a user id with no passwd entry, or relative): no cache, not one in a folder
    # named "~" (or "rel") under wherever the command runs.
    import pwd

    for home in ("rel", ""):  # ("" was /.cache: the root folder's)
        monkeypatch.setenv("HOME", home)
        assert default_cache_dir() is None
    monkeypatch.delenv("HOME")

    def no_entry(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    assert default_cache_dir() is None
