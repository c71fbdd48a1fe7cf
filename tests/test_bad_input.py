"""Bad input wherever a user hands bertqa something (SQuAD files, every CLI command, the HTTP service,
checkpoints) ends in one line naming what is wrong, never a traceback or a partial output; and text in any
script (CJK, combining marks, emoji, right-to-left, control characters) keeps answers and offsets exact."""

import dataclasses
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from skips import platform_skip

from bertqa import cli
from bertqa.config import plain_copy
from bertqa.squad.data import REALIGN_WINDOW, SquadFormatError, parse_squad, read_squad, unpaired_surrogate
from bertqa.squad.features import featurize
from bertqa.squad.postprocess import postprocess
from bertqa.tokenizer import load_tokenizer

# --- Strategies -------------------------------------------------------------------------------------------

# Strings users really send: blank, control characters, zero-width and bidi marks, unpaired surrogates (a JSON
# "\ud800" escape decodes to one), scripts the tokenizer splits differently.
TRICKY = ["", " ", "\t\n ", "\x00", "\x1b[31m", "\u200b", "\u202e", "\ud800", "a\udfffb", "北京大学", "e\u0301",
          "👨\u200d👩\u200d👧", "שלום", "مرحبا", "x" * 200]  # fmt: skip
texts = st.one_of(st.text(max_size=12), st.sampled_from(TRICKY))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), texts)
json_values = st.recursive(
    scalars, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(texts, kids, max_size=3), max_leaves=8
)


def mostly(valid):
    """The valid value most of the time, else any JSON value (None reads as a missing field)."""
    return st.one_of(valid, valid, valid, json_values)


def squad_like(field):
    """SQuAD documents whose every field is drawn through `field` (mostly: sometimes anything)."""
    answers = st.fixed_dictionaries({"text": field(texts), "answer_start": field(st.integers(-3, 40))})
    questions = st.fixed_dictionaries(
        {"id": field(st.sampled_from(["q1", "q2"]) | texts), "question": field(texts),
         "answers": field(st.lists(field(answers), max_size=2))},
        optional={"is_impossible": field(st.booleans()), "plausible_answers": field(st.lists(answers, max_size=1))},
    )  # fmt: skip
    paragraphs = st.fixed_dictionaries(
        {"context": field(texts | st.just("Ada won.")), "qas": field(st.lists(field(questions), max_size=3))}
    )
    articles = st.fixed_dictionaries(
        {"paragraphs": field(st.lists(field(paragraphs), max_size=2))}, optional={"title": field(texts)}
    )
    return st.fixed_dictionaries(
        {"data": field(st.lists(field(articles), max_size=2))}, optional={"version": st.sampled_from(["1.1", "2.0"])}
    )


# Anything; SQuAD's shape with any value anywhere; SQuAD's shape with every type right and tricky text.
squad_docs = json_values | squad_like(mostly) | squad_like(lambda valid: valid)

# Words whose first and last characters survive BERT's normaliser, with anything inside: combining marks,
# joiners, controls, bidi marks and variation selectors are dropped or merged by the tokenizer, so only at a
# word's edge could they move an offset (a trailing combining mark is outside the token that precedes it).
EDGE = list("aZ09éñßØΩ北京大学中文שלוםمرحبا(,") + ["🏈", "👍🏽", "🇫🇷", "👨\u200d👩\u200d👧"]
INSIDE = ["", "", "", "\u0301", "\u0308", "\u200d", "\u200b", "\u200c", "\x00", "\x1b", "\x7f", "\u200f", "\u202e",
          "\ufe0f", "\u00ad", "\u064e"]  # fmt: skip
SPACES = [" ", "\n", "  ", "\t", "\u3000", "\u00a0"]


@st.composite
def words(draw):
    units = draw(st.lists(st.sampled_from(EDGE), min_size=1, max_size=6))
    return "".join(u + (draw(st.sampled_from(INSIDE)) if i < len(units) - 1 else "") for i, u in enumerate(units))


@st.composite
def planted(draw, max_words=10):
    """(context, answer, start): an answer of whole words between others, separated by whitespace."""
    sep = draw(st.sampled_from(SPACES))
    before, answer, after = (draw(st.lists(words(), min_size=lo, max_size=hi)) for lo, hi in
                             ((0, max_words), (1, 4), (0, max_words)))  # fmt: skip
    answer = sep.join(answer)
    left = "".join(w + sep for w in before)
    return left + answer + "".join(sep + w for w in after), answer, len(left)


# --- Fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return load_tokenizer(tiny_dir)


@pytest.fixture(scope="module")
def tiny_qa(tiny_dir):
    from bertqa.qa import QuestionAnswerer

    return QuestionAnswerer.from_pretrained(tiny_dir, device="cpu", precision="fp32")


