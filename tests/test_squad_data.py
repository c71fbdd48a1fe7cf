"""Reading and validating SQuAD files."""

import copy
import json
import logging
import subprocess
import sys

import pytest

from bertqa.squad.data import SquadFormatError, is_squad_v2, parse_squad, read_squad

CONTEXT = "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy."


def squad(qas, context=CONTEXT, version="1.1"):
    return {"version": version, "data": [{"title": "Normans", "paragraphs": [{"context": context, "qas": qas}]}]}


def qa(qid, text="Normandy", start=None, **extra):
    start = CONTEXT.find(text) if start is None else start
    return {"id": qid, "question": "Where?", "answers": [{"text": text, "answer_start": start}], **extra}


def write(tmp_path, doc, name="data.json"):
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc), encoding="utf-8")
    return path


def test_reads_v1(tmp_path):
    doc = squad([qa("a"), qa("b", "10th and 11th centuries")])
    doc["data"][0]["paragraphs"][0]["qas"][1]["answers"].append({"text": "11th centuries", "answer_start": 48})
    path = write(tmp_path, doc)
    assert not is_squad_v2(path)
    ex = read_squad(path, is_training=False)
    assert [e.qid for e in ex] == ["a", "b"]
    assert ex[1].answers == ["10th and 11th centuries", "11th centuries"]  # evaluation keeps every gold
    assert ex[0].title == "Normans" and ex[0].context == CONTEXT and not ex[0].is_impossible
    train = read_squad(path, is_training=True)
    assert train[1].answers == ["10th and 11th centuries"]  # training keeps the label only
    assert CONTEXT[train[1].answer_starts[0] :].startswith(train[1].answers[0])


def test_reads_v2(tmp_path):
    impossible = {"id": "n", "question": "Who?", "answers": [], "is_impossible": True,
                  "plausible_answers": [{"text": "Normans", "answer_start": 4}]}  # fmt: skip
    doc = squad([qa("y", is_impossible=False), impossible], version="v2.0")
    path = write(tmp_path, doc)
    assert is_squad_v2(path) and is_squad_v2(doc)
    doc["version"] = "1.1"
    assert is_squad_v2(doc)  # a question marked is_impossible alone says v2.0
    for is_training in (False, True):
        y, n = read_squad(path, is_training)
        assert not y.is_impossible and y.answers == ["Normandy"]
        assert n.is_impossible and n.answers == [] and n.answer_starts == []
        assert n.plausible_answers == ["Normans"]
    # A v1.1 file whose converter wrote "is_impossible": false everywhere is v1.1 (a null answer must not win).
    assert not is_squad_v2(squad([qa("a", is_impossible=False), qa("b", is_impossible=False)]))
    # v2.0 as HF datasets exports it: no is_impossible key; no answers means unanswerable (the official script's
    # reading), in evaluation and training alike.
    for q in doc["data"][0]["paragraphs"][0]["qas"]:
        q.pop("is_impossible")
    doc["version"] = "v2.0"
    path = write(tmp_path, doc)
    for is_training in (False, True):
        y, n = read_squad(path, is_training)
        assert not y.is_impossible and n.is_impossible
    # ... and without its version too: nothing says v2.0 but --version-2-with-negative (parse_squad's v2).
    doc.pop("version")
    with pytest.raises(SquadFormatError, match="question id 'n': no answers and not marked is_impossible"):
        parse_squad(doc, path, False)
    for is_training in (False, True):
        y, n = parse_squad(doc, path, is_training, v2=True)
        assert not y.is_impossible and n.is_impossible


