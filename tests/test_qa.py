"""QuestionAnswerer, `bertqa ask` and `bertqa predict` with a model fine-tuned in the test session."""

import collections
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bertqa.qa
from bertqa.checkpoint import CheckpointError
from bertqa.config import BertConfig
from bertqa.model import BertForQuestionAnswering
from bertqa.qa import QuestionAnswerer, align_to_words, rank_answers, window_settings
from bertqa.squad.data import Example
from bertqa.squad.features import featurize
from bertqa.squad.postprocess import postprocess
from bertqa.tokenizer import load_tokenizer

FILLER = "The weather stayed mild that season, and the market opened every morning at the usual hour. " * 40


def questions(path):
    doc = json.loads(path.read_text())
    return [(q["question"], p["context"], q["answers"][0]["text"], q["id"])
            for a in doc["data"] for p in a["paragraphs"] for q in p["qas"]]  # fmt: skip


@pytest.fixture(scope="module")
def qa(qa_model_dir):
    return QuestionAnswerer.from_pretrained(qa_model_dir, device="cpu", precision="fp32")


def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "bertqa", *map(str, args)], capture_output=True, text=True,
                          input=stdin, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip


def test_answers_the_questions_it_was_fine_tuned_on(qa, tiny_squad):
    for question, context, gold, _ in questions(tiny_squad):
        r = qa(question, context)
        assert set(r) == {"score", "start", "end", "answer"}
        assert r["answer"] == gold and context[r["start"] : r["end"]] == gold
        assert 0.5 < r["score"] <= 1.0


def test_an_answer_only_in_a_late_window_of_a_long_context(qa, tiny_squad):
    question, context, gold, _ = questions(tiny_squad)[13]  # "Where was Lysander Finch born?"
    long = FILLER + context + " " + FILLER[:300]
    n_windows = len(featurize([Example("q", question, long, [], [])], qa.tokenizer, 128, 64, 32))
    assert n_windows > 10
    r = qa(question, long, max_seq_len=128, doc_stride=64, max_question_len=32)
    assert (
        r["answer"] == gold and long[r["start"] : r["end"]] == gold and r["start"] == len(FILLER) + context.index(gold)
    )
    # One softmax over every context token of every window: the top 5 over all windows are ranked together.
    top = qa(question, long, top_k=5, max_seq_len=128, doc_stride=64, max_question_len=32)
    assert top[0] == r and sum(a["score"] for a in top) <= 1.0 + 1e-6


@pytest.mark.parametrize("k", [5, 25])
def test_top_k_gives_k_distinct_answers_best_first(qa, tiny_squad, k):
    question, context, gold, _ = questions(tiny_squad)[0]
    answers = qa(question, context, top_k=k)
    assert len(answers) == k and len({a["answer"] for a in answers}) == k  # k > 20 needs a wider search
    assert all(context[a["start"] : a["end"]] == a["answer"] for a in answers)
    scores = [a["score"] for a in answers]
    assert scores == sorted(scores, reverse=True) and sum(scores) <= 1.0 + 1e-6
    assert answers[0] == qa(question, context)


def alike(got, want) -> bool:
    """Answers alike: the same texts and offsets, scores to rounding (a window batched with others is padded)."""
    got, want = list(got), list(want)
    spans = [(a["answer"], a["start"], a["end"]) for a in got] == [(a["answer"], a["start"], a["end"]) for a in want]
    return spans and [a["score"] for a in got] == pytest.approx([a["score"] for a in want], abs=1e-5)


def test_batched_answers_equal_one_at_a_time(qa, tiny_squad):
    qs = questions(tiny_squad)
    single = [qa(q, c, top_k=2) for q, c, _, _ in qs]
    batched = qa([q for q, *_ in qs], [c for _, c, *_ in qs], top_k=2)
    for one, many in zip(single, batched, strict=True):
        assert alike(one, many)
    # Many questions about one context: a list with one answer each.
    context = qs[0][1]
    same = [q for q, c, *_ in qs if c == context]
    assert [r["answer"] for r in qa(same, context)] == [qa(q, context)["answer"] for q in same]
    assert qa({"question": qs[0][0], "context": context}) == qa(qs[0][0], context)  # the pipeline's dict form
    pairs = [{"question": q, "context": c} for q, c, *_ in qs[:2]]
    assert qa(tuple(pairs)) == qa(pairs) == [qa(q, c) for q, c, *_ in qs[:2]]  # a tuple of them, as a list


def test_the_pipelines_batch_size_num_workers_iterators_and_lazy_generators(qa, tiny_squad, monkeypatch):
    qs = questions(tiny_squad)[:5]
    dicts = [{"question": q, "context": c} for q, c, *_ in qs]
    each = [qa(q, c) for q, c, *_ in qs]
    sizes = []
    real = bertqa.qa.predict_logits
    monkeypatch.setattr(bertqa.qa, "predict_logits", lambda *a, **k: sizes.append(a[3]) or real(*a, **k))
    # batch_size: the windows of one forward pass, for this call only; num_workers is taken and changes nothing.
    assert alike(qa(dicts, batch_size=1, num_workers=2), each)
    assert sizes == [1] and qa(dicts[0]) == each[0] and sizes[-1] == qa.batch_size
    # Iterators and other iterables are lists, as the pipeline lists them.
    assert qa(iter(dicts)) == qa(map(dict, dicts)) == qa(dicts) and alike(qa(dicts), each)
    assert alike(qa((q for q, *_ in qs[:2]), iter([qs[0][1], qs[1][1]])), each[:2])

    # A generator of dicts is answered lazily, batch_size dicts at a time, as the pipeline streamed it.
    pulled = []

    def source(items):
        for item in items:
            pulled.append(item)
            yield item

    sizes.clear()
    out = qa(source(dicts), batch_size=2)
    assert pulled == [] and sizes == []
    assert alike([next(out)], each[:1]) and len(pulled) == 2 and sizes == [2]
    assert alike(out, each[1:]) and len(pulled) == 5
    assert alike([a[0] for a in qa(source(dicts), top_k=2)], each)  # lists of top_k answers each

    # Bad input: the parameters at the call, an item where the stream reaches it, named by its place.
    pulled.clear()
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        qa(source(dicts), top_k=0)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        qa(dicts, batch_size=0)
    with pytest.raises(ValueError, match="num_workers must be a non-negative integer"):
        qa(dicts, num_workers=-1)
    assert pulled == []
    bad = [*dicts[:3], "What?", dicts[4]]
    with pytest.raises(ValueError, match="^input 3: expected a {'question', 'context'} dict, not str$"):
        list(qa(source(bad), batch_size=2))
    missing = [dicts[0], {"question": "Who?"}]
    with pytest.raises(ValueError, match="^input 1: the dict has no 'context' key"):
        list(qa(source(missing)))
    with pytest.raises(ValueError, match="^input 6: question is empty$"):
        list(qa(source([*dicts, dicts[0], {"question": " ", "context": "Text."}]), batch_size=4))


def test_none_means_the_default_as_in_the_pipeline(qa, tiny_squad):
    """HF-style wrappers pass None for what their caller left unset; align_to_words=None turned alignment off."""
    question, context, _, _ = questions(tiny_squad)[0]
    unset = dict(top_k=None, max_answer_len=None, handle_impossible_answer=None, doc_stride=None, max_seq_len=None,
                 max_question_len=None, align_to_words=None)  # fmt: skip
    assert qa(question, context, **unset) == qa(question, context)
    assert qa(question, context, **{**unset, "top_k": 3}) == qa(question, context, top_k=3)