def _copy(src: Path, dst: Path, names) -> Path:
    dst.mkdir()
    for name in names:
        shutil.copy(src / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def inputs(tiny_dir, tiny_squad, tmp_path_factory):
    """Bad checkpoints and files, each named after what is wrong with it."""
    root = tmp_path_factory.mktemp("inputs")
    tokenizer = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    f = {"tiny": tiny_dir, "squad": tiny_squad}
    f["no-tokenizer"] = _copy(tiny_dir, root / "no-tokenizer", ["model.safetensors", "config.json"])
    f["gpt2"] = _copy(tiny_dir, root / "gpt2", ["config.json", *tokenizer])
    save_file({"h.0.attn.c_attn.weight": torch.zeros(4, 12), "wte.weight": torch.zeros(10, 4)},
              str(f["gpt2"] / "model.safetensors"))  # fmt: skip
    config = json.loads((tiny_dir / "config.json").read_text())
    for name, change in (("mis-shaped", {"hidden_size": 64}), ("string-config", {"hidden_size": "32"})):
        f[name] = _copy(tiny_dir, root / name, ["model.safetensors", *tokenizer])
        (f[name] / "config.json").write_text(json.dumps({**config, **change}))
    f["bad-config"] = _copy(tiny_dir, root / "bad-config", ["model.safetensors", *tokenizer])
    (f["bad-config"] / "config.json").write_text("{not json")
    f["truncated"] = _copy(tiny_dir, root / "truncated", ["config.json", *tokenizer])
    weights = (tiny_dir / "model.safetensors").read_bytes()
    (f["truncated"] / "model.safetensors").write_bytes(weights[: len(weights) // 2])

    doc = json.loads(tiny_squad.read_text())
    first = doc["data"][0]["paragraphs"][0]["qas"][0]
    for name, question in (("blank-question.json", " \t "), ("surrogate.json", "Who\ud800?")):
        first_question, first["question"] = first["question"], question
        (root / name).write_text(json.dumps(doc))  # ensure_ascii: the surrogate is written as a \ud800 escape
        f[name] = root / name
        first["question"] = first_question
    (root / "no-questions.json").write_text('{"data": []}')
    (root / "huge-int.json").write_text('{"data": [], "version": ' + "9" * 5000 + "}")
    (root / "latin1.txt").write_bytes("Café Zoë".encode("latin-1"))
    (root / "a-file").write_text("not a folder")
    (root / "blank.txt").write_text(" \n\t\n")
    f.update(
        {name: root / name for name in ("no-questions.json", "huge-int.json", "latin1.txt", "a-file", "blank.txt")}
    )
    if hasattr(os, "mkfifo"):  # (what <(...) gives a command: no file to read twice, nor to call "no such file")
        os.mkfifo(root / "a-pipe")
        f["a-pipe"] = root / "a-pipe"
    return f


# --- The SQuAD reader -------------------------------------------------------------------------------------


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(doc=squad_docs, is_training=st.booleans(), require_answers=st.booleans())
def test_any_json_is_read_or_refused_in_one_line(tok, doc, is_training, require_answers):
    """Whatever JSON a SQuAD file holds, it is read or refused with one line naming the file; and what is
    read can be featurised (text the tokenizer cannot take, such as unpaired surrogates, is refused)."""
    try:
        examples = parse_squad(doc, "in.json", is_training, require_answers=require_answers)
    except SquadFormatError as e:
        assert str(e).startswith("in.json: ") and "\n" not in str(e)
        return
    assert len({ex.qid for ex in examples}) == len(examples)
    for ex in examples:
        assert ex.question.strip() and unpaired_surrogate(ex.qid + ex.question + ex.context) is None
        if not ex.is_impossible and (require_answers or is_training):  # (prediction predicts "" on a blank one)
            assert ex.context.strip()
        if is_training and not ex.is_impossible:  # the label is where it says
            start, text = ex.answer_starts[0], ex.answers[0]
            assert text.strip() and ex.context[start : start + len(text)] == text
    featurize(examples, tok, 32, 8, 8, is_training=is_training)


@settings(max_examples=150)
# (Characters unassigned in Python's Unicode tables are left out: the tokenizer's newer tables may know them.)
@given(context=st.text(st.characters(exclude_categories=("Cn",)), min_size=1, max_size=30)
       | st.sampled_from(TRICKY[1:]), data=st.data())  # fmt: skip
def test_training_labels_are_where_they_say(tok, context, data):
    """Answers cut from their context (the fuzzing above almost never draws one that fits): training keeps each
    one whose text has a token, at its own start, or at the text found near a start that is off by a little."""
    i = data.draw(st.integers(0, len(context) - 1))
    text = context[i : data.draw(st.integers(i + 1, len(context)))]
    shift = data.draw(st.sampled_from([0, 0, -2, 1, 3]))
    qa = {"id": "q", "question": "Where?", "answers": [{"text": text, "answer_start": i + shift}]}
    doc = {"data": [{"paragraphs": [{"context": context, "qas": [qa]}]}]}
    try:
        examples = parse_squad(doc, "in.json", True)
    except SquadFormatError as e:  # a text Python cannot encode (unpaired surrogates)
        assert unpaired_surrogate(context) is not None and "\n" not in str(e)
        return
    for ex in examples:
        start = ex.answer_starts[0]
        assert ex.context[start : start + len(text)] == text
    if shift == 0 and examples:
        assert examples[0].answer_starts == [i]
    if shift == 0 and tok.tokenize([text])[0].ids:  # an answer with a token, at its start, is never skipped
        assert examples
    featurize(examples, tok, 32, 8, 8, is_training=True)


@settings(max_examples=60)
@given(data=st.data())
def test_mangled_files_are_read_or_refused_in_one_line(tiny_squad, data):
    raw = tiny_squad.read_bytes()
    cut = data.draw(st.integers(0, len(raw)))
    junk = data.draw(st.sampled_from([b"", b"\xff", b"\xc3", b"\x00", b"\\ud800", b"[" * 5000, b"9" * 5000]))
    mangled = raw[:cut] + junk + raw[cut + data.draw(st.integers(0, 3)) :]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "mangled.json"
        path.write_bytes(mangled)
        try:
            read_squad(path, is_training=data.draw(st.booleans()))
        except SquadFormatError as e:
            assert str(e).startswith(f"{path}: ") and "\n" not in str(e)


def _doc(context, qas):
    return {"data": [{"title": "t", "paragraphs": [{"context": context, "qas": qas}]}]}


def _q(qid="q", question="Who?", text="Ada", start=0, **extra):
    return {"id": qid, "question": question, "answers": [{"text": text, "answer_start": start}], **extra}


@pytest.mark.parametrize(
    "doc, message",
    [
        (
            _doc("Ada won.", [_q(question="Who\ud800?")]),
            "question id 'q': 'question' is not valid Unicode (an unpaired surrogate '\\ud800' at character 3)",
        ),
        (_doc("Ada \udc00won.", [_q()]), "article 0 paragraph 0: 'context' is not valid Unicode"),
        (_doc("Ada won.", [_q(qid="q\ud83d")]), "article 0 paragraph 0 question 0: 'id' is not valid Unicode"),
        (_doc("Ada won.", [_q(text="A\ud800")]), "question id 'q': 'answers[0].text' is not valid Unicode"),
        (
            {"data": [{"title": "t\udc80", "paragraphs": []}]},
            "article 0: 'title' is not valid Unicode (an unpaired surrogate '\\udc80' at character 1)",
        ),
        (_doc("Ada won.", [_q(), _q()]), "question id 'q': duplicate question id"),
    ],
)
def test_blank_and_invalid_text_is_refused(doc, message):
    for is_training in (False, True):
        with pytest.raises(SquadFormatError, match=re.escape(f"in.json: {message}")):
            parse_squad(doc, "in.json", is_training)


@pytest.mark.parametrize(
    "doc, message",
    [
        (_doc("Ada won.", [_q(question="")]), "question id 'q': 'question' is empty"),
        (_doc("Ada won.", [_q(question=" \n\t")]), "question id 'q': 'question' is empty"),
        (_doc("  ", [_q()]), "question id 'q': the context (article 0 paragraph 0) is empty"),
        # Characters BERT's cleaning deletes give no token either: the model saw [CLS] [SEP] context [SEP].
        (_doc("Ada won.", [_q(question="\u200b\ufeff")]), "question id 'q': 'question' is empty"),
        (_doc("\u200b\x00 ", [_q()]), "question id 'q': the context (article 0 paragraph 0) is empty"),
    ],
)
def test_blank_questions_and_contexts_are_refused_for_evaluation_and_skipped_in_training(doc, message):
    with pytest.raises(SquadFormatError, match=re.escape(f"in.json: {message}")):
        parse_squad(doc, "in.json", is_training=False)
    ok = _q(qid="ok", question="Who won?", text="Ada", start=0)
    doc["data"][0]["paragraphs"].append({"context": "Ada won.", "qas": [ok]})
    report = {}
    assert [ex.qid for ex in parse_squad(doc, "in.json", is_training=True, report=report)] == ["ok"]
    assert report["skipped_ids"] == ["q"]


def test_a_blank_context_is_fine_when_its_questions_are_impossible():
    doc = _doc(" ", [{"id": "q", "question": "Who?", "answers": [], "is_impossible": True}])
    assert [ex.qid for ex in parse_squad(doc, "in.json", is_training=True)] == ["q"]


@pytest.mark.parametrize("version", ["1.1", "v2.0"])
def test_predict_takes_a_blank_context_and_predicts_no_answer_there(inputs, tmp_path, capsys, monkeypatch, version):
    """(review) A question without answers on a blank context was refused for prediction ("not marked
    is_impossible"): the whole file, though prediction needs no gold answers, and the model answers "" there."""
    doc = {"version": version, "data": [{"title": "t", "paragraphs": [
        {"context": "Ada Lovelace wrote the first program.", "qas": [{"id": "a", "question": "Who wrote it?"}]},
        {"context": " \u200b ", "qas": [{"id": "b", "question": "Who wrote it?"}]}]}]}  # fmt: skip
    (tmp_path / "in.json").write_text(json.dumps(doc))
    argv = ["predict", "--model", inputs["tiny"], "--input", tmp_path / "in.json", "--output", tmp_path / "p.json",
            *FAST]  # fmt: skip
    code, _, err = run_main(argv, capsys, monkeypatch)
    assert code == 0, err
    predictions = json.loads((tmp_path / "p.json").read_text())
    assert set(predictions) == {"a", "b"} and predictions["b"] == ""


def test_files_that_python_cannot_parse_name_the_file(tmp_path):
    for name, content in (("deep.json", "[" * 100_000), ("digits.json", '{"data": ' + "1" * 5000 + "}")):
        (tmp_path / name).write_text(content)
        with pytest.raises(SquadFormatError, match=f"{name}: not usable JSON"):
            read_squad(tmp_path / name, is_training=False)


@settings(max_examples=100)
@given(case=planted(), shift=st.integers(-2 * REALIGN_WINDOW, 2 * REALIGN_WINDOW), far=st.sampled_from([0, 10**30]))
def test_answer_start_anywhere_never_breaks_reading_or_evaluation(tok, case, shift, far):
    """A wrong answer_start: training re-anchors the answer nearby or skips it; evaluation keeps the question
    and never fails, even for an empty answer text far past the end (once an int64 overflow)."""
    context, answer, start = case
    for text in (answer, ""):
        stated = start + shift + (far if shift > 0 else -far)
        doc = _doc(context, [_q(text=text, start=stated)])
        train = parse_squad(doc, "in.json", is_training=True)
        for ex in train:
            a = ex.answer_starts[0]
            assert ex.context[a : a + len(text)] == text and abs(a - stated) <= REALIGN_WINDOW
        evaluation = parse_squad(doc, "in.json", is_training=False)
        assert len(evaluation) == 1
        f = featurize(evaluation, tok, 64, 16, 16)
        zeros = np.zeros((len(f), 64))
        assert set(postprocess(evaluation, f, zeros, zeros)[0]) == {"q"}


# --- Scripts, marks, emoji, right-to-left: offsets stay exact ---------------------------------------------


@settings(max_examples=100)
@given(case=planted(), question=words())
def test_labels_and_predictions_map_back_to_the_exact_answer(tok, case, question):
    """The training label of an answer planted at a known offset covers exactly its characters, and logits
    peaked on that label give back exactly the answer text as the prediction."""
    context, answer, start = case
    (ex,) = parse_squad(_doc(context, [_q(question=question, text=answer, start=start)]), "in.json", True)
    f = featurize([ex], tok, 384, 128, 64, is_training=True)
    assert len(f) == 1 and f.start_positions[0] > 0
    s, e = f.start_positions[0], f.end_positions[0]
    assert (f.offsets[0, s, 0], f.offsets[0, e, 1]) == (start, start + len(answer))
    start_logits, end_logits = np.zeros((1, 384)), np.zeros((1, 384))
    start_logits[0, s] = end_logits[0, e] = 50.0
    predictions, nbest, _ = postprocess([ex], f, start_logits, end_logits, max_answer_length=384)
    assert predictions["q"] == nbest["q"][0]["text"] == answer


@settings(max_examples=40)
@given(case=planted(), question=words())
def test_the_api_answers_with_exact_slices_of_any_text(tiny_qa, case, question):
    from bertqa.squad.data import bert_removes

    in_word = tiny_qa.tokenizer.in_word
    context = case[0]
    kept = [i for i, ch in enumerate(context) if not bert_removes(ch)]  # what BERT's text cleaning leaves
    for r in tiny_qa(question, context, top_k=3, max_seq_len=64, doc_stride=32, max_question_len=16):
        a, b = r["start"], r["end"]
        assert context[a:b] == r["answer"] and r["answer"] and r["answer"] == r["answer"].strip()
        before, after = [i for i in kept if i < a], [i for i in kept if i >= b]  # whole words of the cleaned text
        assert not before or not (in_word(context[before[-1]]) and in_word(context[a]))
        assert not after or not (in_word(context[b - 1]) and in_word(context[after[0]]))


def test_a_1mb_context_through_the_reader(tok, tmp_path):
    filler = "The market opened every morning at the usual hour. " * 20_000
    context = filler + "In 1931 Ada Brightwater opened the bridge."
    doc = _doc(context, [_q(question="Who opened the bridge?", text="Ada Brightwater", start=len(filler) + 8)])
    (tmp_path / "big.json").write_text(json.dumps(doc))
    (ex,) = read_squad(tmp_path / "big.json", is_training=True)
    f = featurize([ex], tok, 384, 128, 64, is_training=True)  # 48 s when max-context was a (windows x T) grid
    rows = np.flatnonzero(f.start_positions > 0)
    assert len(f) > 1000 and len(rows) >= 1
    for r in rows:
        assert context[f.offsets[r, f.start_positions[r], 0] : f.offsets[r, f.end_positions[r], 1]] == "Ada Brightwater"
    n_tokens = len(tok.tokenize([context])[0].ids)
    assert f.max_context.sum() == n_tokens  # every token counted once


# --- The HTTP service -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tiny_qa):
    from starlette.testclient import TestClient

    from bertqa.serve import create_app

    app = create_app(tiny_qa, max_wait_ms=0, max_body_bytes=65536, max_context_chars=2000)
    with TestClient(app, raise_server_exceptions=False) as c:
        deadline = time.monotonic() + 60
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "not ready"
            time.sleep(0.05)
        yield c


def _pair_bodies():
    names = ["top_k", "max_answer_len", "handle_impossible_answer", "doc_stride", "max_seq_len",
             "max_question_len", "align_to_words", "temperature"]  # fmt: skip
    parameters = st.dictionaries(st.sampled_from(names), st.integers(-2, 600) | json_values, max_size=3)
    pair = st.fixed_dictionaries({"question": mostly(texts), "context": mostly(texts | planted().map(lambda c: c[0]))})
    hf = st.fixed_dictionaries(
        {"inputs": mostly(pair | st.lists(mostly(pair), max_size=3))}, optional={"parameters": mostly(parameters)}
    )
    v1 = st.fixed_dictionaries(
        {
            "question": mostly(texts | st.lists(texts, max_size=3)),
            "context": mostly(texts | st.lists(texts, max_size=3)),
        },
        optional={"parameters": mostly(parameters)},
    )
    return st.tuples(st.just("/"), hf | json_values) | st.tuples(st.just("/v1/answer"), v1 | json_values)


def _answers_match(path, body, result):
    """Every answer is its own context's [start:end] slice."""
    from bertqa.qa import input_pairs

    if path == "/":
        items = body["inputs"] if isinstance(body["inputs"], list) else [body["inputs"]]
        results = result if isinstance(body["inputs"], list) else [result]
        contexts = [item["context"] for item in items]
    else:
        contexts = [c for _, c in input_pairs(body["question"], body["context"])[0]]
        results = result["answers"]
    assert len(results) == len(contexts)
    for context, answers in zip(contexts, results, strict=True):
        for a in answers if isinstance(answers, list) else [answers]:
            assert context[a["start"] : a["end"]] == a["answer"]


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(request=_pair_bodies())
def test_any_json_body_is_answered_or_refused_with_a_json_error(client, request):
    path, body = request
    r = client.post(path, content=json.dumps(body).encode())
    assert r.status_code in (200, 400, 413), r.text
    if r.status_code == 200:
        _answers_match(path, body, r.json())
    else:
        error = r.json()
        assert list(error) == ["error"] and error["error"] and "\n" not in error["error"]


@pytest.mark.parametrize(
    "body, field",
    [
        (b'{"inputs": {"question": "Who\\ud800?", "context": "Ada won."}}', "question is not valid Unicode"),
        (
            b'{"question": ["Who?", "What?"], "context": ["Ada won.", "Ada \\udfffwon."]}',
            "input 1: context is not valid Unicode",
        ),
        (b'{"inputs": {"question": "Who?", "context": ""}}', "context is empty"),
        (b'{"inputs": {"question": "\\t", "context": "Ada won."}}', "question is empty"),
        (b'{"question": "\\u200b\\u0000", "context": "Ada won."}', "question is empty"),  # invisible: no token
    ],
)
def test_text_that_is_not_text_is_a_400_naming_the_field(client, body, field):
    path = "/v1/answer" if b'"inputs"' not in body else "/"
    r = client.post(path, content=body)
    assert r.status_code == 400 and field in r.json()["error"]


# --- The command line -------------------------------------------------------------------------------------

FAST = ["--cache-dir", "none", "--no-progress", "--precision", "fp32", "--device", "cpu", "--max-seq-length", "64",
        "--doc-stride", "16", "--max-query-length", "16"]  # fmt: skip
# command line (with {name} for the inputs fixture's files, {out} for a fresh folder), then what the one error
# line must name.
CLI_CASES = {
    "evaluate: blank question": (["evaluate", "--model", "{tiny}", "--predict-file", "{blank-question.json}",
                                  "--output-dir", "{out}/run", *FAST],
                              ["blank-question.json", "question id 't0'", "'question' is empty"]),
    "evaluate: another model's weights": (["evaluate", "--model", "{gpt2}", "--predict-file", "{squad}",
                                           "--output-dir", "{out}/eval", *FAST],
                                          ["gpt2/model.safetensors", "not a BERT checkpoint"]),
    "evaluate: config of another size": (["evaluate", "--model", "{mis-shaped}", "--predict-file", "{squad}",
                                          "--output-dir", "{out}/eval", *FAST],
                                         ["mis-shaped/model.safetensors", "the weights have hidden 32"]),
    "evaluate: truncated weights": (["evaluate", "--model", "{truncated}", "--predict-file", "{squad}",
                                     "--output-dir", "{out}/eval", *FAST],
                                    ["truncated/model.safetensors", "not a readable safetensors file"]),
    "evaluate: config.json not JSON": (["evaluate", "--model", "{bad-config}", "--predict-file", "{squad}",
                                        "--output-dir", "{out}/eval", *FAST], ["bad-config/config.json", "not a JSON"]),
    "evaluate: --config absent": (["evaluate", "--model", "{tiny}", "--config", "{out}/absent.json",
                                   "--predict-file", "{squad}", "--output-dir", "{out}/eval", *FAST],
                                  ["--config", "absent.json"]),
    "predict: unpaired surrogate": (["predict", "--model", "{tiny}", "--input", "{surrogate.json}",
                                     "--output", "{out}/pred.json", *FAST],
                                    ["surrogate.json", "question id 't0'", "not valid Unicode"]),
    "train: --max-grad-norm nan": (["train", "--model", "{tiny}", "--train-file", "{squad}", "--output-dir",
                                    "{out}/run", "--max-grad-norm", "nan"], ["--max-grad-norm must be a finite"]),
    "train: --seed -1": (["train", "--model", "{tiny}", "--train-file", "{squad}", "--output-dir", "{out}/run",
                          "--seed", "-1"], ["--seed must be an integer in 0..2^63-1, got -1"]),
    "train: --epochs inf": (["train", "--model", "{tiny}", "--train-file", "{squad}", "--output-dir", "{out}/run",
                             "--epochs", "inf"], ["--epochs must be a finite number, got inf"]),
    "evaluate: --null-score-diff-threshold nan": (["evaluate", "--model", "{tiny}", "--predict-file", "{squad}",
                                                   "--output-dir", "{out}/eval", "--null-score-diff-threshold", "nan"],
                                                  ["--null-score-diff-threshold must be a finite number"]),
    "evaluate: --output-dir is a file": (["evaluate", "--model", "{tiny}", "--predict-file", "{squad}",
                                          "--output-dir", "{squad}", *FAST],
                                         ["--output-dir", "is a file, not a folder"]),
    "train: --output-dir is a file": (["train", "--model", "{tiny}", "--train-file", "{squad}", "--output-dir",
                                       "{squad}", *FAST], ["--output-dir", "is a file, not a folder"]),
    "ask: --context-file not UTF-8": (["ask", "--model", "{tiny}", "--question", "Who?", "--context-file",
                                       "{latin1.txt}"], ["--context-file", "latin1.txt", "not UTF-8"]),
    "evaluate: --predict-file ''": (["evaluate", "--model", "{tiny}", "--predict-file", "", "--output-dir",
                                     "{out}/eval", *FAST], ["--predict-file '': no such file"]),
    "evaluate: --output-dir ''": (["evaluate", "--model", "{tiny}", "--predict-file", "{squad}", "--output-dir", "",
                                   *FAST], ["--output-dir '': empty"]),
    "predict: --input ''": (["predict", "--model", "{tiny}", "--input", "", "--output", "{out}/pred.json", *FAST],
                            ["--input '': no such file"]),
    "train: --train-file ''": (["train", "--model", "{tiny}", "--train-file", "", "--output-dir", "{out}/run", *FAST],
                               ["--train-file '': no such file"]),
    "train: --train-file is a folder": (["train", "--model", "{tiny}", "--train-file", "{out}", "--output-dir",
                                        "{out}/run", *FAST], ["--train-file", "is a folder, not a file"]),
    "train: --predict-file ''": (["train", "--model", "{tiny}", "--train-file", "{squad}", "--predict-file", "",
                                  "--output-dir", "{out}/run", *FAST], ["--predict-file '': no such file"]),
    "train: --model ''": (["train", "--model", "", "--train-file", "{squad}", "--output-dir", "{out}/run", *FAST],
                          ["--model '': empty"]),  # (the current folder was loaded: a model there, unasked)
    "predict: --model ''": (["predict", "--model", "", "--input", "{squad}", "--output", "{out}/pred.json", *FAST],
                            ["--model '': empty"]),
    # (review) serve bound its port and said it was serving the current folder first; ask and export said "model path"
    "ask: --model ''": (["ask", "--model", "", "--question", "Who?", "--context", "Ada."], ["--model '': empty"]),
    "serve: --model ''": (["serve", "--model", "", "--port", "0"], ["--model '': empty"]),
    "export: --model ''": (["export", "onnx", "--model", "", "--output", "{out}/m.onnx"], ["--model '': empty"]),
    # (review) a name with a line break in it ended the error line there, the reason cut off
    "evaluate: a line break in --predict-file": (["evaluate", "--model", "{tiny}", "--predict-file", "{out}/a\nb.json",
                                                  "--output-dir", "{out}/eval", *FAST],
                                                 ["--predict-file ", "/a\\nb.json: no such file"]),
    "score: a line break in a file's name": (["score", "{squad}", "{out}/x\u2028y.json"], ["/x\\u2028y.json: no such file"]),
    "evaluate: --predict-file a pipe": (["evaluate", "--model", "{tiny}", "--predict-file", "{a-pipe}",
                                         "--output-dir", "{out}/eval", *FAST], ["a-pipe: is not a regular file"]),
    "ask: blank --context-file": (["ask", "--model", "{tiny}", "--question", "Who?", "--context-file",
                                   "{blank.txt}"], ["--context-file", "blank.txt", "empty"]),
    "ask: blank --question": (["ask", "--model", "{tiny}", "--question", " ", "--context", "Ada."],
                              ["--question", "empty"]),
    "ask: blank --context": (["ask", "--model", "{tiny}", "--question", "Who?", "--context", " \t"],
                             ["--context", "empty"]),
    "ask: --top-k 0": (["ask", "--model", "{tiny}", "--question", "Who?", "--context", "Ada.", "--top-k", "0"],
                       ["--top-k"]),
    "bench: --data without questions": (["bench", "--model", "{tiny}", "--data", "{no-questions.json}",
                                         "--mode", "infer", "--device", "cpu", "--seq-len", "128"],
                                        ["--data", "no-questions.json"]),
    "export onnx: another model's weights": (["export", "onnx", "--model", "{gpt2}", "--output", "{out}/m.onnx"],
                                             ["gpt2/model.safetensors", "not a BERT checkpoint"]),
    "export onnx: --max-seq-length past the positions": (["export", "onnx", "--model", "{tiny}", "--output",
                                                           "{out}/m.onnx", "--max-seq-length", "1024"],
                                                          ["--max-seq-length 1024 exceeds the model's"]),
    "convert: config value of the wrong type": (["convert", "{string-config}", "{out}/converted"],
                                                ["string-config/config.json", "'hidden_size' must be a positive"]),
    "score: an integer Python will not parse": (["score", "{huge-int.json}", "{squad}"],
                                                ["huge-int.json", "not usable JSON"]),
    "download: --dir is a file": (["download", "squad", "--dir", "{a-file}"], ["a-file"]),
    # An empty path was the current folder, or no file at all, with an error naming neither.
    "score: empty PREDICTIONS": (["score", "{squad}", ""], ["PREDICTIONS '': empty"]),
    "score: empty --na-prob-file": (["score", "{squad}", "{squad}", "--na-prob-file", ""], ["--na-prob-file '': empty"]),
    "score: --na-prob-thresh nan": (["score", "{squad}", "{squad}", "--na-prob-thresh", "nan"],
                                    ["--na-prob-thresh must be a finite number, got nan"]),
    "evaluate: empty --cache-dir": (["evaluate", "--model", "{tiny}", "--predict-file", "{squad}", "--output-dir",
                                     "{out}/run", *FAST, "--cache-dir", ""], ["--cache-dir '': empty"]),
    "convert: empty --vocab": (["convert", "{tiny}", "{out}/converted", "--vocab", ""], ["--vocab '': empty"]),
    "evaluate: empty --device": (["evaluate", "--model", "{tiny}", "--predict-file", "{squad}", "--output-dir",
                                  "{out}/run", *FAST, "--device", ""], ["--device '': empty"]),
}  # fmt: skip


def _argv(template, inputs, out):
    names = {**{k: str(v) for k, v in inputs.items()}, "out": str(out)}
    return [re.sub(r"\{([^}]+)\}", lambda m: names[m.group(1)], arg) for arg in template]


def run_main(argv, capsys, monkeypatch, env=None):
    """cli.main in this process (what the `bertqa` script runs): (exit code, stdout, stderr)."""
    monkeypatch.setattr(logging.getLogger("bertqa"), "handlers", [])  # log to this test's captured stderr
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    except KeyboardInterrupt:  # escaping main would stop the whole test session
        code = "KeyboardInterrupt escaped"
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("bertqa: error: ") and "Traceback" not in err, err
    return lines[0]


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_every_command_refuses_bad_input_in_one_line(case, inputs, tmp_path, capsys, monkeypatch):
    template, named = CLI_CASES[case]
    code, out, err = run_main(_argv(template, inputs, tmp_path), capsys, monkeypatch)
    line = one_error_line(err)
    assert code == 1 and all(name in line for name in named), line
    assert tree(tmp_path) == [], "an output was left behind"


def test_the_parsers_error_shows_a_line_break_in_an_argument_escaped(inputs, tmp_path, capsys, monkeypatch):
    """(diff review) argparse's own message ("unrecognized arguments: ...") ended the line at the break."""
    code, _, err = run_main(["score", inputs["squad"], inputs["squad"], tmp_path / "ex\ntra.json"], capsys, monkeypatch)
    assert code == 2 and one_error_line(err).endswith(
        f"unrecognized arguments: {tmp_path}/ex\\ntra.json (see bertqa score --help)"
    ), err


def test_notes_naming_a_file_with_a_line_break_stay_one_line(inputs, tmp_path, capsys, monkeypatch):
    """(review) "bertqa: wrote c" and "d (41,282 parameters)" came out as two lines for a folder named "c\\nd"."""
    code, out, err = run_main(["convert", inputs["tiny"], tmp_path / "c\nd"], capsys, monkeypatch)
    assert code == 0 and (tmp_path / "c\nd" / "config.json").is_file(), err
    wrote = out.splitlines()[-1]
    assert wrote.startswith(f"bertqa: wrote {tmp_path}/c\\nd (") and wrote.endswith(" parameters in float32)"), out


def test_negative_numbers_in_any_notation_are_values_not_flags():
    """(review) Python before 3.12 took only -5, -1.5 and -.5 for numbers: '--lr -1e-5' was "expected one argument"
    (the value was read as a flag), and a negative threshold in scientific notation could not be given."""
    parser = cli.build_parser()
    for value, number in (("-1e-3", -1e-3), ("-2.", -2.0), ("-1.5E+2", -150.0), ("-.5", -0.5), ("-7", -7.0)):
        args = parser.parse_args(["predict", "--model", "m", "--input", "i.json", "--output", "o.json",
                                  "--null-score-diff-threshold", value])  # fmt: skip
        assert args.null_score_diff_threshold == number
    with pytest.raises(SystemExit):  # (a flag is still a flag)
        parser.parse_args(
            ["predict", "--model", "m", "--input", "i.json", "--output", "o.json", "--null-score-diff-threshold", "--x"]
        )


def test_ask_names_its_device_flag(inputs, capsys, monkeypatch):
    """(review) ask said "device cuda: not usable here", as the Python API names it, not the flag it was given as."""
    code, _, err = run_main(["ask", "--model", inputs["tiny"], "--question", "Who?", "--context", "Ada.", "--device",
                             "nosuchdevice"], capsys, monkeypatch)  # fmt: skip
    assert code == 1 and one_error_line(err).startswith("bertqa: error: --device 'nosuchdevice': "), err
    # Under torchrun, "cuda" is this process's GPU, cuda:LOCAL_RANK, as from_pretrained reads it (it was cuda:0).
    import bertqa.distributed

    def resolve_device(name, local_rank=0, flag="--device"):
        raise ValueError(f"asked for {name} with LOCAL_RANK {local_rank} as {flag}")

    monkeypatch.setattr(bertqa.distributed, "resolve_device", resolve_device)
    code, _, err = run_main(["ask", "--model", inputs["tiny"], "--question", "Who?", "--context", "Ada.", "--device",
                             "cuda"], capsys, monkeypatch, env={"LOCAL_RANK": "1"})  # fmt: skip
    assert code == 1 and one_error_line(err) == "bertqa: error: asked for cuda with LOCAL_RANK 1 as --device", err


def test_only_rank_0_checks_the_output_folder_it_alone_writes(inputs, tmp_path, monkeypatch):
    """Under torchrun on machines that do not share --output-dir, the other ranks have no such folder."""
    from bertqa.evaluate import EvalConfig

    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    for where, message in (
        (inputs["squad"], "is a file, not a folder"),
        (tmp_path / "gone", "a symbolic link to nothing"),
        (tmp_path / "gone" / "out", f"{tmp_path / 'gone'} is a symbolic link to nothing"),  # was "File exists"
    ):
        cfg = EvalConfig(model=str(inputs["tiny"]), predict_file=str(inputs["squad"]), output_dir=str(where))
        with pytest.raises(ValueError, match=f"--output-dir {where}: {message}"):
            cfg.validate()
        monkeypatch.setenv("RANK", "1")
        cfg.validate()  # rank 1 writes nothing there
        monkeypatch.delenv("RANK")


def test_predict_takes_no_output_dir():
    """PredictConfig's output_dir is unused (predict writes --output): its old default, "", must still do."""
    from bertqa.evaluate import PredictConfig

    PredictConfig(model=".", predict_file=__file__, output="pred.json", output_dir="").validate()


def test_predict_checks_every_file_it_will_write_before_predicting(inputs, tmp_path, capsys, monkeypatch):
    """A folder where the n-best file goes: refused before any work, not after writing half of the set."""
    import bertqa.evaluate

    (tmp_path / "pred.nbest.json").mkdir()
    monkeypatch.setattr(bertqa.evaluate, "run_inference", lambda *a: pytest.fail("predicted before checking"))
    argv = ["predict", "--model", inputs["tiny"], "--input", inputs["squad"], "--output", tmp_path / "pred.json", *FAST]
    code, _, err = run_main(argv, capsys, monkeypatch)
    line = one_error_line(err)
    assert (
        code == 1
        and f"--output {tmp_path / 'pred.json'}: " in line
        and "pred.nbest.json, written beside it, is a folder" in line
    )
    assert tree(tmp_path) == ["pred.nbest.json"]
    # A legal --output name whose n-best file's name is too long, in a folder to be made, failed after the inference.
    long = tmp_path / "new" / ("p" * 245 + ".json")
    code, _, err = run_main([*argv[:6], long, *FAST], capsys, monkeypatch)
    assert code == 1 and "written beside it, is longer than 255 bytes" in one_error_line(err)
    assert tree(tmp_path) == ["pred.nbest.json"]
    code, _, err = run_main([*argv[:6], tmp_path / "new" / ("p" * 252 + ".json"), *FAST], capsys, monkeypatch)
    assert code == 1 and "the name of the file is longer than 255 bytes" in one_error_line(err)


@pytest.mark.parametrize("cache", ["pred.json", "pred.json/cache", "pred.nbest.json"])
def test_predict_refuses_a_features_cache_in_a_file_it_writes(inputs, tmp_path, capsys, monkeypatch, cache):
    """The cache made a folder where the predictions go: the run failed after the work ("Is a directory"), leaving
    its n-best file without its predictions."""
    import bertqa.evaluate

    monkeypatch.setattr(bertqa.evaluate, "run_inference", lambda *a: pytest.fail("predicted before checking"))
    written = "pred.nbest.json" if cache.startswith("pred.nbest") else "pred.json"
    argv = ["predict", "--model", inputs["tiny"], "--input", inputs["squad"], "--output", tmp_path / "pred.json", *FAST,
            "--cache-dir", tmp_path / cache]  # fmt: skip
    code, _, err = run_main(argv, capsys, monkeypatch)
    assert code == 1 and one_error_line(err) == (
        f"bertqa: error: --cache-dir {tmp_path / cache}: lies in {tmp_path / written}, which this run writes; name "
        "another folder"
    )
    assert tree(tmp_path) == []


@pytest.mark.parametrize("ignoring_case", [False, True, "an empty drive"])
def test_paths_still_to_be_made_are_one_where_the_file_system_ignores_case(ignoring_case, inputs, tmp_path, request,
                                                                           monkeypatch):  # fmt: skip
    """(review) A features cache in Pred.json/ lies in the pred.json a run writes, and a running train's model/
    still to be made is Model/ too, where the file system ignores case (macOS, FAT): neither was seen, the names
    compared as given. Where case counts (diff review) each is a name of its own, not refused. On a drive holding
    no name to tell by (an empty USB stick), taken as ignoring case: its root's own name is the drive's above."""
    import bertqa.files
    from bertqa.evaluate import PredictConfig
    from bertqa.files import check_not_claimed, exclusive

    if ignoring_case:
        request.getfixturevalue("like_macos")
    if ignoring_case == "an empty drive":  # (tmp_path a drive's root: what is above it, another drive)
        inside = str(tmp_path.resolve())
        monkeypatch.setattr(bertqa.files, "_device", lambda p: 1 if str(p).startswith(inside) else 0, raising=False)
    else:
        (tmp_path / "notes.txt").write_text("a name with letters: what tells how this file system takes case")
    cfg = PredictConfig(model=str(inputs["tiny"]), predict_file=str(inputs["squad"]), output=str(tmp_path / "p.json"),
                        cache_dir=str(tmp_path / "P.json" / "cache"))  # fmt: skip
    with exclusive(tmp_path):  # (a train writing there)
        if ignoring_case:
            with pytest.raises(ValueError, match=f"lies in {tmp_path / 'p.json'}, which this run writes"):
                cfg.check_cache_outside([tmp_path / "p.json"])
            with pytest.raises(ValueError, match="is a folder another run is writing"):
                check_not_claimed(tmp_path / "MODEL" / "sub", "--output x")
        else:
            cfg.check_cache_outside([tmp_path / "p.json"])
            check_not_claimed(tmp_path / "MODEL" / "sub", "--output x")


def test_a_folder_that_cannot_be_listed_tells_nothing_of_case(tmp_path, monkeypatch):
    """(diff review) A folder that may be searched but not listed (mode 711, another's) read as listing nothing:
    its sub/ beside SUB/ then told that case is ignored, on Linux."""
    from bertqa.files import ignores_case

    (tmp_path / "xonly" / "sub").mkdir(parents=True)
    (tmp_path / "xonly" / "SUB").mkdir()
    real_listdir, hidden = os.listdir, str(tmp_path / "xonly")

    def listdir(path="."):
        if os.fspath(path) == hidden:
            raise PermissionError(13, "Permission denied", hidden)
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", listdir)
    assert ignores_case(tmp_path / "xonly" / "sub" / "x") is False


def test_the_cache_check_takes_a_link_loop_as_a_path_not_an_internal_error(inputs, tmp_path):
    """Path.resolve() raises RuntimeError on a loop ("internal error ... please report it"); a looping cache folder
    is the usual unwritable cache (a warning), a looping output the output check's to name."""
    from bertqa.evaluate import PredictConfig

    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "out.json").symlink_to("out.json")
    cfg = PredictConfig(model=str(inputs["tiny"]), predict_file=str(inputs["squad"]), output=str(tmp_path / "p.json"),
                        cache_dir=str(tmp_path / "loop"))  # fmt: skip
    cfg.check_cache_outside([tmp_path / "p.json", tmp_path / "out.json"])  # (no RuntimeError)
    with pytest.raises(ValueError, match=f"lies in {tmp_path}, which this run writes"):  # and still a check
        cfg.check_cache_outside([tmp_path])


def test_predict_into_a_folder_another_run_is_writing_stops(inputs, tmp_path, capsys, monkeypatch):
    """Its files landed beside a running evaluate's summary, or were removed by a running train at its end."""
    import bertqa.evaluate
    from bertqa.files import exclusive

    monkeypatch.setattr(bertqa.evaluate, "run_inference", lambda *a: pytest.fail("predicted before checking"))
    argv = ["predict", "--model", inputs["tiny"], "--input", inputs["squad"], "--output", tmp_path / "pred.json", *FAST]
    with exclusive(tmp_path):  # a train or an evaluate with --output-dir there
        code, _, err = run_main(argv, capsys, monkeypatch)
    assert code == 1 and one_error_line(err) == (f"bertqa: error: --output {tmp_path / 'pred.json'}: {tmp_path} is a "
                                                 "folder another run is writing (its --output-dir); wait for it or "
                                                 "write elsewhere")  # fmt: skip
    assert tree(tmp_path) == []
    # (review) Nor into a folder below it (a train's model/, which it replaces whole at its end: it refused to, with
    # predict's files in it, after all its steps), nor `convert` there.
    (tmp_path / "model").mkdir()
    below = ["--output", tmp_path / "model" / "pred.json"]
    model, squad = inputs["tiny"], inputs["squad"]
    # (review) Nor evaluate, train or export there: they wrote into it, and the train failed at its end.
    others = [
        ["evaluate", "--model", model, "--predict-file", squad, "--output-dir", tmp_path / "model", *FAST],
        ["train", "--model", model, "--train-file", squad, "--output-dir", tmp_path / "model" / "run", *FAST],
        ["export", "onnx", "--model", model, "--output", tmp_path / "model" / "m.onnx"],
    ]
    with exclusive(tmp_path):
        for command in (argv[: -len(FAST) - 2] + below + FAST, ["convert", model, tmp_path / "model"], *others):
            code, _, err = run_main(command, capsys, monkeypatch)
            assert code != 0 and one_error_line(err).endswith(
                f"{tmp_path} is a folder another run is writing (its --output-dir); wait for it or write elsewhere"
            ), err
    assert tree(tmp_path) == ["model"]
    # Not a folder further down, nor one below a folder locked by another program (`flock -n ~/proj cmd`).
    from bertqa.files import check_not_claimed

    with exclusive(tmp_path):
        check_not_claimed(tmp_path / "runs", "--output x")
        check_not_claimed(tmp_path / "runs" / "model", "--output x")
        with pytest.raises(ValueError, match="is a folder another run is writing"):  # (below its model/: refused)
            check_not_claimed(tmp_path / "model" / "sub", "--output x")
        check_not_claimed(tmp_path / "MODEL" / "sub", "--output x")  # (where case counts, another folder)
        with pytest.raises(ValueError, match="is a folder another run is writing"), exclusive(tmp_path / "model"):
            pytest.fail("held a folder that the run holding its parent replaces")  # (a run started after the checks)


def test_predict_through_a_link_or_into_a_folder_claimed_while_it_ran_stops(inputs, tmp_path, capsys, monkeypatch):
    """(mutation review) The folder judged is the one the files land in (a link's target's), and it is judged again
    after the inference, where another run may have started meanwhile: nothing is written into it."""
    import contextlib

    import bertqa.evaluate
    from bertqa.files import exclusive

    target, link = tmp_path / "b", tmp_path / "a"
    target.mkdir()
    link.mkdir()
    (link / "pred.json").symlink_to(target / "pred.json")
    argv = ["predict", "--model", inputs["tiny"], "--input", inputs["squad"], "--output", link / "pred.json", *FAST]
    claimed = f"{target} is a folder another run is writing (its --output-dir); wait for it or write elsewhere"
    with exclusive(target):
        code, _, err = run_main(argv, capsys, monkeypatch)
    assert code == 1 and one_error_line(err).endswith(claimed)
    assert tree(tmp_path) == ["a", "a/pred.json", "b"]
    real, held = bertqa.evaluate.run_inference, contextlib.ExitStack()

    def claimed_meanwhile(*args):
        held.enter_context(exclusive(target))
        return real(*args)

    monkeypatch.setattr(bertqa.evaluate, "run_inference", claimed_meanwhile)
    with held:
        code, _, err = run_main(argv, capsys, monkeypatch)
    assert code == 1 and err.strip().splitlines()[-1].endswith(claimed)  # (after the featurisation's note)
    assert tree(tmp_path) == ["a", "a/pred.json", "b"]


def test_a_train_whose_model_folder_another_run_is_writing_stops(inputs, tmp_path, capsys, monkeypatch):
    """(review) An evaluate writing into OUT/model (started first) was not looked for: a train into OUT replaced
    that folder at its end, and the evaluate wrote its predictions on into the new model folder; both exited 0."""
    from bertqa.files import exclusive

    argv = ["train", "--model", inputs["tiny"], "--train-file", inputs["squad"], "--output-dir", tmp_path, *FAST]
    with exclusive(tmp_path / "model"):  # an evaluate with --output-dir there
        code, _, err = run_main(argv, capsys, monkeypatch)
    assert code == 1 and one_error_line(err) == (f"bertqa: error: --output-dir {tmp_path}: {tmp_path / 'model'} is "
                                                 "a folder another run is writing (its --output-dir); wait for it or "
                                                 "write elsewhere")  # fmt: skip
    assert tree(tmp_path) == ["model"]  # (the evaluate's, empty)


@pytest.mark.parametrize("where", ["predict --output", "evaluate --output-dir", "train --output-dir", "convert DST",
                                   "export --output"])  # fmt: skip
def test_a_symbolic_link_loop_where_the_output_goes_is_one_line(inputs, tmp_path, capsys, monkeypatch, where):
    """(review) Path.resolve() raised RuntimeError on a loop: an internal error, or a write failing after the work."""
    (tmp_path / "out").mkdir()
    loop = {"predict --output": tmp_path / "loop.json", "evaluate --output-dir": tmp_path / "out" / "predictions.json",
            "train --output-dir": tmp_path / "out" / "model", "convert DST": tmp_path / "loopdir",
            "export --output": tmp_path / "loop.onnx"}[where]  # fmt: skip
    loop.symlink_to(loop.name)
    model, squad, out = inputs["tiny"], inputs["squad"], tmp_path / "out"
    argv = {"predict --output": ["predict", "--model", model, "--input", squad, "--output", loop, *FAST],
            "evaluate --output-dir": ["evaluate", "--model", model, "--predict-file", squad, "--output-dir", out, *FAST],
            "train --output-dir": ["train", "--model", model, "--train-file", squad, "--output-dir", out, *FAST],
            "convert DST": ["convert", model, loop],
            "export --output": ["export", "onnx", "--model", model, "--output", loop]}[where]  # fmt: skip
    code, _, err = run_main(argv, capsys, monkeypatch)
    assert code != 0 and one_error_line(err).endswith(f"{loop} is, or lies in, a symbolic link loop"), err
    assert loop.is_symlink() and sorted(p.name for p in tmp_path.rglob("*")) == sorted(["out", loop.name]), err


# (command line, the input file it names, relative to a fresh folder holding it)
OVERWRITES = {
    "predict: --output is --input": (["predict", "--input", "dev.json", "--output", "dev.json"], "dev.json"),
    "predict: the n-best file is --input": (["predict", "--input", "dev.nbest.json", "--output", "dev.json"],
                                            "dev.nbest.json"),
    "predict: --output links to --input": (["predict", "--input", "dev.json", "--output", "link.json"], "dev.json"),
    "evaluate: predictions.json is --predict-file": (["evaluate", "--predict-file", "out/predictions.json",
                                                      "--output-dir", "out"], "out/predictions.json"),
    "train: summary.json is --train-file": (["train", "--train-file", "out/summary.json", "--output-dir", "out"],
                                            "out/summary.json"),
    "train: --train-file in out/model": (["train", "--train-file", "out/model/dev.json", "--output-dir", "out"],
                                           "out/model/dev.json"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(OVERWRITES))
def test_no_command_writes_over_its_own_input(case, inputs, tmp_path, capsys, monkeypatch):
    """Refused before any work, naming both files; the input left as it was."""
    argv, given = OVERWRITES[case]
    (tmp_path / given).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(inputs["squad"], tmp_path / given)
    if "link.json" in argv:
        (tmp_path / "link.json").symlink_to(tmp_path / given)
    before = tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main([*argv, "--model", inputs["tiny"], *FAST], capsys, monkeypatch)
    line = one_error_line(err)
    assert code == 1 and f" {given}, its own input" in line, line
    assert (tmp_path / given).read_bytes() == Path(inputs["squad"]).read_bytes() and tree(tmp_path) == before


# (command line, then the input it names and the folders to make, spelled as on the disk)
OTHER_SPELLINGS = {
    "predict: --output is --input in capitals": (["predict", "--input", "data/dev.json", "--output", "Data/DEV.json"],
                                                 "data/dev.json"),
    "predict: --output is --input in another Unicode form": (["predict", "--input", "caf\u00e9.json", "--output",
                                                              "cafe\u0301.json"], "caf\u00e9.json"),
    "evaluate: --output-dir holds --predict-file": (["evaluate", "--predict-file", "out/predictions.json",
                                                     "--output-dir", "OUT"], "out/predictions.json"),
    "convert: DST is the source folder": (["convert", "bert", "BERT"], "bert/"),
    "predict: --output is the model's config": (["predict", "--model", "bert", "--input", "dev.json", "--output",
                                                 "BERT/CONFIG.json"], "bert/"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(OTHER_SPELLINGS))
def test_no_command_writes_over_its_own_input_spelled_otherwise(case, like_macos, inputs, tmp_path, capsys,
                                                                 monkeypatch):  # fmt: skip
    """(review) On a file system that ignores case and Unicode normalisation (macOS's, a FAT drive's), an output
    named as an input spelled otherwise is that input: the checks compared paths as strings, and predict wrote its
    predictions over its --input there. Each is refused before any work, the input left as it was."""
    argv, given = OTHER_SPELLINGS[case]
    if given.endswith("/"):
        shutil.copytree(inputs["tiny"], tmp_path / given)
    else:
        (tmp_path / given).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(inputs["squad"], tmp_path / given)
    shutil.copy(inputs["squad"], tmp_path / "dev.json")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    monkeypatch.chdir(tmp_path)
    model = [] if "--model" in argv or argv[0] == "convert" else ["--model", inputs["tiny"]]
    code, _, err = run_main([*argv, *model, *(FAST if argv[0] != "convert" else [])], capsys, monkeypatch)
    line = one_error_line(err)
    assert code == 1 and ("its own input" in line or "reads from --model" in line or "holds bert" in line), line
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_name_spelled_otherwise_is_another_file_where_case_counts(tmp_path):
    """Where case counts (Linux), data/DEV.json beside data/dev.json is a file of its own: no false refusal."""
    from bertqa.files import check_not_inputs, real_path

    (tmp_path / "dev.json").write_text("{}")
    if (tmp_path / "DEV.json").exists():
        platform_skip("this file system ignores case (macOS's, say)")
    assert real_path(tmp_path / "DEV.json") == tmp_path.resolve() / "DEV.json"
    check_not_inputs([tmp_path / "DEV.json"], {"--input": tmp_path / "dev.json"}, "--output")


def test_no_command_writes_over_a_file_of_its_model_folder(inputs, tmp_path, capsys, monkeypatch):
    """The model folder is an input too: predictions written as its config.json would replace the model's. Other
    names in it may be written (predictions beside the model they came from)."""
    model = tmp_path / "model"
    shutil.copytree(inputs["tiny"], model)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    for output in ("config.json", "tokenizer_config.json"):
        code, _, err = run_main(["predict", "--model", model, "--input", inputs["squad"], "--output", model / output,
                                 *FAST], capsys, monkeypatch)  # fmt: skip
        line = one_error_line(err)
        assert code == 1 and f"would write {model / output} over a file it reads from --model {model}" in line, line
    # The weights file as --model (config and tokenizer are read beside it), an NVIDIA folder's bert_config.json,
    # and an HF cache's snapshot, each of whose files links to a blob named by its hash elsewhere.
    snapshot, blobs = tmp_path / "snapshots" / "abc", tmp_path / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for p in model.iterdir():
        shutil.copy(p, blobs / f"hash-{p.name}")
        (snapshot / p.name).symlink_to(blobs / f"hash-{p.name}")
    for source, output in ((model / "model.safetensors", model / "tokenizer.json"), (model, model / "bert_config.json"),
                           (snapshot, snapshot / "config.json"), (model, model / "Tokenizer.json"),
                           (snapshot / "model.safetensors", snapshot / "tokenizer_config.json")):  # fmt: skip
        code, _, err = run_main(["predict", "--model", source, "--input", inputs["squad"], "--output", output, *FAST],
                                capsys, monkeypatch)  # fmt: skip
        line = one_error_line(err)
        assert code == 1 and f"would write {output} over a file it reads from --model {source}" in line, line
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    assert {p.name: p.read_bytes() for p in blobs.iterdir()} == {f"hash-{k}": v for k, v in before.items()}
    code, _, err = run_main(["predict", "--model", model, "--input", inputs["squad"], "--output",
                             model / "predictions.json", *FAST], capsys, monkeypatch)  # fmt: skip
    assert code == 0 and (model / "predictions.json").is_file(), err
    # Neither a hard link to a model file (the output replaces the name, not the file) nor a broken link among the
    # model's files (an OSError while comparing) stops a run.
    (snapshot / "added_tokens.json").symlink_to(blobs / "nowhere")
    (tmp_path / "out").mkdir()
    os.link(blobs / "hash-config.json", tmp_path / "out" / "pred.json")
    code, _, err = run_main(["predict", "--model", snapshot, "--input", inputs["squad"], "--output",
                             tmp_path / "out" / "pred.json", *FAST], capsys, monkeypatch)  # fmt: skip
    assert code == 0 and (blobs / "hash-config.json").read_bytes() == before["config.json"], err


def test_a_folder_where_evaluate_writes_a_file_is_refused_before_any_work(inputs, tmp_path, capsys, monkeypatch):
    """It failed after the whole inference, with some of the new prediction files in place and others not."""
    out = tmp_path / "out"
    (out / "nbest_predictions.json").mkdir(parents=True)
    (out / "predictions.json").write_text("{}")
    code, _, err = run_main(["evaluate", "--model", inputs["tiny"], "--predict-file", inputs["squad"], "--output-dir",
                             out, *FAST], capsys, monkeypatch)  # fmt: skip
    line = one_error_line(err)
    assert (
        code == 1
        and f"--output-dir {out}: {out / 'nbest_predictions.json'}, which this run writes, is a folder" in line
    )
    assert (
        tree(out) == ["nbest_predictions.json", "predictions.json"] and (out / "predictions.json").read_text() == "{}"
    )


def test_train_refuses_to_replace_a_model_folder_that_is_not_a_models(inputs, tmp_path, capsys, monkeypatch):
    """Training replaces OUTPUT/model whole with its model: a folder of the user's own files there (or a file) was
    deleted when the run finished."""
    from bertqa.train import TrainConfig

    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "model" / "notes.txt").write_text("mine")
    argv = ["train", "--model", inputs["tiny"], "--train-file", inputs["squad"], "--output-dir", out, "--max-steps",
            "1", *FAST]  # fmt: skip
    code, _, err = run_main(argv, capsys, monkeypatch)
    line = one_error_line(err)
    assert code == 1 and f"{out / 'model'} exists and is not a model folder (it holds notes.txt" in line, line
    assert tree(out) == ["model", "model/notes.txt"]
    (out / "model" / "notes.txt").unlink()
    (out / "model").rmdir()
    (out / "model").write_text("mine")
    code, _, err = run_main(argv, capsys, monkeypatch)
    assert code == 1 and "is not a model folder (a file)" in one_error_line(err) and tree(out) == ["model"]
    # An earlier run's model folder, or an empty one, is replaced as before.
    (out / "model").unlink()
    shutil.copytree(inputs["tiny"], out / "model")
    TrainConfig(model=str(inputs["tiny"]), train_file=str(inputs["squad"]), output_dir=str(out)).validate()


def test_a_run_that_fails_after_making_its_output_folder_removes_it(inputs, tmp_path, capsys, monkeypatch):
    """The folder is made once the inputs are read; a failure after that (here the model's logits) must not
    leave it behind, empty, nor the folders made above it."""
    import bertqa.evaluate
    from bertqa.inference import NonFiniteLogits

    def fail(*args):
        raise NonFiniteLogits("the model's logits are NaN")

    monkeypatch.setattr(bertqa.evaluate, "run_evaluation", fail)
    argv = ["evaluate", "--model", inputs["tiny"], "--predict-file", inputs["squad"], "--output-dir",
            tmp_path / "runs" / "eval", *FAST]  # fmt: skip
    code, _, err = run_main(argv, capsys, monkeypatch)
    assert code == 1 and err.splitlines()[-1] == "bertqa: error: the model's logits are NaN" and tree(tmp_path) == []
    (tmp_path / "mine").mkdir()  # the user's own folder is kept
    code, _, err = run_main([*argv[:6], tmp_path / "mine", *FAST], capsys, monkeypatch)
    assert code == 1 and tree(tmp_path) == ["mine"]


def test_version_2_with_negative_reads_and_scores_a_file_that_does_not_say_v2(inputs, tmp_path, capsys, monkeypatch):
    """v2.0 data with no version and no is_impossible (unanswerable = no answers): the flag says what it is."""
    doc = json.loads(Path(inputs["squad"]).read_text())
    doc.pop("version", None)
    first = doc["data"][0]["paragraphs"][0]["qas"][0]
    first["answers"] = []
    (tmp_path / "v2.json").write_text(json.dumps(doc))
    argv = ["evaluate", "--model", inputs["tiny"], "--predict-file", tmp_path / "v2.json", *FAST]
    code, _, err = run_main([*argv, "--output-dir", tmp_path / "v1"], capsys, monkeypatch)
    assert code == 1 and "no answers and not marked is_impossible" in err.splitlines()[-1]
    code, out, err = run_main([*argv, "--output-dir", tmp_path / "v2", "--version-2-with-negative"], capsys,
                              monkeypatch)  # fmt: skip
    summary = json.loads(out.splitlines()[-1])
    assert code == 0 and summary["NoAns_total"] == 1 and summary["HasAns_total"] == summary["total"] - 1, err
    assert (tmp_path / "v2" / "null_odds.json").is_file()


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "bertqa", *args], capture_output=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip


def test_real_processes_exit_non_zero_with_one_line(inputs, tmp_path):
    # A weights file with no tokenizer beside it: the file is named (it used to say `.: no tokenizer.json ...`).
    weights = str(inputs["no-tokenizer"] / "model.safetensors")
    r = run_cli("evaluate", "--model", weights, "--predict-file", str(inputs["squad"]), "--output-dir",
                str(tmp_path / "eval"), "--cache-dir", "none")  # fmt: skip
    line = one_error_line(r.stderr.decode())
    assert r.returncode == 1 and weights in line and "tokenizer" in line
    # Bytes that are not UTF-8 on the command line reach Python as unpaired surrogates.
    r = run_cli("ask", "--model", str(inputs["tiny"]), "--question", b"Who\xff?", "--context", "Ada won.")
    assert (
        r.returncode == 1
        and one_error_line(r.stderr.decode()) == "bertqa: error: --question: not UTF-8 text (character 4)"
    )
    # The server loads its model after it starts listening: a bad one stops it, with one line.
    r = run_cli("serve", "--model", str(inputs["truncated"]), "--port", "0", "--device", "cpu")
    assert r.returncode == 1 and "not a readable safetensors file" in one_error_line(r.stderr.decode())
    assert tree(tmp_path) == []


def test_stdout_that_cannot_be_written_is_one_line_or_quiet_not_pythons_noise(inputs, tmp_path):
    """Printed text waits in Python's buffer when stdout is not a terminal; a full disk, or a reader that left,
    failed at exit: "Exception ignored ..." on stderr and exit status 120."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full (Linux's device on which every write fails as on a full disk)")
    data = Path(__file__).parent / "data" / "tiny-squad.json"
    ids = [q["id"] for a in json.loads(data.read_text())["data"] for p in a["paragraphs"] for q in p["qas"]]
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps(dict.fromkeys(ids, "Denver")))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    # Unbuffered (as a write of 8 KB or more is), each write fails at once: the line named no file, and argparse
    # dropped --help's failure (exit 0).
    unbuffered = {**env, "PYTHONUNBUFFERED": "1"}
    ask = ["ask", "--model", str(inputs["tiny"]), "--question", "Who won?", "--context", "Ada won."]
    for args, environ in [(args, environ) for args in (["score", str(data), str(predictions)], ["--help"], ask)
                          for environ in (env, unbuffered)]:  # fmt: skip
        command = [sys.executable, "-m", "bertqa", *args]
        with open("/dev/full", "w") as full:
            r = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, env=environ, timeout=120)
        assert (r.returncode, r.stderr.decode().splitlines()) == (1, ["bertqa: error: stdout: No space left on device"])
        gone = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environ)
        gone.stdout.close()  # the reader left before anything was written (`| head -c 0`)
        assert (gone.wait(120), gone.stderr.read()) == (1, b""), args
    # Started with stdout closed (`>&-`): Python has no sys.stdout, and print() dropped the answer: exit status 0.
    for args in (["score", str(data), str(predictions)], ask):
        closed = subprocess.run(["bash", "-c", 'exec "$@" >&-', "-", *command[:3], *args],
                                stderr=subprocess.PIPE, env=env, timeout=120)  # fmt: skip
        assert (closed.returncode, closed.stderr.decode().splitlines()) == (
            1, ["bertqa: error: stdout: closed; give it a file (/dev/null to discard what bertqa prints)"])  # fmt: skip


def test_a_command_started_with_stderr_closed_runs(inputs, tmp_path):
    """`2>&-` (a daemon's, a cron job's): Python has no sys.stderr; the progress bar, writing to None, failed the
    run, and the line saying so failed too: exit 1, no word, nothing written. The run goes on, what it would say
    on stderr lost."""
    data = Path(__file__).parent / "data" / "tiny-squad.json"
    out = tmp_path / "predictions.json"
    args = ["predict", "--model", inputs["tiny"], "--input", data, "--output", out, "--precision", "fp32",
            "--cache-dir", "none"]  # fmt: skip
    r = subprocess.run(["bash", "-c", 'exec "$@" 2>&-', "-", sys.executable, "-m", "bertqa", *map(str, args)],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0 and json.loads(r.stdout.splitlines()[-1]), r.stdout
    assert len(json.loads(out.read_text())) == len(
        [q for a in json.loads(data.read_text())["data"] for p in a["paragraphs"] for q in p["qas"]]
    )


def test_a_note_during_a_progress_bar_starts_a_line_of_its_own(monkeypatch, tmp_path):
    """stdout's notes and stderr's bar share a terminal or a log (`>log 2>&1`): a note during training (a step
    skipped for a non-finite loss) was written at the end of the bar's line. On a terminal (or a stream that draws
    like one: a notebook's) the bar is cleared first and drawn again after; in a file the line is ended first,
    and the bar drawn again after the note (so that notes in a row leave no blank lines), and otherwise every 30 s
    at most, not ten times a second. In a file of its own the bar's stream gets nothing more."""
    from tqdm import tqdm

    from bertqa import cli
    from bertqa.files import bar_options, note

    def run(out, err, bar_on_stdout=False):
        monkeypatch.setattr(sys, "stdout", out)
        monkeypatch.setattr(sys, "stderr", err)
        with tqdm(total=4, file=sys.stdout if bar_on_stdout else sys.stderr, mininterval=0) as bar:
            bar.update(1)
            note("bertqa: step 2: skipped")
            note("bertqa: step 3: skipped")
            bar.update(1)
        options = bar_options()
        monkeypatch.undo()
        return options

    main, side = os.openpty()  # a terminal: drawn as usual (cleared for a note, as a notebook's stream is below)
    with open(side, "w", encoding="utf-8") as terminal, open(main, "rb", buffering=0):
        assert run(terminal, terminal) == {}
    shared = io.StringIO()
    assert run(shared, shared) == {}
    before, between, after = re.split(r"bertqa: step \d: skipped\n", shared.getvalue())
    assert before.endswith("\r") and "1/4" in before and "2/4" in after  # back at the line's start, then redrawn
    for bar_on_stdout in (False, True):  # (a library caller's bar may draw on stdout)
        with open(tmp_path / "log", "w", encoding="utf-8") as log:  # (stdout as the command line wraps it)
            assert run(cli._Stdout(log), log, bar_on_stdout) == {"mininterval": 30.0, "maxinterval": 30.0}
        with open(tmp_path / "log", encoding="utf-8", newline="") as log:  # (its "\r" kept)
            text = log.read()
        assert re.search(r"1/4[^\n]*\nbertqa: step 2: skipped\n[^\n]*1/4[^\n]*\nbertqa: step 3: skipped\n", text), text
        assert "\n\n" not in text and "2/4" in text.split("\n")[-2]
    with open(tmp_path / "out", "w", encoding="utf-8") as out, open(tmp_path / "err", "w", encoding="utf-8") as err:
        run(out, err)
    assert (tmp_path / "out").read_text(encoding="utf-8") == "bertqa: step 2: skipped\nbertqa: step 3: skipped\n"
    with open(tmp_path / "err", encoding="utf-8", newline="") as err:
        text = err.read()
    assert text.count("\n") == 1 and not re.search("\r +\r", text)  # (its own close; not cleared, not ended)


def test_a_note_in_a_log_is_not_joined_to_a_bar_that_another_thread_draws(monkeypatch, tmp_path):
    """tqdm's monitor thread draws a bar (holding tqdm's lock) whenever its interval passes: between the note's
    ending of the bar's line and the note itself, the note went onto the end of the bar's line again. Here a draw
    is asked for at just that moment, every time (it waits for the lock: after the note)."""
    import threading

    from tqdm import tqdm

    from bertqa.files import note

    class Log(io.TextIOWrapper):
        racing = False

        def write(self, text):
            written = super().write(text)
            if text == "\n" and self.racing:  # the bar's line just ended: another thread draws it now
                drawer = threading.Thread(target=draw)
                drawer.start()
                drawer.join(0.2)  # (drawn at once without the lock; with it, once the note is out)
            return written

    def draw():
        with tqdm.get_lock():
            bar.refresh(nolock=True)

    with Log(open(tmp_path / "log", "wb"), encoding="utf-8") as log:
        monkeypatch.setattr(sys, "stdout", log)
        monkeypatch.setattr(sys, "stderr", log)
        bar = tqdm(total=10, file=log, mininterval=30, maxinterval=30)
        log.racing = True
        for i in range(3):
            note(f"bertqa: step {i}: skipped")
        log.racing = False
        bar.close()
        monkeypatch.undo()
    with open(tmp_path / "log", encoding="utf-8", newline="") as log:
        lines = log.read().split("\n")
    assert [line for line in lines if "bertqa: step" in line] == [f"bertqa: step {i}: skipped" for i in range(3)]


def test_the_loggers_handler_writes_to_stderr_as_it_is_when_it_writes(monkeypatch):
    """Not to the stream it was made with: a run started with stderr closed has /dev/null only while it runs, and
    a library caller (or a test) may give sys.stderr another stream later."""
    from bertqa import cli

    logger = logging.getLogger("bertqa")
    monkeypatch.setattr(logger, "handlers", [])
    cli._setup_logging()
    later = io.StringIO()
    monkeypatch.setattr(sys, "stderr", later)
    logger.warning("written where stderr is now")
    assert later.getvalue() == "bertqa: written where stderr is now\n"
    own = io.StringIO()
    assert logger.handlers[0].setStream(own) is later  # (logging's own way to give it another: still works)
    logger.warning("written to its own")
    assert own.getvalue() == "bertqa: written to its own\n" and "own" not in later.getvalue()


class _Terminal(io.TextIOWrapper):
    def isatty(self):
        return True


# (Not a terminal in another encoding: a terminal gives its lines one at a time, a buffer in blocks.)
@pytest.mark.parametrize("encoding, errors, message, terminal",
                         [("utf-8", "strict", "stdin line 2: not UTF-8 text", False),
                          ("utf-8", "surrogateescape", "stdin line 2: not UTF-8 text", False),
                          ("ascii", "strict", "stdin: not UTF-8 text", False),
                          ("utf-8", "strict", "stdin line 2: not UTF-8 text", True),
                          ("utf-8", "surrogateescape", "stdin line 2: not UTF-8 text", True)])  # fmt: skip
def test_questions_on_stdin_that_are_not_utf8(inputs, encoding, errors, message, terminal, capsys, monkeypatch):
    """How Python decodes stdin depends on the locale: strictly (a strict UTF-8 locale named no line), undecodable
    bytes as surrogates, or in another encoding. Typed questions (a terminal) are answered up to the bad line,
    which was named by neither stdin nor its number (and ended in Python's own decoding error)."""
    stdin = (_Terminal if terminal else io.TextIOWrapper)(io.BytesIO(b"Who won?\nWh\xffo?\n"), encoding=encoding,
                                                          errors=errors)  # fmt: skip
    monkeypatch.setattr(sys, "stdin", stdin)
    code, out, err = run_main(["ask", "--model", inputs["tiny"], "--context", "Ada won."], capsys, monkeypatch)
    assert code == 1 and one_error_line(err) == f"bertqa: error: {message}"
    assert len(out.splitlines()) == (1 if terminal else 0)  # the first typed question was answered


@pytest.mark.parametrize("flag", ["--question", "--context"])
def test_ask_names_a_flag_that_is_not_utf8_before_loading_the_model(flag, tmp_path, capsys, monkeypatch):
    """An undecodable byte in an argument (Python gives it as a surrogate) was "question is not valid Unicode",
    naming no flag, once the model had loaded."""
    given = {"--question": "Who won?", "--context": "Ada won.", flag: "Wh\udcffo"}
    args = ["ask", "--model", tmp_path / "no-such-model", *(x for kv in given.items() for x in kv)]
    code, out, err = run_main(args, capsys, monkeypatch)
    assert code == 1 and one_error_line(err) == f"bertqa: error: {flag}: not UTF-8 text (character 3)" and out == ""


def test_ask_with_stdin_closed_and_no_question(inputs, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", None)  # what Python makes of a closed stdin (`bertqa ask ... <&-`)
    code, out, err = run_main(["ask", "--model", inputs["tiny"], "--context", "Ada won."], capsys, monkeypatch)
    assert code == 1 and out == "" and "no --question and no stdin" in one_error_line(err)  # was an internal error


def test_blank_lines_on_stdin_end_the_questions_or_are_refused(inputs, capsys, monkeypatch):
    argv = ["ask", "--model", inputs["tiny"], "--context", "Ada won.", "--precision", "fp32", "--device", "cpu"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("Who won?\nWho lost?\n\n  \n"))  # an editor's trailing lines
    code, out, err = run_main(argv, capsys, monkeypatch)
    assert code == 0 and len(out.splitlines()) == 2, err
    # Between questions a blank line is refused: the answer lines would no longer match the question lines.
    monkeypatch.setattr(sys, "stdin", io.StringIO("Who won?\n\nWho lost?\n"))
    code, out, err = run_main(argv, capsys, monkeypatch)
    assert (
        code == 1
        and out == ""
        and one_error_line(err)
        == ("bertqa: error: stdin line 2: empty question (one question per line, one answer line each)")
    )
    # So is a line of invisible characters alone (zero-width, control): the model would see no question token.
    monkeypatch.setattr(sys, "stdin", io.StringIO("Who won?\n\u200b\ufeff\nWho lost?\n"))
    code, out, err = run_main(argv, capsys, monkeypatch)
    assert (
        code == 1
        and out == ""
        and one_error_line(err) == ("bertqa: error: stdin line 2: empty question (only invisible characters)")
    )
    code, out, err = run_main([*argv, "--question", "\u200b"], capsys, monkeypatch)
    assert code == 1 and out == "" and "--question: empty (only white space or invisible characters)" in err
    # (mutation review) A context of invisible characters alone is answered (with nothing), not refused.
    code, out, err = run_main([*argv[:3], "--context", "\u200b\u200b", *argv[5:], "--question", "Who?"], capsys,
                              monkeypatch)  # fmt: skip
    assert code == 0 and out.strip() == "", err


def test_ask_prints_one_line_a_question_even_for_answers_across_line_breaks():
    """A span of a hard-wrapped --context-file crosses line breaks; printed as is, it would shift every later answer
    line against its question line, and a tab in it would add a --top-k column."""
    from bertqa.cli import _format_answers

    spans = [{"answer": "Ada\nBrightwater", "start": 0, "end": 15}, {"answer": "the\tbridge \r\n keeper", "start": 1},
             {"answer": "5\u00a0km  east\u2028of it\x85", "start": 2}]  # fmt: skip
    assert _format_answers(spans[0], as_json=False) == "Ada Brightwater"
    out = _format_answers(spans, as_json=False)
    assert out == "Ada Brightwater\tthe bridge keeper\t5\u00a0km  east of it"  # other spaces as they are
    assert out.splitlines() == [out] and len(out.split("\t")) == 3
    assert _format_answers({"answer": "Brightwater\n"}, as_json=False) == "Brightwater"
    assert _format_answers({"answer": "a" + " " * 100_000 + "b \n"}, as_json=False) == "a" + " " * 100_000 + "b"
    as_json = _format_answers(spans, as_json=True)
    assert json.loads(as_json) == spans and as_json.splitlines() == [as_json]  # exact text, offsets; U+2028 escaped


def test_usage_errors_exit_2_in_one_line(capsys, monkeypatch):
    for argv, command in ((["evaluate"], "bertqa evaluate"), (["ask", "--model", "m", "--top-k", "many"], "bertqa ask"),
                          (["frobnicate"], "bertqa"), (["ask", "--model", "m", "--bogus"], "bertqa ask"),
                          (["export", "onnx", "--model", "m", "--output", "m.onnx", "--bogus"], "bertqa export onnx"),
                          (["export", "onnx", "--bogus"], "bertqa export onnx")):  # fmt: skip
        code, _, err = run_main(argv, capsys, monkeypatch)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("bertqa: error: "), err  # as every other error
        assert lines[0].endswith(f"(see {command} --help)"), err


def test_a_1mb_context_file_is_answered(inputs, tmp_path, capsys, monkeypatch):
    context = "The market opened every morning at the usual hour. " * 20_000 + "Ada Brightwater opened the bridge."
    (tmp_path / "big.txt").write_text(context)
    code, out, err = run_main(["ask", "--model", inputs["tiny"], "--question", "Who opened the bridge?",
                               "--context-file", tmp_path / "big.txt", "--json", "--precision", "fp32",
                               "--device", "cpu"], capsys, monkeypatch)  # fmt: skip
    assert code == 0, err
    answer = json.loads(out)
    assert len(context) > 1_000_000 and context[answer["start"] : answer["end"]] == answer["answer"] != ""


# --- Bugs are not user mistakes: --debug shows their traceback --------------------------------------------


def _bug(args):
    raise RuntimeError("a bug deep inside")


@pytest.mark.parametrize(
    "argv, env, traceback",
    [
        (["score", "a.json", "b.json"], {}, False),
        (["--debug", "score", "a.json", "b.json"], {}, True),
        (["score", "--debug", "a.json", "b.json"], {}, True),
        (["score", "a.json", "b.json"], {"BERTQA_DEBUG": "1"}, True),
        (["score", "a.json", "b.json"], {"BERTQA_DEBUG": "0"}, False),
    ],
)
def test_a_bug_is_one_line_and_its_traceback_comes_with_debug(argv, env, traceback, capsys, monkeypatch):
    monkeypatch.setattr(cli, "cmd_score", _bug)
    code, _, err = run_main(argv, capsys, monkeypatch, env)
    assert code == 1 and ("Traceback" in err) == traceback
    if traceback:
        assert 'raise RuntimeError("a bug deep inside")' in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("bertqa: error: internal error (RuntimeError: a bug deep inside)")
    if not traceback:
        one_error_line(err)
        assert "--debug" in last and "BERTQA_DEBUG=1" in last


@pytest.mark.parametrize(
    "error",
    [
        MemoryError(),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] . "
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 TB"
        ),
        RuntimeError("std::bad_alloc"),  # (review) C++'s, through torch, under ulimit -d: an internal error
    ],
)
def test_running_out_of_host_memory_is_said_so_in_one_line(error, capsys, monkeypatch):
    def exhausted(args):
        raise error

    monkeypatch.setattr(cli, "cmd_score", exhausted)
    monkeypatch.setattr(cli, "_memory_limit", lambda: None)
    code, _, err = run_main(["score", "a.json", "b.json"], capsys, monkeypatch)
    detail = f" ({error})" if str(error) else ""
    assert code == 1 and one_error_line(err) == (
        f"bertqa: error: out of memory{detail}; a smaller batch or window length may fit"
    )
    monkeypatch.setattr(cli, "_memory_limit", lambda: "ulimit -d")  # (diff review: a limit set is named)
    code, _, err = run_main(["score", "a.json", "b.json"], capsys, monkeypatch)
    assert one_error_line(err).endswith("; a smaller batch or window length may fit, or is ulimit -d too low?")


def test_a_library_the_memory_limit_leaves_no_room_to_load_is_said_so(capsys, monkeypatch):
    """(review) Under an address-space limit (ulimit -v) the dynamic loader cannot map a library torch or
    safetensors imports: "internal error (ImportError: ...) ... please report it"."""

    def exhausted(args):
        raise ImportError(".../_safetensors_rust.abi3.so: failed to map segment from shared object")

    monkeypatch.setattr(cli, "cmd_score", exhausted)
    monkeypatch.setattr(cli, "_memory_limit", lambda: "ulimit -v")
    code, _, err = run_main(["score", "a.json", "b.json"], capsys, monkeypatch)
    assert code == 1 and one_error_line(err) == (
        "bertqa: error: out of memory loading a library (.../_safetensors_rust.abi3.so: failed to map segment from "
        "shared object); is ulimit -v too low?"
    )
    monkeypatch.setattr(cli, "_memory_limit", lambda: "ulimit -d")  # (diff review: the limit that is set is named)
    code, _, err = run_main(["score", "a.json", "b.json"], capsys, monkeypatch)
    assert code == 1 and one_error_line(err).endswith("from shared object); is ulimit -d too low?")
    # (diff review) glibc's words for a library's zero-filled part it could not map
    assert cli.error_line(ImportError("libc10.so: cannot map zero-fill pages"), False) == (
        "out of memory loading a library (libc10.so: cannot map zero-fill pages); is ulimit -d too low?"
    )
    # (diff review) glibc words a library on a noexec mount the same way: with no memory limit, not memory
    monkeypatch.setattr(cli, "_memory_limit", lambda: None)
    code, _, err = run_main(["score", "a.json", "b.json"], capsys, monkeypatch)
    assert code == 1 and "out of memory" not in err and "internal error (ImportError: " in one_error_line(err)


def test_the_memory_limits_set_are_named(monkeypatch):
    """(diff review) With both set, the one that bit may be either: a roomy ulimit -v named alone sent the user to
    raise the wrong one. CPython's own failed allocation while importing under a limit is memory too."""
    try:
        import resource
    except ImportError:
        platform_skip("no resource module (Windows): no memory limit to set")
    saved = {name: resource.getrlimit(name) for name in (resource.RLIMIT_AS, resource.RLIMIT_DATA)}
    if any(hard != resource.RLIM_INFINITY for _, hard in saved.values()):
        platform_skip("a hard memory limit is set for this process: no soft limit can be lifted to test")
    unlimited = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
    try:
        for name in saved:
            resource.setrlimit(name, unlimited)
        assert cli._memory_limit() is None
        for name in saved:  # (set, far above what the process uses)
            resource.setrlimit(name, (2**50, resource.RLIM_INFINITY))
        assert cli._memory_limit() == "ulimit -v or ulimit -d"
        resource.setrlimit(resource.RLIMIT_AS, unlimited)
        assert cli._memory_limit() == "ulimit -d"
        assert cli.error_line(SystemError("error return without exception set"), False) == (
            "out of memory loading a library (error return without exception set); is ulimit -d too low?"
        )
        resource.setrlimit(resource.RLIMIT_DATA, unlimited)
        assert cli.error_line(SystemError("error return without exception set"), False).startswith("internal error")
    finally:
        for name, limits in saved.items():
            resource.setrlimit(name, limits)


def test_debug_also_shows_where_a_user_error_came_from(tmp_path, capsys, monkeypatch):
    code, _, err = run_main(["--debug", "score", tmp_path / "absent.json", tmp_path / "p.json"], capsys, monkeypatch)
    assert code == 1 and "Traceback" in err and err.strip().splitlines()[-1].endswith("absent.json: no such file")


def test_ctrl_c_exits_130_in_one_line_and_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    from bertqa import files

    def interrupted(args):
        with files.atomic_path(tmp_path / "out.json") as tmp:
            tmp.write_text("{half")
            raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_score", interrupted)
    code, _, err = run_main(["score", "a.json", "b.json"], capsys, monkeypatch)
    assert code == 130 and err.strip() == "bertqa: interrupted" and tree(tmp_path) == []


class _Writes(io.StringIO):
    """A stderr that keeps each write apart."""

    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, text):
        self.writes.append(text)
        return super().write(text)


