"""Read and validate SQuAD v1.1 / v2.0 JSON files into `Example`s.

Every problem with a file is a `SquadFormatError` whose message is one line naming the file, where in it
(question id, or article/paragraph index when the id itself is unusable) and what is wrong, so that a
user can fix the file without reading a traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bertqa.squad.download import download_squad  # noqa: F401  (re-exported: "squad data" includes getting it)

log = logging.getLogger(__name__)

# How far (in characters, either side) a training answer may be from its stated `answer_start` and still
# be re-anchored to its closest occurrence. Offsets in hand-edited or converted SQuAD files are typically
# off by a few characters (whitespace or markup removed before the answer); a larger shift more likely
# points at a different mention of the same words, which would teach the wrong span.
REALIGN_WINDOW = 64


class SquadFormatError(ValueError):
    """A SQuAD file that cannot be read as SQuAD (the message is one line)."""


@dataclass
class Example:
    """One question about one context.

    For evaluation `answers` holds every gold answer text (the official scripts take the max over them);
    for training only the first answer is kept, re-anchored to the context, since it is the only label.
    """

    qid: str
    question: str
    context: str
    answers: list[str]
    answer_starts: list[int]
    is_impossible: bool = False
    title: str = ""
    plausible_answers: list[str] = field(default_factory=list)  # v2.0 only: what annotators half-found


def load_json(path: str | os.PathLike) -> dict:
    """Parse a JSON file, turning every way it can fail into a one-line error naming the file."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: no such file") from None
    except OSError as e:
        raise SquadFormatError(f"{p}: cannot read ({e.strerror})") from None
    try:
        return json.loads(raw)
    except UnicodeDecodeError as e:
        raise SquadFormatError(f"{p}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        # JSON lines (one record a line, as HF datasets' to_json writes them) stop at the second record.
        hint = ": more than one JSON value (JSON lines?); the file must hold one" if e.msg == "Extra data" else ""
        if hint and _is_hf_record(json.loads(e.doc[: e.pos])):  # (the first value, which parsed)
            raise SquadFormatError(f"{p}: JSON lines of question records {HF_RECORD}, not a SQuAD file: "
                                   f"{SQUAD_LAYOUT}") from None  # fmt: skip
        raise SquadFormatError(f"{p}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg}){hint}") from None
    except RecursionError:
        raise SquadFormatError(f"{p}: not usable JSON (nested too deeply)") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise SquadFormatError(f"{p}: not usable JSON ({str(e).splitlines()[0][:200]})") from None


def is_squad_v2(path_or_json) -> bool:
    """True for a SQuAD v2.0 file: its version says so or a question is marked `is_impossible` (some
    converters write `"is_impossible": false` into v1.1 files)."""
    doc = load_json(path_or_json) if isinstance(path_or_json, (str, os.PathLike)) else path_or_json
    if not isinstance(doc, dict):  # not SQuAD at all: parse_squad says so, naming the file
        return False
    if str(doc.get("version", "")).lstrip("v").startswith("2"):
        return True
    for article in _items(doc, "data"):
        for paragraph in _items(article, "paragraphs"):
            if any(qa.get("is_impossible") is True for qa in _items(paragraph, "qas") if isinstance(qa, dict)):
                return True
    return False


def _items(parent, key: str) -> list:
    """parent[key] where parent is an object and that is a list, else nothing (a malformed file is
    parse_squad's to report)."""
    value = parent.get(key) if isinstance(parent, dict) else None
    return value if isinstance(value, list) else []


# Users read JSON, so name JSON's types rather than Python's.
_JSON_TYPE = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


def _expect(value, kind: type, what: str, where: str, path):
    """Type check one field; a JSON true/false is never accepted as a number."""
    if value is None:
        raise SquadFormatError(f"{path}: {where}: '{what}' is missing or null")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SquadFormatError(
            f"{path}: {where}: '{what}' must be a JSON {_JSON_TYPE[kind]}, "
            f"not {_JSON_TYPE.get(type(value), type(value).__name__)}"
        )
    return value


# A BMP's worth of characters (a few MB), as BertTokenizer.in_word's: a server's clients may send every code point
# there is, and unbounded, the two caches grew by 275 MB that was never given back.
@functools.lru_cache(maxsize=65536)
def bert_removes(ch: str) -> bool:
    """Whether BERT's text cleaning deletes `ch` (control and format characters such as a BOM or a direction
    mark, NUL, U+FFFD) before words are split: it is in no word, and words on either side of it join. Asked of
    the `tokenizers` library's own cleaning, whose Unicode tables are not Python's (it keeps unassigned code
    points and format characters newer than its tables: they are [UNK] to the model, not nothing)."""
    if "\ud800" <= ch <= "\udfff":  # half a surrogate pair: not text, refused where it is read (unpaired_surrogate)
        return False
    return _cleaning().normalize_str(ch) == ""


@functools.cache
def _cleaning():
    from tokenizers import normalizers  # (here, so that `bertqa score`, which reads SQuAD files too, does not load it)

    return normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=False, strip_accents=False,
                                      lowercase=False)  # fmt: skip