def test_answering_again_reuses_the_packed_bf16_weights(qa_model_dir, tiny_squad):
    # Each call (and each server batch) runs predict_logits: the fused layers' weights are packed once, not per call.
    from skips import platform_skip

    from bertqa.model import _fused_linear_works

    if not _fused_linear_works():  # (test_model checks the probe against the CPU's features)
        platform_skip("oneDNN's bf16 linear does not run here (no AVX-512 or no oneDNN): nothing is packed")
    qa = QuestionAnswerer.from_pretrained(qa_model_dir, device="cpu", precision="bf16")
    (q, c, *_), (q2, c2, *_) = questions(tiny_squad)[:2]
    first = qa(q, c)
    packed = qa.model.qa_outputs._packed
    assert packed is not None
    assert qa(q2, c2) and qa(q, c) == first and qa.model.qa_outputs._packed is packed


def test_a_precision_resolved_already_is_used_as_it_is_and_not_warned_of_again(qa_model_dir, monkeypatch, caplog):
    """serve resolves the precision for its start-up line, then loads the model: an emulated bf16 was warned of
    twice."""
    import bertqa.runtime
    from bertqa.runtime import Precision

    monkeypatch.setattr(bertqa.runtime, "native_precision", lambda *args: (False, "this CPU (mocked) lacks bf16"))
    with caplog.at_level("WARNING", logger="bertqa"):
        resolved = Precision.resolve("bf16", torch.device("cpu"))
        qa = QuestionAnswerer.from_pretrained(qa_model_dir, device="cpu", precision=resolved)
    assert qa.precision is resolved
    assert [r.getMessage() for r in caplog.records].count(
        "this CPU (mocked) lacks bf16: bf16 will be emulated, far slower than fp32"
    ) == 1


def hf_pipeline_answer(model, tokenizer, question, context, max_answer_len=30):
    """The removed HF pipeline's decoding for a context that fits one window, written out: softmax over the
    context tokens and [CLS] (everything else masked), [CLS] then zeroed, P(start) * P(end) over spans
    end >= start, length <= max."""
    enc = tokenizer(question, context, return_offsets_mapping=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], token_type_ids=enc["token_type_ids"])
    keep = np.array([s == 1 for s in enc.sequence_ids(0)])
    keep[0] = True  # [CLS]
    probs = []
    for logits in (out.start_logits[0].numpy(), out.end_logits[0].numpy()):
        x = np.where(keep, logits.astype(np.float64), -10000.0)
        x = np.exp(x - x.max())
        x = x / x.sum()
        x[0] = 0.0
        probs.append(x)
    outer = np.tril(np.triu(probs[0][:, None] * probs[1][None, :]), max_answer_len - 1)
    s, e = np.unravel_index(outer.argmax(), outer.shape)
    offsets = enc["offset_mapping"][0]
    start, end = int(offsets[s][0]), int(offsets[e][1])
    return {"score": float(outer[s, e]), "start": start, "end": end, "answer": context[start:end]}


def test_scores_match_the_hf_pipeline_on_one_window(qa, qa_model_dir, tiny_squad):
    transformers = pytest.importorskip("transformers")
    model = transformers.BertForQuestionAnswering.from_pretrained(str(qa_model_dir)).eval()
    tokenizer = transformers.BertTokenizerFast(tokenizer_file=str(qa_model_dir / "tokenizer.json"))
    for question, context, _, _ in questions(tiny_squad)[:8]:
        ours, ref = qa(question, context), hf_pipeline_answer(model, tokenizer, question, context)
        assert (ours["answer"], ours["start"], ours["end"]) == (ref["answer"], ref["start"], ref["end"])
        assert ours["score"] == pytest.approx(ref["score"], rel=1e-4)


def test_handle_impossible_answer_applies_the_v2_null_rule(tiny_dir, tiny_squad, monkeypatch):
    """The null answer wins exactly where evaluate's SQuAD v2.0 rule (threshold 0) predicts no answer."""
    from bertqa.inference import predict_logits

    qa = QuestionAnswerer.from_pretrained(tiny_dir, device="cpu", precision="fp32")
    qs = questions(tiny_squad)
    examples = [Example(qid, q, c, [], []) for q, c, _, qid in qs]
    features = featurize(examples, qa.tokenizer, 64, 16, 32)  # short windows: several per context
    start, end = predict_logits(qa.model, features, np.arange(len(features)), 32, qa.device)
    answers = qa([q for q, *_ in qs], [c for _, c, *_ in qs], handle_impossible_answer=True, max_seq_len=64,
                 doc_stride=16, max_question_len=32)  # fmt: skip
    assert rank_answers(examples, features, start, end, 1, 30, True, qa.tokenizer.in_word) == [[a] for a in answers]
    # Make [CLS] likelier in every window of some examples, by amounts around the best span's margin.
    rng = np.random.default_rng(0)
    boost = rng.uniform(-2, 12, len(examples))[features.example_index]
    start[:, 0] += boost
    end[:, 0] += boost
    preds, _, _ = postprocess(examples, features, start, end, 20, 30, version_2=True)
    ranked = rank_answers(examples, features, start, end, 2, 30, True)
    nulls = [r[0]["answer"] == "" for r in ranked]
    assert nulls == [preds[qid] == "" for *_, qid in qs]
    assert 0 < sum(nulls) < len(nulls)
    # The null answer is one of the ranked answers, never a duplicate, and the runner-up is a real span.
    assert all(r[1]["answer"] != "" for r in ranked if r[0]["answer"] == "")
    # The same through the API (the tiny model's own logits never make [CLS] win): the flag reaches the ranking.
    monkeypatch.setattr(bertqa.qa, "predict_logits", lambda *args, **kwargs: (start.copy(), end.copy()))
    asked = dict(max_seq_len=64, doc_stride=16, max_question_len=32)
    pairs = ([q for q, *_ in qs], [c for _, c, *_ in qs])
    assert [a["answer"] == "" for a in qa(*pairs, handle_impossible_answer=True, **asked)] == nulls
    assert all(a["answer"] for a in qa(*pairs, handle_impossible_answer=False, **asked))


def test_predict_writes_the_api_answers_not_widened_to_words_and_ask_widens_them_or_not(
    qa, qa_model_dir, tiny_squad, tmp_path, run_here, monkeypatch
):
    """predict (and evaluate) write the spans as the model picks them, as run_squad.py does; the API and ask widen
    an answer that ends inside a word to the whole word, unless told not to (align_to_words=False,
    --no-align-to-words), which gives predict's text. Logits made from the windows' tokens, so that some of the
    best spans start or end on a word piece."""
    import bertqa.evaluate

    def logits(model, features, indices, *args, **kwargs):
        ids = features.input_ids[indices].astype(np.float64)
        pos = np.arange(features.max_seq_length)
        return np.sin(ids * 0.37 + pos * 0.011) * 6, np.cos(ids * 0.53 - pos * 0.017) * 6

    monkeypatch.setattr(bertqa.qa, "predict_logits", logits)
    monkeypatch.setattr(bertqa.evaluate, "predict_logits", logits)
    out = tmp_path / "pred.json"
    r = run_here("predict", "--model", qa_model_dir, "--input", tiny_squad, "--output", out, "--precision", "fp32",
                 "--cache-dir", "none")  # fmt: skip
    assert r.returncode == 0, r.stderr
    predicted = json.loads(out.read_text())
    qs = questions(tiny_squad)
    pairs = ([q for q, *_ in qs], [c for _, c, *_ in qs])
    plain = [a["answer"] for a in qa(*pairs, align_to_words=False)]
    widened = [a["answer"] for a in qa(*pairs)]
    assert plain == [predicted[qid] for *_, qid in qs]
    inside = [i for i, (p, w) in enumerate(zip(plain, widened)) if p != w]
    assert inside and all(plain[i] in widened[i] for i in inside)
    question, context = pairs[0][inside[0]], pairs[1][inside[0]]
    for flag, want in (((), widened[inside[0]]), (("--no-align-to-words",), plain[inside[0]])):
        r = run_here("ask", "--model", qa_model_dir, "--question", question, "--context", context, *flag)
        assert r.returncode == 0 and r.stdout == want + "\n", r.stderr