@pytest.mark.parametrize("raised, line", [(KeyboardInterrupt, "bertqa: interrupted\n"),
                                          (ValueError("a.json: bad"), "bertqa: error: a.json: bad\n")])  # fmt: skip
def test_the_last_line_is_written_whole(raised, line, monkeypatch):
    """In one write, newline and all: under torchrun every rank stopped by one failure says so at once, and lines
    written in two parts ran together, two ranks' errors on one line."""

    def fails(args):
        raise raised

    monkeypatch.setattr(cli, "cmd_score", fails)
    monkeypatch.setattr(logging.getLogger("bertqa"), "handlers", [])
    monkeypatch.setattr(sys, "stderr", _Writes())
    cli.main(["score", "a.json", "b.json"])
    assert sys.stderr.writes == [line]


def test_os_errors_read_as_file_and_reason(capsys, monkeypatch, tmp_path):
    def unreadable(args):
        open(tmp_path / "absent.json")

    monkeypatch.setattr(cli, "cmd_score", unreadable)
    code, _, err = run_main(["score", "a.json", "b.json"], capsys, monkeypatch)
    assert code == 1 and one_error_line(err) == f"bertqa: error: {tmp_path / 'absent.json'}: No such file or directory"


@pytest.mark.parametrize(
    "field, value, message",
    [("seed", "3", "--seed must be an integer, got '3'"),  # failed inside torch's seeding, naming no field
     ("seed", True, "--seed must be an integer, got True"),  # ran with seed 1
     ("save_every", 1.5, "--save-every must be an integer, got 1.5"),  # checkpoints where step % 1.5 == 0
     ("epochs", "2", "--epochs must be a number, got '2'"),
     ("resume", "no", "--resume must be True or False, got 'no'"),  # a true flag: resumed
     ("version_2_with_negative", "no", "--version-2-with-negative must be True, False or None, got 'no'"),
     ("cache_dir", 3, "--cache-dir must be a string or None, got 3"),
     ("cache_dir", "", "--cache-dir '': empty; name a folder, or None for no features cache"),  # (the current one)
     ("train_batch_size", 2.0, "--batch-size must be an integer, got 2.0")],
)  # fmt: skip
def test_the_api_configs_refuse_a_value_of_the_wrong_type_naming_the_field(inputs, tmp_path, field, value, message):
    """Python API users pass anything: "no" was a true flag (version_2_with_negative="no" post-processed a v1.1 file
    as v2.0 and scored it as v1.1, every answer null), "3" a seed that failed deep inside torch."""
    from bertqa.evaluate import EvalConfig
    from bertqa.train import TrainConfig

    base = dict(model=str(inputs["tiny"]), output_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError) as e:
        TrainConfig(**base, train_file=str(inputs["squad"]), **{field: value}).validate()
    assert str(e.value) == message and not (tmp_path / "out").exists()
    if field in {f.name for f in dataclasses.fields(EvalConfig)}:
        with pytest.raises(ValueError, match=re.escape(message)):
            EvalConfig(**base, predict_file=str(inputs["squad"]), **{field: value}).validate()
    # The right types pass: ints for floats, os.PathLike for strings, numpy scalars.
    ok = TrainConfig(model=Path(inputs["tiny"]), train_file=str(inputs["squad"]), output_dir=str(tmp_path / "ok"), lr=1,
                     seed=np.int64(3), resume=np.bool_(False), epochs=np.float32(1), train_batch_size=np.int64(8))  # fmt: skip
    ok.check_types()  # (and left as they were: the caller's object; a run works on a plain copy)
    assert ok.model == Path(inputs["tiny"]) and type(ok.seed) is np.int64
    run = plain_copy(dataclasses.replace(ok, version_2_with_negative=np.bool_(True)))  # (`is True`: v2.0 scoring)
    assert (run.model, run.seed, run.version_2_with_negative, type(run.epochs)) == (str(inputs["tiny"]), 3, True, float)