def test_training_realigns_nearby_and_skips_the_rest(tmp_path, caplog):
    true = CONTEXT.find("Normandy")
    doc = squad(
        [
            qa("near", start=true - 3),
            qa("absent", "Vikings"),
            qa("ok"),
            qa("far", "Normans", start=60),
            qa("neg", "dy", start=-3),
        ]
    )
    path = write(tmp_path, doc)
    report = {}
    with caplog.at_level(logging.WARNING, logger="bertqa.squad.data"):
        ex = read_squad(path, is_training=True, report=report)
    assert [e.qid for e in ex] == ["near", "ok", "far"]  # "neg": CONTEXT[-3:-1] is "dy", but -3 is no offset
    assert ex[0].answer_starts == [true]
    assert ex[2].answer_starts == [CONTEXT.find("Normans")]  # 56 characters back: within the window
    assert report == {"questions": 5, "realigned": 2, "skipped": 2, "skipped_ids": ["absent", "neg"]}
    (record,) = caplog.records
    assert "skipped 2 of 5" in record.getMessage() and "absent, neg" in record.getMessage()
    # Evaluation never drops or edits a question.
    ex = read_squad(path, is_training=False)
    assert [e.qid for e in ex] == ["near", "absent", "ok", "far", "neg"] and ex[0].answer_starts == [true - 3]


def test_training_skips_answers_with_no_token(tmp_path):
    # Characters BERT's text cleaning deletes (a zero-width space is a format character) make no token: such an
    # answer would be labelled [CLS], "no answer", for an answerable question.
    context = "Normandy\u200b\ufeff is in France."
    doc = squad([qa("zw", "\u200b\ufeff", start=8), qa("blank", " ", start=8), qa("ok", "France", start=context.find("France"))],
                context=context)  # fmt: skip
    report = {}
    assert [e.qid for e in read_squad(write(tmp_path, doc), is_training=True, report=report)] == ["ok"]
    assert report["skipped_ids"] == ["zw", "blank"]
    # Which characters the cleaning deletes is the tokenizer library's word, not Python's tables: it keeps code
    # points that Python's Unicode has but its own does not (U+1FAE8, a format character U+0890, unassigned ones),
    # which the model sees as [UNK]; a question of them is a question.
    for text in ("\U0001fae8", "\u0890", "\u0378"):
        doc = squad([{**qa("q", "France", start=context.find("France")), "question": text}], context=context)
        (ex,) = read_squad(write(tmp_path, doc), is_training=False)
        assert ex.question == text


def test_realign_picks_the_closest_occurrence(tmp_path):
    context = "cat " * 40
    doc = squad([qa("q", "cat", start=41)], context=context)  # occurrences at 40 and 44
    (ex,) = read_squad(write(tmp_path, doc), is_training=True)
    assert ex.answer_starts == [40]


def test_realign_window_is_bounded(tmp_path):
    context = "Paris" + " filler" * 30
    doc = squad([qa("q", "Paris", start=len(context) - 1)], context=context)
    report = {}
    assert read_squad(write(tmp_path, doc), is_training=True, report=report) == []
    assert report["skipped"] == 1


def test_realigning_covers_answers_ending_past_the_window_and_ties_go_to_the_earlier(tmp_path):
    """(mutation review) The window runs REALIGN_WINDOW past the answer's end, not its start; an answer the same
    distance before and after answer_start is moved to the earlier one."""
    context = "." * 100 + "x" * 60 + "needle word" + "." * 29
    doc = squad([qa("far", "needle word", start=100)], context=context)
    report = {}
    assert [e.answer_starts for e in read_squad(write(tmp_path, doc), True, report)] == [[160]]
    assert report["realigned"] == 1
    doc = squad([qa("tie", "ans", start=4)], context="ans_____ans")
    assert [e.answer_starts for e in read_squad(write(tmp_path, doc), True)] == [[0]]


def test_blank_questions_and_contexts_are_skipped_in_training_and_refused_in_evaluation(tmp_path):
    """(mutation review) A question of whitespace and zero-width characters asks the model nothing: refused where an
    evaluation reads it, skipped (counted) where training does; a blank context is skipped in training too."""
    for question in (" \u200b ", "\u200b"):
        doc = squad([{**qa("blank"), "question": question}, qa("ok")])
        with pytest.raises(SquadFormatError, match="question id 'blank': 'question' is empty$"):
            read_squad(write(tmp_path, doc), is_training=False)
        report = {}
        assert [e.qid for e in read_squad(write(tmp_path, doc), True, report)] == ["ok"]
        assert report["skipped_ids"] == ["blank"]
    doc = squad([qa("empty", "x", start=0)], context=" ")
    report = {}
    assert read_squad(write(tmp_path, doc), True, report) == [] and report["skipped"] == 1