def test_bad_input_is_a_one_line_value_error(qa):
    cases = [
        (dict(question="", context="Some text."), "question is empty"),
        (dict(question="\u200b\x00", context="Some text."), "question is empty"),  # gives the model no token
        (dict(question="Who?", context="   "), "context is empty"),
        (dict(question=3, context="Some text."), "question must be a string"),
        (dict(question=["a?", "b?"], context=["x", "y", "z"]), "2 questions but 3 contexts"),
        (dict(question="Who?", context="Some text.", top_k=0), "top_k must be a positive integer"),
        (dict(question="Who?", context="Some text.", max_seq_len=1024), "exceeds the model's 512"),
        (
            dict(question="Who?", context="Some text.", max_seq_len=100, doc_stride=40, max_question_len=64),
            "doc_stride 40 exceeds the 33 context tokens a window holds",
        ),  # fmt: skip
        (dict(question="Who?", context="Some text.", max_seq_len=60, max_question_len=64), "leaves no context tokens"),
        (dict(question="Who?", context="Some text.", max_seq_len=4), "max_seq_len 4 holds no question and context"),
        (dict(question="Who?", context="Some text.", max_seq_len="384"), "max_seq_len must be a positive integer"),
        (dict(question=[{"question": "Who?", "context": "Me."}, "What?"]), "input 1: expected a"),
        (dict(question={"question": "Who?", "context": "Me."}, context="You."), "carries its own context"),
        (dict(question={"question": "Who?"}), "^the dict has no 'context' key"),
        # Not read as lists: a set has no order (nor has a pairing of two), a mapping is not its keys, a file
        # not its lines, a 0-d array not a list.
        (dict(question={"Who?", "What?"}, context=["Me.", "It."]), "^input 0: question must be a string, not set$"),
        (
            dict(question=collections.UserDict(question="Who?", context="Me.")),
            "^question must be a string, not UserDict",
        ),
        (dict(question="Who?", context=io.StringIO("Me.\nYou.")), "^context must be a string, not StringIO$"),
        (dict(question=np.array("Who?"), context="Me."), "^question must be a string, not ndarray$"),
        (
            dict(question=[{"question": "Who?", "context": "Me."}, {"text": "Me."}]),
            "input 1: the dict has no 'question'",
        ),
        (dict(question=[{"question": "Who?", "context": "Me."}], context="You."), "carries its own context"),
        (dict(question="Who?", context="Some text.", align_to_words="no"), "align_to_words must be True or False"),
        (dict(question="Who?", context="Some text.", handle_impossible_answer=1), "handle_impossible_answer must be"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message) as e:
            qa(**kwargs)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("given", "positions", "expected"),
    [
        ((None, None, None), 512, (384, 128, 64)),  # the pipeline's defaults
        ((None, None, None), 256, (256, 128, 64)),  # a model of fewer positions: its own length
        ((192, None, None), 512, (192, 96, 64)),  # half the window, as the pipeline
        ((100, None, 64), 512, (100, 33, 64)),  # no more than a window's context tokens (doc_stride is a step here)
        ((200, 50, 64), 512, (200, 50, 64)),  # given, kept
        # Unset, the question's limit leaves a short window room for its context: at 64 tokens a 64-token
        # limit was refused, and at 68 it left windows of one context token each, one token apart.
        ((64, None, None), 512, (64, 31, 30)),
        ((68, None, None), 512, (68, 33, 32)),
        ((None, None, None), 64, (64, 31, 30)),  # a model of 64 positions answers with the defaults
        ((130, None, None), 512, (130, 64, 63)),
        ((131, None, None), 512, (131, 64, 64)),  # from 131 tokens on, the 64 of the pipeline
    ],
)
def test_unset_window_settings_take_the_pipelines_defaults(given, positions, expected):
    assert window_settings(*given, positions) == expected


def test_a_model_of_fewer_than_384_positions_answers_with_the_defaults(qa, tiny_squad, monkeypatch):
    question, context, _, _ = questions(tiny_squad)[13]
    long = FILLER[:2000] + context
    monkeypatch.setattr(qa.model.config, "max_position_embeddings", 256)
    r = qa(question, long)  # was refused: "max_seq_len 384 exceeds the model's 256"
    assert r == qa(question, long, max_seq_len=256, doc_stride=128) and long[r["start"] : r["end"]] == r["answer"]
    # max_seq_len alone: doc_stride follows it (was refused: 128 left no room in a 160-token window)
    assert qa(question, long, max_seq_len=160) == qa(question, long, max_seq_len=160, doc_stride=80)
    # A short window alone: the question's limit follows it (was refused: a 64-token limit left no room in 64)
    short = qa(question, long, max_seq_len=64)
    assert short == qa(question, long, max_seq_len=64, doc_stride=31, max_question_len=30)
    assert long[short["start"] : short["end"]] == short["answer"]


def test_a_checkpoint_without_a_qa_head_is_refused(minilm_dir, tmp_path, run_here):
    with pytest.raises(CheckpointError, match="no fine-tuned question-answering head"):
        QuestionAnswerer.from_pretrained(minilm_dir, device="cpu")
    for args in (["ask", "--model", minilm_dir, "--question", "Who?", "--context", "Nobody."],
                 ["evaluate", "--model", minilm_dir, "--predict-file", minilm_dir / "config.json", "--output-dir",
                  tmp_path / "out"]):  # fmt: skip
        r = run_here(*args)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 1 and len(lines) == 1 and "no fine-tuned question-answering head" in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


def test_ask_command(qa_model_dir, tiny_squad, tmp_path, run_here):
    qs = questions(tiny_squad)
    question, context, gold, _ = qs[4]
    r = run_here("ask", "--model", qa_model_dir, "--question", question, "--context", context, "--precision", "fp32")
    assert r.returncode == 0 and r.stdout == gold + "\n", r.stderr
    (tmp_path / "context.txt").write_text(context)
    r = run_here("ask", "--model", qa_model_dir, "--question", question, "--context-file", tmp_path / "context.txt",
                "--json", "--top-k", 3)  # fmt: skip
    answers = json.loads(r.stdout)
    assert (
        len(answers) == 3 and answers[0]["answer"] == gold and context[answers[0]["start"] : answers[0]["end"]] == gold
    )
    # Questions from stdin: one answer per line, in order.
    same = [(q, g) for q, c, g, _ in qs if c == context]
    r = run_cli("ask", "--model", qa_model_dir, "--context", context, stdin="".join(q + "\n" for q, _ in same))
    assert r.returncode == 0 and r.stdout.splitlines() == [g for _, g in same], r.stderr
    for args, message in ((["--question", "Who?"], "exactly one of --context or --context-file"),
                          (["--question", "Who?", "--context-file", tmp_path / "none.txt"], "none.txt"),
                          (["--question", "Who?", "--context-file", ""], "--context-file : No such file"),
                          (["--question", " ", "--context", context], "--question: empty")):  # fmt: skip
        r = run_here("ask", "--model", qa_model_dir, *args)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 1 and len(lines) == 1 and message in lines[0], r.stderr