def blank(text: str) -> bool:
    """Whether `text` gives BERT no token: only whitespace and characters its cleaning deletes (bert_removes)."""
    return all(c.isspace() or bert_removes(c) for c in text)


def unpaired_surrogate(text: str) -> int | None:
    """Index of the first unpaired surrogate in `text`, else None. JSON's "\\ud800" escapes and undecodable
    bytes read with Python's surrogateescape make such strings: not Unicode text, so they can be neither
    tokenised nor written out as UTF-8."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def _text(value, what: str, where: str, path) -> str:
    """A string field that must also be valid Unicode text."""
    _expect(value, str, what, where, path)
    at = unpaired_surrogate(value)
    if at is not None:
        raise SquadFormatError(
            f"{path}: {where}: '{what}' is not valid Unicode (an unpaired surrogate {value[at]!r} at character {at})"
        )
    return value


def _optional(record: dict, key: str, default):
    """A field that may be left out, and so may be null (JSON writers put null for absent)."""
    value = record.get(key)
    return default if value is None else value


def _realign(context: str, text: str, start: int) -> int | None:
    """Position of `text` in `context` closest to `start` (within REALIGN_WINDOW), or None."""
    lo = max(0, start - REALIGN_WINDOW)
    hi = max(lo, min(len(context), start + len(text) + REALIGN_WINDOW))  # (a negative end would count from the end)
    best = None
    pos = context.find(text, lo, hi)
    while pos != -1:
        if best is None or abs(pos - start) < abs(best - start):
            best = pos
        pos = context.find(text, pos + 1, hi)
    return best


def _read_answers(qa: dict, key: str, where: str, path, need_starts: bool = True) -> tuple[list[str], list[int]]:
    """The answers' texts and start offsets. Without `need_starts` (evaluation and prediction: they label no
    windows to learn from, and the official scripts read only the texts) a missing start is -1, no position."""
    answers = _optional(qa, key, [])
    _expect(answers, list, key, where, path)
    texts, starts = [], []
    for j, ans in enumerate(answers):
        _expect(ans, dict, f"{key}[{j}]", where, path)
        texts.append(_text(ans.get("text"), f"{key}[{j}].text", where, path))
        start = ans.get("answer_start")
        starts.append(-1 if start is None and not need_starts else
                      _expect(start, int, f"{key}[{j}].answer_start", where, path))  # fmt: skip
    return texts, starts


def _paragraphs(article: dict, where: str, path) -> list:
    """An article's 'paragraphs', checked; a flat question record in an article's place (HF datasets' layout of
    SQuAD, which run_qa.py reads) is named as one."""
    if "paragraphs" not in article and {"question", "context"} & article.keys():
        raise SquadFormatError(f"{path}: {where}: a question record {HF_RECORD}, not a SQuAD article: {SQUAD_LAYOUT}")
    return _expect(article.get("paragraphs"), list, "paragraphs", where, path)


HF_RECORD = "('context', 'question', 'answers', as HF datasets lays SQuAD out)"
SQUAD_LAYOUT = "bertqa reads SQuAD's own layout, articles of 'paragraphs', each a 'context' and its 'qas'"


def _is_hf_record(value) -> bool:
    return isinstance(value, dict) and "data" not in value and bool({"question", "context"} & value.keys())


def _check_document(doc, path) -> None:
    """A SQuAD file's top level: an object with a 'data' list. HF datasets' layout is named as such: a list of
    question records (Dataset.to_json(lines=False)), or one record (a JSON-lines file of a single line)."""
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        return
    many = isinstance(doc, list)
    if _is_hf_record(doc[0] if many and doc else doc):
        what = "a list of question records" if many else "a question record"
        raise SquadFormatError(f"{path}: {what} {HF_RECORD}, not a SQuAD file: {SQUAD_LAYOUT}")
    raise SquadFormatError(f"{path}: not a SQuAD file (expected an object with a 'data' list)")


def check_gold(doc, path, v2: bool) -> None:
    """Check what the official scripts read of a SQuAD file to score predictions against, with one-line errors
    naming the question: each question's `id` (unique) and its answers' texts. A v2.0 question may have none, or
    no `answers` at all (unanswerable); a v1.1 question needs one. Contexts, questions and answer positions are
    not read, as the official scripts do not read them."""
    _check_document(doc, path)
    seen: set[str] = set()
    for a, article in enumerate(doc["data"]):
        _expect(article, dict, "data[]", f"article {a}", path)
        for p, paragraph in enumerate(_paragraphs(article, f"article {a}", path)):
            where = f"article {a} paragraph {p}"
            _expect(paragraph, dict, "paragraphs[]", where, path)
            _expect(paragraph.get("qas"), list, "qas", where, path)
            for q, qa in enumerate(paragraph["qas"]):
                _expect(qa, dict, "qas[]", f"{where} question {q}", path)
                qid = _text(qa.get("id"), "id", f"{where} question {q}", path)
                if qid in seen:
                    raise SquadFormatError(f"{path}: question id {qid!r}: duplicate question id")
                seen.add(qid)
                answers = _optional(qa, "answers", []) if v2 else qa.get("answers")
                _expect(answers, list, "answers", f"question id {qid!r}", path)
                for j, ans in enumerate(answers):
                    _expect(ans, dict, f"answers[{j}]", f"question id {qid!r}", path)
                    _text(ans.get("text"), f"answers[{j}].text", f"question id {qid!r}", path)
                if not answers and not v2:
                    raise SquadFormatError(f"{path}: question id {qid!r}: no answers and not marked is_impossible")


def check_bool(**values) -> None:
    """Each value True or False (numpy's too), else one line naming it: a string such as "no" is true."""
    for name, value in values.items():
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{name} must be True or False, got {value!r}")


def read_squad(path: str | os.PathLike, is_training: bool, report: dict | None = None) -> list[Example]:
    """Read a SQuAD v1.1 or v2.0 file.

    Training: the first answer is the label; when its text is not at `answer_start` it is moved to the
    closest occurrence nearby, else the question is skipped (counted, and logged once with the first ids).
    Evaluation never drops or edits a question: the official metrics only look at answer texts.
    `report`, when given, is filled with counts: questions, realigned, skipped, skipped_ids.
    """
    check_bool(is_training=is_training)  # (before the file takes seconds to parse)
    return parse_squad(load_json(path), path, is_training, report)


def parse_squad(
    doc, path, is_training: bool, report: dict | None = None, require_answers: bool = True, v2: bool = False
) -> list[Example]:
    """`read_squad` on an already parsed JSON document (`path` only names it in errors). With
    `require_answers=False` (prediction) a question may come without answers. `v2` reads the file as SQuAD v2.0
    whatever it says (--version-2-with-negative: a question without answers is unanswerable)."""
    check_bool(is_training=is_training, require_answers=require_answers, v2=v2)
    _check_document(doc, path)
    v2 = v2 or is_squad_v2(doc)
    examples: list[Example] = []
    seen: set[str] = set()
    realigned, skipped = 0, []
    for a, article in enumerate(doc["data"]):
        where = f"article {a}"
        _expect(article, dict, "data[]", where, path)
        title = _text(_optional(article, "title", ""), "title", where, path)
        for p, paragraph in enumerate(_paragraphs(article, where, path)):
            where = f"article {a} paragraph {p}"
            _expect(paragraph, dict, "paragraphs[]", where, path)
            context = _text(paragraph.get("context"), "context", where, path)
            blank_context = blank(context)
            _expect(paragraph.get("qas"), list, "qas", where, path)
            for q, qa in enumerate(paragraph["qas"]):
                where = f"article {a} paragraph {p} question {q}"
                _expect(qa, dict, "qas[]", where, path)
                qid = _text(qa.get("id"), "id", where, path)
                where = f"question id {qid!r}"
                if qid in seen:
                    raise SquadFormatError(f"{path}: {where}: duplicate question id")
                seen.add(qid)
                question = _text(qa.get("question"), "question", where, path)
                if blank(question):  # (zero-width or control characters alone too: the model sees none)
                    if is_training:  # one bad question need not stop a training run: skipped and counted
                        skipped.append(qid)
                        continue
                    raise SquadFormatError(f"{path}: {where}: 'question' is empty")
                texts, starts = _read_answers(qa, "answers", where, path, need_starts=is_training)
                # v2.0 without the key (HF datasets' squad_v2 export): no answers means unanswerable, as the
                # official v2.0 script reads it.
                impossible = _optional(qa, "is_impossible", v2 and not texts and (require_answers or is_training))
                _expect(impossible, bool, "is_impossible", where, path)
                plausible, _ = _read_answers(qa, "plausible_answers", where, path, need_starts=False)  # (texts only)
                if impossible and texts:
                    raise SquadFormatError(f"{path}: {where}: is_impossible is true but answers is not empty")
                if not impossible and not texts and (require_answers or is_training):
                    raise SquadFormatError(f"{path}: {where}: no answers and not marked is_impossible")
                # Nothing to find a gold answer in (prediction needs none: it predicts "" there).
                if not impossible and blank_context and require_answers and not is_training:
                    raise SquadFormatError(
                        f"{path}: {where}: the context (article {a} paragraph {p}) is empty and the question "
                        "is not marked is_impossible"
                    )
                if is_training and not impossible:
                    text, start = texts[0], starts[0]
                    if blank(text):  # no token to label
                        skipped.append(qid)
                        continue
                    if start < 0 or context[start : start + len(text)] != text:  # (a negative start would wrap)
                        start = _realign(context, text, start)
                        if start is None:
                            skipped.append(qid)
                            continue
                        realigned += 1
                    texts, starts = [text], [start]
                examples.append(Example(qid, question, context, texts, starts, impossible, title, plausible))
    if skipped:
        log.warning(
            "%s: skipped %d of %d training questions that are blank or whose answer is blank or not in the context "
            "near answer_start "
            "(first ids: %s)",
            path,
            len(skipped),
            len(seen),
            ", ".join(skipped[:5]),
        )
    if report is not None:
        report.update(questions=len(seen), realigned=realigned, skipped=len(skipped), skipped_ids=skipped)
    return examples