def test_an_error_without_a_message_is_a_bug_and_main_gives_stdout_back(capsys, monkeypatch):
    """(mutation review) A ValueError with no message is no user's mistake (it would print `bertqa: error: ` and
    nothing); after main, sys.stdout is the caller's own again."""

    def bare(args):
        raise ValueError()

    monkeypatch.setattr(cli, "cmd_score", bare)
    before = sys.stdout
    code, _, err = run_main(["score", "a.json", "b.json"], capsys, monkeypatch)
    assert sys.stdout is before
    assert code == 1 and one_error_line(err).startswith(
        "bertqa: error: internal error (ValueError); rerun with --debug"
    )


def test_cache_dir_none_is_no_cache():
    """(mutation review) `--cache-dir none` turns the features cache off (it was a folder named "none")."""
    import argparse

    from bertqa.evaluate import EvalConfig

    given = dict(model="m", predict_file="p.json", output_dir="o")
    assert cli._config(EvalConfig, argparse.Namespace(**given, cache_dir="none")).cache_dir is None
    assert cli._config(EvalConfig, argparse.Namespace(**given, cache_dir="cache")).cache_dir == "cache"
    assert cli._config(EvalConfig, argparse.Namespace(**given)).cache_dir == EvalConfig(**given).cache_dir is not None