def test_ask_takes_the_windows_of_the_api_by_evaluates_flags(qa, qa_model_dir, tiny_squad, run_here):
    """--max-seq-length, --doc-stride and --max-query-length: the API's window parameters, defaults and checks,
    each error naming the flag."""
    question, context, gold, _ = questions(tiny_squad)[4]
    short = dict(max_seq_len=48, doc_stride=8, max_question_len=12)  # several windows for the context
    want = qa(question, context, top_k=3, **short)
    assert want != qa(question, context, top_k=3)  # (the windows change the scores)
    r = run_here("ask", "--model", qa_model_dir, "--question", question, "--context", context, "--precision", "fp32",
                 "--top-k", 3, "--json", "--max-seq-length", 48, "--doc-stride", 8,
                 "--max-query-length", 12)  # fmt: skip
    assert r.returncode == 0 and json.loads(r.stdout) == want, r.stderr
    positions = qa.config.max_position_embeddings
    for args, message in (
        (["--doc-stride", 0], "--doc-stride must be a positive integer, got 0"),
        (["--max-seq-length", positions + 1], f"--max-seq-length {positions + 1} exceeds the model's {positions} "),
        (["--max-seq-length", 40, "--max-query-length", 37], "--max-seq-length 40 leaves no context tokens after a "
                                                             "37-token question (--max-query-length)"),
        (["--max-seq-length", 40, "--doc-stride", 30],
         "--doc-stride 30 exceeds the 19 context tokens a window holds: --max-seq-length 40 less 18 question tokens "
         "(--max-query-length, by default) and 3 special tokens"),
    ):  # fmt: skip
        r = run_here("ask", "--model", qa_model_dir, "--question", question, "--context", context, *args)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 1 and len(lines) == 1 and message in lines[0], r.stderr


def test_ask_offsets_index_the_file_and_questions_end_at_newlines_only(qa_model_dir, tiny_squad, tmp_path, run_here):
    """A CRLF --context-file's offsets count its "\r" (read with newline translation, they fell short by one a line);
    a piped question holding U+2028 (a line break to str.splitlines) is one question, with one answer line."""
    question, context, gold, _ = questions(tiny_squad)[4]
    text = "A first line.\r\nA second one.\r\n" + context
    (tmp_path / "crlf.txt").write_bytes(text.encode())
    r = run_here("ask", "--model", qa_model_dir, "--question", question, "--context-file", tmp_path / "crlf.txt",
                "--json")  # fmt: skip
    answer = json.loads(r.stdout)
    assert r.returncode == 0 and answer["answer"] == gold == text[answer["start"] : answer["end"]], r.stderr
    r = run_cli("ask", "--model", qa_model_dir, "--context", context, stdin=f"{question}\u2028Again?\n{question}\n")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 2 and r.stdout.splitlines()[1] == gold, r.stderr
    # "\r\n" and a lone "\r" end a line too (stdin is read untranslated): three questions, three answer lines.
    r = run_cli("ask", "--model", qa_model_dir, "--context", context, stdin=f"{question}\r{question}\r\n{question}")
    assert r.returncode == 0 and r.stdout.splitlines() == [gold] * 3, r.stderr


def test_ask_takes_the_config_of_weights_without_one(qa_model_dir, tiny_squad, tmp_path, run_here):
    """The error for weights without config.json says to pass --config: ask (and serve) take it."""
    question, context, gold, _ = questions(tiny_squad)[4]
    shutil.copytree(qa_model_dir, tmp_path / "bare", ignore=shutil.ignore_patterns("config.json"))
    r = run_here("ask", "--model", tmp_path / "bare", "--question", question, "--context", context)
    assert r.returncode == 1 and "--config" in r.stderr
    r = run_here("ask", "--model", tmp_path / "bare", "--config", qa_model_dir / "config.json", "--question", question,
                "--context", context, "--trust-pickle")  # fmt: skip
    assert r.returncode == 0 and r.stdout == gold + "\n", r.stderr


def test_predict_command_on_a_file_without_answers(qa_model_dir, tiny_squad, tmp_path, run_here):
    doc = json.loads(tiny_squad.read_text())
    for article in doc["data"]:
        for p in article["paragraphs"]:
            for q in p["qas"]:
                del q["answers"]
    unanswered = tmp_path / "questions.json"
    unanswered.write_text(json.dumps(doc))
    out = tmp_path / "pred.json"
    (tmp_path / "pred.null_odds.json").write_text("{}")  # an earlier v2.0 prediction's: not these predictions'
    r = run_here("predict", "--model", qa_model_dir, "--input", unanswered, "--output", out, "--cache-dir", "none",
                "--no-progress", "--max-seq-length", 128, "--doc-stride", 64, "--max-query-length", 32)  # fmt: skip
    assert r.returncode == 0, r.stderr
    preds = json.loads(out.read_text())
    nbest = json.loads((tmp_path / "pred.nbest.json").read_text())
    assert set(preds) == set(nbest) == {qid for *_, qid in questions(tiny_squad)}
    assert not (tmp_path / "pred.null_odds.json").exists()
    scored = json.loads(run_here("score", tiny_squad, out).stdout)
    assert scored == {"exact_match": 100.0, "f1": 100.0}
    r = run_here("predict", "--model", qa_model_dir, "--input", unanswered, "--output", tmp_path / "pred.txt")
    assert r.returncode == 1 and "--output" in r.stderr and not (tmp_path / "pred.txt").exists()
    # (review) Through a link (latest.json -> runs/x/pred.json) the set lands together beside the target: the n-best
    # went beside the link, and the target's earlier n-best stayed beside the new predictions.
    (tmp_path / "runs" / "x").mkdir(parents=True)
    for name in ("pred.json", "pred.nbest.json"):
        (tmp_path / "runs" / "x" / name).write_text("{}")
    (tmp_path / "latest.json").symlink_to(Path("runs", "x", "pred.json"))
    r = run_here("predict", "--model", qa_model_dir, "--input", unanswered, "--output", tmp_path / "latest.json",
                 "--cache-dir", "none", "--no-progress", "--max-seq-length", 128, "--doc-stride", 64,
                 "--max-query-length", 32)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "runs" / "x" / "pred.json").read_text()) == preds
    assert json.loads((tmp_path / "runs" / "x" / "pred.nbest.json").read_text()) == nbest
    assert (tmp_path / "latest.json").is_symlink() and not (tmp_path / "latest.nbest.json").exists()