def mutate(fn):
    doc = squad([qa("q0"), qa("q1")])
    doc = copy.deepcopy(doc)
    fn(doc)
    return doc


def _qas(doc):
    return doc["data"][0]["paragraphs"][0]["qas"]


BAD = [
    ("{oops", "not valid JSON (line 1 column 2"),
    # HF datasets' layout of SQuAD: JSON lines of flat records, or those records as the 'data' list.
    (
        '{"id": "1"}\n{"id": "2"}\n',
        "not valid JSON (line 2 column 1: Extra data): more than one JSON value (JSON lines?)",
    ),
    (
        {"data": [{"id": "1", "context": "c", "question": "q?", "answers": {"text": ["c"], "answer_start": [0]}}]},
        "article 0: a question record ('context', 'question', 'answers', as HF datasets lays SQuAD out), not a SQuAD",
    ),  # fmt: skip
    # ... or those records as a JSON array (Dataset.to_json(lines=False)), or one of them (JSON lines of one line).
    (
        [{"id": "1", "context": "c", "question": "q?", "answers": {"text": ["c"], "answer_start": [0]}}],
        "a list of question records ('context', 'question', 'answers', as HF datasets lays SQuAD out), not a SQuAD file",
    ),  # fmt: skip
    (
        '{"id": "1", "context": "c", "question": "q?", "answers": {"text": ["c"], "answer_start": [0]}}\n',
        "a question record ('context', 'question', 'answers', as HF datasets lays SQuAD out), not a SQuAD file",
    ),  # fmt: skip
    (  # (what Dataset.to_json() writes: the message said to make it one JSON value, which was refused next)
        '{"id": "1", "context": "c", "question": "q?", "answers": {"text": ["c"], "answer_start": [0]}}\n'
        '{"id": "2", "context": "c", "question": "q?", "answers": {"text": ["c"], "answer_start": [0]}}\n',
        "JSON lines of question records ('context', 'question', 'answers', as HF datasets lays SQuAD out), not a SQuAD",
    ),  # fmt: skip
    ([1, 2], "not a SQuAD file"),
    ({"version": "1.1"}, "not a SQuAD file"),
    (mutate(lambda d: d["data"].append("x")), "article 1: 'data[]' must be a JSON object, not string"),
    (mutate(lambda d: d["data"][0].pop("paragraphs")), "article 0: 'paragraphs' is missing or null"),
    (mutate(lambda d: d["data"][0].update(title=3)), "article 0: 'title' must be a JSON string"),
    (
        mutate(lambda d: d["data"][0]["paragraphs"][0].update(context=None)),
        "article 0 paragraph 0: 'context' is missing or null",
    ),  # fmt: skip
    (
        mutate(lambda d: d["data"][0]["paragraphs"][0].update(qas={})),
        "article 0 paragraph 0: 'qas' must be a JSON array, not object",
    ),  # fmt: skip
    (mutate(lambda d: _qas(d)[1].pop("id")), "article 0 paragraph 0 question 1: 'id' is missing or null"),
    (mutate(lambda d: _qas(d)[1].update(id=7)), "question 1: 'id' must be a JSON string, not integer"),
    (mutate(lambda d: _qas(d)[1].pop("question")), "question id 'q1': 'question' is missing or null"),
    (mutate(lambda d: _qas(d)[1].update(question=None)), "question id 'q1': 'question' is missing or null"),
    (mutate(lambda d: _qas(d)[1].update(answers="x")), "question id 'q1': 'answers' must be a JSON array"),
    (mutate(lambda d: _qas(d)[0]["answers"][0].pop("text")), "question id 'q0': 'answers[0].text' is missing or null"),
    (
        mutate(lambda d: _qas(d)[0]["answers"][0].update(answer_start="3")),
        "question id 'q0': 'answers[0].answer_start' must be a JSON integer, not string",
    ),  # fmt: skip
    (
        mutate(lambda d: _qas(d)[0]["answers"][0].update(answer_start=True)),
        "'answers[0].answer_start' must be a JSON integer, not boolean",
    ),  # fmt: skip
    (mutate(lambda d: _qas(d)[1].update(id="q0")), "question id 'q0': duplicate question id"),
    (mutate(lambda d: _qas(d)[1].update(answers=[])), "question id 'q1': no answers and not marked is_impossible"),
    (mutate(lambda d: _qas(d)[1].update(is_impossible=True)), "is_impossible is true but answers is not empty"),
    (mutate(lambda d: _qas(d)[1].update(is_impossible="no")), "'is_impossible' must be a JSON boolean"),
    (mutate(lambda d: _qas(d)[1].update(plausible_answers=[{}])), "'plausible_answers[0].text' is missing or null"),
]