def test_help_and_score_do_not_import_torch(tiny_squad, tmp_path):
    preds = tmp_path / "p.json"
    preds.write_text(json.dumps({qid: gold for _, _, gold, qid in questions(tiny_squad)}))
    code = ("import sys, contextlib, io\nfrom bertqa.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    assert main(['score', {str(tiny_squad)!r}, {str(preds)!r}]) == 0\n"
            "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_align_to_words_widens_word_pieces_only(minilm_dir):
    from bertqa.tokenizer import load_tokenizer

    in_word = load_tokenizer(minilm_dir).in_word
    text = "The unbelievable gear-box, 北京大学 and naïve café."
    assert align_to_words(text, text.index("believ"), text.index("believ") + 6, in_word) == (4, 16)  # "unbelievable"
    box = text.index("box")
    assert text[slice(*align_to_words(text, box, box + 3, in_word))] == "box"  # "-" splits words
    assert text[slice(*align_to_words(text, text.index("京"), text.index("京") + 1, in_word))] == "京"  # one per word
    i = text.index("ïve")
    assert text[slice(*align_to_words(text, i, i + 2, in_word))] == "naïve"
    assert align_to_words(text, 0, 3, in_word) == (0, 3)
    assert align_to_words(text, 0, len(text), in_word) == (0, len(text))
    # (mutation review) From inside the context's first word, to its first character; across a soft hyphen (which
    # the text cleaning deletes) after that first character too.
    assert align_to_words("Xanadu rings", 1, 6, in_word) == (0, 6)
    assert align_to_words("x\u00adylophone rings", 2, 10, in_word) == (0, 10)


@pytest.mark.parametrize("lower_case", [True, False])
def test_align_to_words_gives_the_tokenizers_own_words(minilm_dir, lower_case):
    # The pipeline widened a span to its words' characters (Encoding.word_to_chars): the same for every token here.
    # The text cleaning deletes control and format characters (a BOM, direction marks, \x1c, \x0c, \x85, NUL,
    # U+FFFD): at a word's edge they are in no word; inside one, the word runs on across them.
    from bertqa.tokenizer import load_tokenizer

    # Words as the tokenizer's own tables and normaliser split them, not Python's: uncased, accent stripping turns
    # "≠" and "≮" into "=" and "<", punctuation; U+166D is punctuation to `tokenizers`, and characters newer than
    # its tables (U+2E43, U+0890, unassigned ones) are neither punctuation nor deleted.
    text = ("\u200eDenver\u200e won; Den\u200bver, a\x1cb c\x0cd e\x85f \ufeffBroncos\u200b. x\x00y \ufffdz "
            "\U0002b830q\U0002b930r 北京大学 gear-box \u2060end\u00ad!\u200f x≠y 5≮6 a\u166db c\u2e43d e\u0890f "
            "g\U0001fae8h i\u0378j")  # fmt: skip
    tok = load_tokenizer(minilm_dir, do_lower_case=lower_case)
    (enc,) = tok.tokenize([text])
    assert len(enc.ids) > 20 and len(set(enc.word_ids)) > 15
    for (start, end), word in zip(enc.offsets, enc.word_ids):
        assert align_to_words(text, start, end, tok.in_word) == enc.word_to_chars(word), text[start:end]


def test_a_context_without_tokens_gets_the_empty_answer(qa):
    for context in ("\u200b", "\ufffd\u200b"):  # not blank to str.strip(), yet no word piece
        assert qa("Who?", context) == {"score": 0.0, "start": 0, "end": 0, "answer": ""}
        assert qa("Who?", context, handle_impossible_answer=True)["answer"] == ""


def test_a_window_limit_refuses_oversized_work(qa, tiny_squad):
    question, context, gold, _ = questions(tiny_squad)[0]
    qa.max_windows = 3
    try:
        with pytest.raises(ValueError, match="need .* windows, more than the limit of 3"):
            qa(question, FILLER + context, max_seq_len=128, doc_stride=64, max_question_len=32)
        assert qa(question, context)["answer"] == gold
    finally:
        qa.max_windows = None


def test_the_window_limit_is_checked_before_any_window_is_built(qa):
    """256 questions about a long context at doc_stride 1 would need 3 GB of windows (a 100 KB request)."""
    import tracemalloc

    from bertqa.squad.data import Example
    from bertqa.squad.features import featurize

    examples = [Example(str(i), "Who?", "Ada Lovelace wrote a program. " * 400, [], []) for i in range(256)]
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"need \d+ windows, more than the limit of 2048"):
            featurize(examples, qa.tokenizer, 384, 1, 64, max_windows=2048)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20


def every_pair_answers(examples, features, start, end, top_k, max_answer_len, in_word):
    """The reference search, as the pipeline's: every valid (start, end) pair of every window scored, the
    best score of each distinct answer text kept. [(answer, start, end)] per example, best first."""
    best = [{} for _ in examples]
    for r, e in enumerate(features.example_index.tolist()):
        context = examples[e].context
        for i in range(start.shape[1]):
            if features.offsets[r, i, 0] < 0 or not features.max_context[r, i]:
                continue
            for j in range(i, min(i + max_answer_len, start.shape[1])):
                if features.offsets[r, j, 0] < 0:
                    continue
                cs, ce = int(features.offsets[r, i, 0]), int(features.offsets[r, j, 1])
                if in_word is not None:
                    cs, ce = align_to_words(context, cs, ce, in_word)
                score = float(start[r, i]) + float(end[r, j])
                if context[cs:ce] not in best[e] or score > best[e][context[cs:ce]][0]:
                    best[e][context[cs:ce]] = (score, cs, ce)
    return [[(text, cs, ce) for text, (_, cs, ce) in sorted(b.items(), key=lambda kv: -kv[1][0])[:top_k]]
            for b in best]  # fmt: skip


def late_starts_early_ends(features, seed=0, slope=0.3):
    """Logits where the likeliest starts come after the likeliest ends: the best valid pairs lie far past
    each window's top-20 starts and ends."""
    rng = np.random.default_rng(seed)
    pos = np.arange(features.max_seq_length, dtype=np.float64)
    noise = rng.normal(size=(2, len(features), features.max_seq_length))
    return slope * pos + noise[0], -slope * pos + noise[1]


@pytest.mark.parametrize("align_words", [False, True])
def test_the_search_finds_the_best_pairs_of_all_as_the_pipeline(minilm_dir, tiny_squad, monkeypatch, align_words):
    import importlib

    module = importlib.import_module("bertqa.squad.postprocess")  # (bertqa.squad.postprocess is the function)
    from bertqa.tokenizer import load_tokenizer

    qs = questions(tiny_squad)
    examples = [Example(qid, q, c, [], []) for q, c, _, qid in qs]
    tok = load_tokenizer(minilm_dir)
    features = featurize(examples, tok, 40, 8, 16)
    assert np.bincount(features.example_index).min() >= 3  # several windows per context, some spans cross them
    start, end = late_starts_early_ends(features)
    in_word = tok.in_word if align_words else None
    for top_k, max_len in ((1, 30), (3, 8), (25, 30), (5, 2)):
        expected = every_pair_answers(examples, features, start, end, top_k, max_len, in_word)
        ranked = rank_answers(examples, features, start, end, top_k, max_len, False, in_word)
        assert [[(a["answer"], a["start"], a["end"]) for a in r] for r in ranked] == expected
        # Scored a window at a time (an example's windows split over groups), the answers are the same.
        monkeypatch.setattr(module, "PAIR_BUDGET", 1)
        assert rank_answers(examples, features, start, end, top_k, max_len, False, in_word) == ranked
        monkeypatch.undo()


def test_scores_are_probabilities_when_an_answer_ends_outside_its_max_context_region(minilm_dir, tiny_squad):
    """An answer may end on a token whose max-context window is another: its end logit from this window,
    far above that token's logit elsewhere, scored above 1 against a normaliser of max-context logits."""
    from bertqa.tokenizer import load_tokenizer

    qs = questions(tiny_squad)
    examples = [Example(qid, q, c, [], []) for q, c, _, qid in qs]
    features = featurize(examples, load_tokenizer(minilm_dir), 40, 8, 16)
    in_context = features.offsets[:, :, 0] >= 0
    # A window with a max-context token i followed, within 10 tokens, by a context token j that is not.
    r, i, j = next((r, i, j) for r in range(len(features)) for i in np.flatnonzero(features.max_context[r])
                   for j in range(i + 1, i + 10) if in_context[r, j] and not features.max_context[r, j])  # fmt: skip
    start, end = np.zeros(features.input_ids.shape), np.zeros(features.input_ids.shape)
    start[r, i], end[r, j] = 30.0, 30.0
    e = features.example_index[r]
    ranked = rank_answers(examples, features, start, end, top_k=3, handle_impossible_answer=True)
    top = ranked[e][0]
    assert (top["start"], top["end"]) == (features.offsets[r, i, 0], features.offsets[r, j, 1])
    assert 0.99 < top["score"] <= 1.0
    late = late_starts_early_ends(features)
    for answers in rank_answers(examples, features, *late, top_k=5, handle_impossible_answer=True):
        assert all(0.0 <= a["score"] <= 1.0 for a in answers) and sum(a["score"] for a in answers) <= 1.0 + 1e-9


def test_word_pieces_of_one_character_each_count_in_the_softmax(minilm_dir):
    """A Hangul syllable becomes several word pieces with the same character offsets; each is a token of the
    softmax, so a one-window score is still exactly the pipeline's P(start) * P(end)."""
    from bertqa.tokenizer import load_tokenizer

    examples = [Example("k", "어디?", "한국어 사전은 서울에 있다. " * 3, [], [])]
    features = featurize(examples, load_tokenizer(minilm_dir), 384, 128, 64)
    assert len(features) == 1
    ctx = np.flatnonzero(features.offsets[0, :, 0] >= 0)
    assert len(set(features.offsets[0, ctx, 0].tolist())) < len(ctx)  # pieces that share a character
    start, end = np.random.default_rng(0).normal(size=(2, 1, 384))

    def logsumexp(x):
        return np.log(np.exp(x).sum())

    log_z = logsumexp(np.r_[start[0, ctx], start[0, 0]]) + logsumexp(np.r_[end[0, ctx], end[0, 0]])
    best = max(start[0, i] + end[0, j] for i in ctx for j in ctx if i <= j < i + 30)
    top = rank_answers(examples, features, start, end)[0][0]
    assert top["score"] == pytest.approx(np.exp(best - log_z), rel=1e-9)


def test_scores_over_several_windows_are_the_documented_probabilities(minilm_dir):
    """(mutation review) Restated from the module docstring over windows that overlap: P(start) a softmax over each
    context token's start logit once (its max-context window's) and the null's ([CLS] of the window where start +
    end is lowest), P(end) over each token's highest end logit and the same null's."""
    from bertqa.tokenizer import load_tokenizer

    context = " ".join(str(n) for n in range(100))  # one token a word
    examples = [Example("n", "what ?", context, [], [])]
    features = featurize(examples, load_tokenizer(minilm_dir), 32, 8, 8)
    rows = range(len(features))
    assert len(features) > 5
    rng = np.random.default_rng(3)
    start, end = rng.normal(size=(2, *features.input_ids.shape))
    start[:, 0] = end[:, 0] = np.arange(len(features)) % 3 + 3.0  # [CLS] lowest in a middle window, and a null
    start[2, 0] = end[2, 0] = 2.5  # answer that ranks among the spans
    cols = [np.flatnonzero(features.offsets[r, :, 0] >= 0) for r in rows]
    token = {(r, c): int(features.offsets[r, c, 0]) for r in rows for c in cols[r]}  # its character start
    start_of = {token[r, c]: start[r, c] for r in rows for c in cols[r] if features.max_context[r, c]}
    end_of = {}
    for (r, c), t in token.items():
        end_of[t] = max(end_of.get(t, -np.inf), end[r, c])
    assert len(start_of) == len(end_of) == 100
    w = int(np.argmin(start[:, 0] + end[:, 0]))
    assert w == 2
    log_z = np.log(np.exp([*start_of.values(), start[w, 0]]).sum()) + np.log(
        np.exp([*end_of.values(), end[w, 0]]).sum()
    )
    best = max(start[r, i] + end[r, j] for r in rows for i in cols[r] for j in cols[r]
               if features.max_context[r, i] and i <= j < i + 30)  # fmt: skip
    ranked = rank_answers(examples, features, start, end, top_k=100, handle_impossible_answer=True)[0]
    assert ranked[0]["score"] == pytest.approx(np.exp(best - log_z), rel=1e-9)
    (null,) = [a for a in ranked if a["answer"] == ""]
    assert null["score"] == pytest.approx(np.exp(start[w, 0] + end[w, 0] - log_z), rel=1e-9)


def test_a_null_answer_that_ties_the_best_span_loses_to_it(minilm_dir):
    """(mutation review) The null answer wins when it beats every span, as evaluate's v2.0 rule (threshold 0)
    predicts a span on a tie: the same logits give the span first in both."""
    from bertqa.tokenizer import load_tokenizer

    examples = [Example("t", "where ?", "The capital is Paris in France .", [], [])]
    features = featurize(examples, load_tokenizer(minilm_dir), 384, 128, 64)
    col = int(np.flatnonzero(features.offsets[0, :, 0] == examples[0].context.index("Paris"))[0])
    start, end = np.full((2, 1, 384), -20.0)
    start[0, col] = end[0, col] = 4.0
    start[0, 0] = end[0, 0] = 4.0  # null 8 = the span's 8
    ranked = rank_answers(examples, features, start, end, top_k=2, handle_impossible_answer=True)[0]
    assert [a["answer"] for a in ranked] == ["Paris", ""] and ranked[0]["score"] == ranked[1]["score"]
    assert postprocess(examples, features, start, end, version_2=True)[0] == {"t": "Paris"}


def test_a_deep_search_stays_within_its_pair_budget(minilm_dir, monkeypatch):
    """Logits that send the search to the last column of every window: scored in groups of PAIR_BUDGET
    pairs, not all at once (76 windows of 384 tokens: 11 M pairs, about 200 MB)."""
    import importlib
    import tracemalloc

    module = importlib.import_module("bertqa.squad.postprocess")  # (bertqa.squad.postprocess is the function)
    from bertqa.tokenizer import load_tokenizer

    examples = [Example(str(i), "Who?", f"Ada Lovelace wrote program {i}. " * 400, [], []) for i in range(4)]
    features = featurize(examples, load_tokenizer(minilm_dir), 384, 128, 64)
    assert len(features) > 70
    start, end = late_starts_early_ends(features, slope=1.0)
    monkeypatch.setattr(module, "PAIR_BUDGET", 1 << 16)
    tracemalloc.start()
    try:
        ranked = rank_answers(examples, features, start, end, 2, 30)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 48 * 2**20
    assert [[(a["answer"], a["start"], a["end"]) for a in r] for r in ranked] == every_pair_answers(
        examples, features, start, end, 2, 30, None
    )


def test_nan_logits_are_refused_naming_the_window(zebra_nan_dir, tiny_squad, tmp_path, run_here):
    from bertqa.inference import NonFiniteLogits

    qa = QuestionAnswerer.from_pretrained(zebra_nan_dir, device="cpu", precision="fp32")
    assert qa("Who won?", "Ada won the race.")["answer"]  # the weights are fine elsewhere
    with pytest.raises(NonFiniteLogits, match=r"NaN or infinite for window 2: its weights hold NaN"):
        qa("Who won?", ["Ada won.", "Bo won the race.", "The zebra won.", "Cy won."])
    # The commands: one line, exit 1, and no partial output.
    r = run_here("ask", "--model", zebra_nan_dir, "--question", "Who won?", "--context", "The zebra won.")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("bertqa: error: the model's logits")
    doc = json.loads(tiny_squad.read_text())
    doc["data"][0]["paragraphs"][0]["context"] += " A zebra watched."
    (tmp_path / "zebra.json").write_text(json.dumps(doc))
    r = run_here("evaluate", "--model", zebra_nan_dir, "--predict-file", tmp_path / "zebra.json", "--output-dir",
                tmp_path / "eval", "--max-seq-length", 128, "--doc-stride", 32, "--max-query-length", 32,
                "--cache-dir", "none")  # fmt: skip
    line = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and "NaN or infinite for window" in line and "internal error" not in line
    assert not (tmp_path / "eval").exists() or not any((tmp_path / "eval").iterdir())