@pytest.mark.parametrize("is_training", [False, True])
@pytest.mark.parametrize("content, message", BAD)
def test_malformed_files_give_one_line_naming_file_and_place(tmp_path, content, message, is_training):
    path = write(tmp_path, content)
    with pytest.raises(SquadFormatError) as err:
        read_squad(path, is_training)
    text = str(err.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text


def test_optional_fields_may_be_null(tmp_path):
    """A field that may be left out may be null too (JSON writers put null for absent), not 'missing or null'."""
    doc = mutate(lambda d: (d["data"][0].update(title=None), [q.update(is_impossible=None, plausible_answers=None)
                                                             for q in _qas(d)]))  # fmt: skip
    for is_training in (False, True):
        ex = read_squad(write(tmp_path, doc), is_training)
        assert ex[0].title == "" and not any(e.is_impossible or e.plausible_answers for e in ex)
    # Evaluation and prediction need no answer_start (the official scripts read only the texts): -1, no position.
    # It stopped them with "'answers[0].answer_start' is missing or null". Training needs it.
    startless = mutate(lambda d: [a.pop("answer_start") for q in _qas(d) for a in q["answers"]])
    ex = read_squad(write(tmp_path, startless), False)
    assert ex[0].answer_starts == [-1] and ex[0].answers == ["Normandy"]
    with pytest.raises(SquadFormatError, match="question id 'q0': 'answers\\[0\\].answer_start' is missing"):
        read_squad(write(tmp_path, startless), True)
    # plausible_answers' starts are read by nothing, training included.
    plausible = mutate(lambda d: _qas(d)[1].update(answers=[], is_impossible=True, plausible_answers=[{"text": "x"}]))
    assert read_squad(write(tmp_path, plausible), True)[1].plausible_answers == ["x"]
    unanswered = mutate(lambda d: _qas(d)[1].update(answers=None))  # a prediction input needs no answers
    assert parse_squad(unanswered, "in.json", False, require_answers=False)[1].answers == []
    with pytest.raises(SquadFormatError, match="question id 'q1': no answers and not marked is_impossible"):
        parse_squad(unanswered, "in.json", False)


def test_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_squad(tmp_path / "absent.json", False)
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{"data": ["caf\xe9"]}')
    with pytest.raises(SquadFormatError, match="not UTF-8"):
        read_squad(path, False)


def test_real_files(squad_dir):
    report = {}
    train = read_squad(squad_dir / "train-subset.json", is_training=True, report=report)
    assert len(train) == 11877 and report["skipped"] == 0 and report["realigned"] == 0
    dev = read_squad(squad_dir / "dev-a.json", is_training=False)
    assert len(dev) == 4961 and max(len(e.answers) for e in dev) == 6
    assert not is_squad_v2(squad_dir / "dev-a.json")


def test_squad_package_does_not_import_torch():
    code = "import sys, bertqa.squad; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