def test_an_integer_device_is_the_pipelines(monkeypatch, qa_model_dir):
    """(review) As in HF's pipeline, device=-1 is the CPU and device=N the accelerator's index N: from_pretrained
    read 0 as a device name and refused it ("Invalid device string: '0'")."""
    import bertqa.distributed

    assert QuestionAnswerer.from_pretrained(qa_model_dir, device=-1, precision="fp32").device == torch.device("cpu")

    class Asked(Exception):
        pass

    def resolve_device(name, local_rank=0, flag="--device"):
        raise Asked(name, local_rank)

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(bertqa.distributed, "resolve_device", resolve_device)
    for accelerator, device, name in (("cuda", 0, "cuda:0"), ("xpu", 1, "xpu:1"), ("cpu", 0, "cuda:0"), ("cuda", -2, "cpu"),
                                      ("cuda", "cuda:1", "cuda:1"), ("cuda", torch.device("cpu"), "cpu")):  # fmt: skip
        monkeypatch.setattr(bertqa.distributed, "default_device", lambda accelerator=accelerator: accelerator)
        with pytest.raises(Asked) as asked:
            QuestionAnswerer.from_pretrained(qa_model_dir, device=device)
        assert asked.value.args == (name, 0)
    # "cuda" alone: the current GPU, as torch reads it (torch.cuda.set_device's); under torchrun this process's,
    # as the CLI reads it.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    for local_rank, asked_for in ((None, ("cuda:2", 0)), ("3", ("cuda", 3))):
        if local_rank is not None:
            monkeypatch.setenv("LOCAL_RANK", local_rank)
        for device in ("cuda", torch.device("cuda")):
            with pytest.raises(Asked) as asked:
                QuestionAnswerer.from_pretrained(qa_model_dir, device=device)
            assert asked.value.args == asked_for
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"^device cuda:256: device index above 127, the highest torch can hold$"):
        QuestionAnswerer.from_pretrained(qa_model_dir, device=256)  # (torch.device("cuda:256") is cuda:0)


def test_two_answerers_never_run_their_precision_scopes_at_once(monkeypatch, minilm_dir):
    """(review) Each had a lock of its own: in two threads, one's scope (its torch flags) began inside the other's
    and outlived it, so one ran in the other's precision and the user's flags were not restored."""
    import threading

    from bertqa.runtime import Precision

    model = BertForQuestionAnswering(BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=32))  # fmt: skip
    tok, fp32 = load_tokenizer(minilm_dir), Precision.resolve("fp32", torch.device("cpu"))
    a, b = QuestionAnswerer(model, tok, "cpu", fp32), QuestionAnswerer(model, tok, "cpu", fp32)
    inside, first_in, release = [], threading.Event(), threading.Event()
    real = bertqa.qa.predict_logits

    def predict_logits(*args, **kwargs):
        inside.append(threading.current_thread().name)
        if len(inside) == 1:
            first_in.set()
            release.wait(10)
        try:
            return real(*args, **kwargs)
        finally:
            inside.append("done")

    monkeypatch.setattr(bertqa.qa, "predict_logits", predict_logits)
    threads = [
        threading.Thread(target=qa, args=("Who?", "Ada wrote it."), name=name, daemon=True)
        for qa, name in ((a, "a"), (b, "b"))
    ]
    threads[0].start()
    assert first_in.wait(10)
    threads[1].start()
    threads[1].join(0.5)
    assert threads[1].is_alive() and inside == ["a"]  # b waits for a's call to end
    release.set()
    for t in threads:
        t.join(10)
    assert inside == ["a", "done", "b", "done"]
    # A call inside another, in its thread (a should_stop asking another answerer), nests: it waited forever.
    monkeypatch.undo()
    asked = []

    def stop():
        if not asked:
            asked.append(b("Who?", "Ada wrote it.")["answer"])
        return False

    caller = threading.Thread(
        target=a.answer_pairs, args=([("Who?", "Ada wrote it.")],), kwargs={"should_stop": stop}, daemon=True
    )  # (a hang must not keep the test process alive)
    caller.start()
    caller.join(10)
    assert not caller.is_alive() and asked


def test_the_default_inference_batch_follows_the_device(monkeypatch, tmp_path, tiny_squad, minilm_dir):
    """Without a batch size, 32 windows a forward pass on a CPU and 128 on a CUDA GPU, in the Python API and in
    the evaluation path alike; a given one is kept (no GPU needed: nothing here runs on the device)."""
    import bertqa.distributed
    from bertqa import evaluate
    from bertqa.distributed import Dist
    from bertqa.inference import default_batch_size
    from bertqa.runtime import Precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 1)
    assert (default_batch_size(cpu), default_batch_size(cuda), default_batch_size("cuda")) == (32, 128, 128)
    assert default_batch_size("mps") == default_batch_size("xpu") == 32  # (mutation review) unmeasured: the CPU's
    fp32 = Precision.resolve("fp32", cpu)
    monkeypatch.setattr(bertqa.distributed, "api_device", lambda device: device)  # (no GPU runs a kernel here)
    model = BertForQuestionAnswering(BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=32))  # fmt: skip
    tok = load_tokenizer(minilm_dir)
    assert QuestionAnswerer(model, tok, cuda, fp32).batch_size == 128
    assert QuestionAnswerer(model, tok, cpu, fp32).batch_size == 32
    assert QuestionAnswerer(model, tok, cuda, fp32, batch_size=7).batch_size == 7
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        QuestionAnswerer(model, tok, cuda, fp32, batch_size=0)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="^device cuda:1: not usable here"):  # (a torch.device is checked too)
        QuestionAnswerer(model, tok, cuda, fp32)
    # (review) A path, or another library's model or tokenizer, failed at the first question (AttributeError);
    # a precision's or a device's name is read as from_pretrained reads it.
    for args, message in (((str(minilm_dir), tok), "model must be bertqa's BertForQuestionAnswering"),
                          ((model, tok.backend), "tokenizer must be bertqa's BertTokenizer")):  # fmt: skip
        with pytest.raises(TypeError, match=f"^{re.escape(message)}"):
            QuestionAnswerer(*args, cpu, fp32)
    named = QuestionAnswerer(model, tok, "cpu", "fp32")
    assert (named.device, named.precision.name) == (cpu, "fp32")
    assert named("Who?", "Ada wrote it.")["answer"]

    class Wrapped(torch.nn.Module):  # as DDP wraps a model (.module), passing no attribute through
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    assert QuestionAnswerer(Wrapped(model), tok, cpu, fp32)("Who?", "Ada wrote it.")["answer"]

    class Ran(Exception):
        pass

    def predict_logits(model, features, rows, batch_size, device, *args, **kwargs):
        raise Ran(batch_size, device)

    monkeypatch.setattr(evaluate, "predict_logits", predict_logits)
    for device, given, used in ((cuda, None, 128), (cpu, None, 32), (cuda, 5, 5)):
        cfg = evaluate.EvalConfig(model=str(tmp_path), predict_file=str(tiny_squad), output_dir=str(tmp_path / "out"),
                                  batch_size=given)  # fmt: skip
        cfg.validate()
        with pytest.raises(Ran) as ran:
            evaluate.run_inference(model, ({}, [], [0, 1, 2]), cfg, Dist(device=device), fp32)
        assert ran.value.args == (used, device)
    with pytest.raises(ValueError, match="--batch-size must be a positive integer, got 0"):
        evaluate.EvalConfig(
            model=str(tmp_path), predict_file=str(tiny_squad), output_dir="out", batch_size=0
        ).validate()


@pytest.mark.parametrize("pythonioencoding", [None, "latin-1"])
def test_ask_names_stdout_when_its_encoding_cannot_hold_the_answer(qa_model_dir, capsys, monkeypatch,
                                                                   pythonioencoding):  # fmt: skip
    """A Latin-1 locale (or a Windows code page, stdout redirected to a file) cannot write a CJK answer: one line
    naming stdout, its encoding and the way out, not the codec's message alone. (review) Where PYTHONIOENCODING
    set that encoding, PYTHONUTF8=1 changes nothing: not offered then."""
    from bertqa import cli

    if pythonioencoding is None:
        monkeypatch.delenv("PYTHONIOENCODING", raising=False)
    else:
        monkeypatch.setenv("PYTHONIOENCODING", pythonioencoding)
    monkeypatch.setattr(logging.getLogger("bertqa"), "handlers", [])
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BytesIO(), encoding="latin-1"))
    code = cli.main(["ask", "--model", str(qa_model_dir), "--question", "Where?", "--context", "東京 東京"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1, lines
    # By its code points: standard error, in the same encoding as a rule, could not show the characters either.
    way_out = r"PYTHONIOENCODING=utf-8 \(or PYTHONUTF8=1\)" if pythonioencoding is None else "PYTHONIOENCODING=utf-8"
    assert re.fullmatch(r"bertqa: error: stdout: its encoding, latin-1, cannot hold '(\\u[0-9a-f]{4}| )+'; set "
                        + way_out, lines[0]), lines  # fmt: skip


def test_a_null_score_threshold_v1_rules_do_not_use_is_named(tiny_squad, tmp_path, caplog, monkeypatch):
    """--null-score-diff-threshold on a file read as SQuAD v1.1 changed nothing, silently (`bertqa score` says so of
    its threshold): a user asking for null answers got none, and no word why."""
    from bertqa import evaluate
    from bertqa.distributed import Dist
    from bertqa.runtime import Precision

    class Ran(Exception):
        pass

    def predict_logits(*args, **kwargs):
        raise Ran

    monkeypatch.setattr(evaluate, "predict_logits", predict_logits)
    v1, v2 = {"version": "1.1"}, {"version": "v2.0"}
    for doc, flag, threshold, said in ((v1, None, -5.0, "no 'version' 2.x, no is_impossible question; "
                                        "--version-2-with-negative reads it as v2.0"),
                                       (v2, False, 1.0, "--no-version-2-with-negative"),
                                       (v1, None, 0.0, None), (v2, None, -5.0, None), (v1, True, -5.0, None)):  # fmt: skip
        cfg = evaluate.EvalConfig(model=str(tmp_path), predict_file=str(tiny_squad), output_dir=str(tmp_path / "out"),
                                  version_2_with_negative=flag, null_score_diff_threshold=threshold)  # fmt: skip
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="bertqa"), pytest.raises(Ran):
            evaluate.run_inference(
                None, (doc, [], [0]), cfg, Dist(device=torch.device("cpu")), Precision("fp32", torch.device("cpu"))
            )
        expected = [] if said is None else [
            f"{tiny_squad} is read as SQuAD v1.1 ({said}): --null-score-diff-threshold is not used"]  # fmt: skip
        assert [r.getMessage() for r in caplog.records] == expected, (doc, flag, threshold)


def test_a_note_stdout_cannot_hold_is_escaped_not_a_failure(qa_model_dir, tmp_path, capsys, monkeypatch):
    """A note naming a file (`convert`'s "wrote ...", predict's "N predictions -> ...") is printed after the file
    is written: in an ASCII stdout, one naming a folder "modèle" failed the command (exit 1), its output written."""
    from bertqa import cli

    monkeypatch.setattr(logging.getLogger("bertqa"), "handlers", [])
    out, stdout = tmp_path / "modèle", io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(stdout, encoding="ascii"))
    code = cli.main(["convert", str(qa_model_dir), str(out)])
    assert (code, capsys.readouterr().err) == (0, "") and (out / "model.safetensors").is_file()
    shown = str(out).replace("è", "\\xe8")
    assert f"bertqa: wrote {shown} (" in stdout.getvalue().decode("ascii")


def test_check_pairs_reads_each_text_once(monkeypatch):
    """A question asked of 256 contexts (one request to the server, whose event loop runs this check) was scanned
    once a pair: a long one held every other request for seconds. The first bad pair is still the one named."""
    from bertqa.squad.data import blank

    scanned = []
    monkeypatch.setattr(bertqa.qa, "blank", lambda text: scanned.append(len(text)) or blank(text))
    question = "\u00ad" * 1000 + "Who?"  # soft hyphens, which the text cleaning deletes: read to the end
    bertqa.qa.check_pairs([(question, f"context {i}") for i in range(256)])
    assert scanned == [1004]
    with pytest.raises(ValueError, match="^input 2: question is empty$"):
        bertqa.qa.check_pairs([("Who?", "a"), ("Who?", "b"), ("\u200b", "c"), ("\u200b", "d")])


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_batched_logits_refuses_a_batch_size_that_is_not_a_positive_integer(batch_size):
    """(review) OnnxRunner.predict_logits passed it straight through: -1 gave every logit -inf (every answer ""), with no
    error; 0 and 2.5 failed inside range()."""
    import types

    from bertqa.inference import batched_logits

    features = types.SimpleNamespace(max_seq_length=4, lengths=np.array([3, 2, 4]))
    run = lambda rows: (np.zeros((len(rows), 4), np.float32), np.zeros((len(rows), 4), np.float32))  # noqa: E731
    with pytest.raises(ValueError, match=f"^batch_size must be a positive integer, got {batch_size!r}$"):
        batched_logits(features, [0, 1, 2], batch_size, run)
    start, end = batched_logits(features, [0, 1, 2], 2, run)
    assert np.isfinite(start).all() and start.shape == (3, 4)


def test_batched_logits_refuses_nan_in_either_logit_and_counts_windows_on_its_bar(capsys):
    """(mutation review) A NaN in the end logits alone (a corrupt end row of the QA head) is refused, as one in the
    start logits is; the bar counts windows, not batches."""
    import types

    from bertqa.inference import NonFiniteLogits, batched_logits

    features = types.SimpleNamespace(max_seq_length=4, lengths=np.array([3, 2, 4]))
    for poisoned in (0, 1):

        def run(rows, poisoned=poisoned):
            logits = [np.zeros((len(rows), 4), np.float32), np.zeros((len(rows), 4), np.float32)]
            logits[poisoned][rows == 2, 1] = np.nan
            return tuple(logits)

        with pytest.raises(NonFiniteLogits, match="NaN or infinite for window 2:"):
            batched_logits(features, [0, 1, 2], 2, run)
    zeros = lambda rows: (np.zeros((len(rows), 4), np.float32),) * 2  # noqa: E731
    batched_logits(features, [0, 1, 2], 2, zeros, progress=True)
    assert "3/3" in capsys.readouterr().err.replace("\r", "\n").splitlines()[-1]


def test_logits_of_a_model_left_in_training_mode_are_its_evaluation_ones(minilm_dir, tmp_path):
    """(mutation review) Training leaves the model in training mode and evaluates it: without eval() its dropout
    would be on, and answers would differ from one call to the next. (A tiny model built without transformers: the
    dependency-floors job runs this file.)"""
    from bertqa.checkpoint import save_pretrained

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = BertForQuestionAnswering(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64))  # fmt: skip
    assert model.config.hidden_dropout_prob > 0
    folder = save_pretrained(model, load_tokenizer(minilm_dir), tmp_path / "model", with_qa_head=True)
    qa = QuestionAnswerer.from_pretrained(folder, device="cpu", precision="fp32")
    context = "The lighthouse on the cape was kept by Marta Olsen for forty years."
    expected = qa("Who kept the lighthouse?", context, top_k=3)
    for _ in range(2):
        qa.model.train()
        assert qa("Who kept the lighthouse?", context, top_k=3) == expected
        assert not qa.model.training
