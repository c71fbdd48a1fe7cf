"""QuestionAnswerer: ask a fine-tuned model questions, with the contract of HuggingFace's question-answering
pipeline (removed in transformers 5.3), so code written for it carries over.

    qa = QuestionAnswerer.from_pretrained("runs/demo/model")
    qa("Who won?", "The Broncos beat the Panthers.")   # {"score", "start", "end", "answer"}

A context of any length is cut into windows (`doc_stride` apart); the best span over all windows wins.
Scores are probabilities comparable across windows: P(start) is a softmax over the start logits of every
context token, each counted once (from the window that gives it the most context, where evaluation takes
starts from), and of the null answer ([CLS], from the window with the lowest null score, as Google's SQuAD
v2.0 code takes it); P(end) likewise over end logits, each token's counted once at its highest over the
windows that hold it (an answer may end in any of them: so no span scores above 1), and a span scores
P(start) * P(end). For a context that fits one window this is exactly the pipeline's score (which keeps [CLS]
in its softmax too) for an answer that one span gives; an answer that several spans give scores as its best
(the pipeline summed some of them). With `handle_impossible_answer` the null answer is also a candidate, and
wins when it beats every span: the rule `evaluate` applies. With `align_to_words` (the
default, as the pipeline's) an answer that starts or ends inside a word is widened to whole words. The search
is the pipeline's too: the best of every valid (start, end) pair (see `rank_answers`).

The README ("Asking questions") lists where bertqa differs from the pipeline; in the defaults, `max_answer_len` is
30 tokens (the SQuAD recipes' max_answer_length), where the pipeline's was 15.
"""

from __future__ import annotations

import functools
import inspect
import io
import itertools
import os
import threading
import types
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from .checkpoint import _unwrap, load_model
from .config import check_seq_len
from .files import read_one_version
from .inference import default_batch_size, predict_logits
from .model import BertForQuestionAnswering
from .runtime import Precision
from .squad.data import Example, bert_removes, blank, check_bool, unpaired_surrogate
from .squad.features import check_positive, featurize
from .squad.postprocess import best_spans
from .tokenizer import BertTokenizer, load_tokenizer


def _logsumexp(x: np.ndarray) -> float:
    top = x.max()
    return float(top + np.log(np.exp(x - top).sum())) if np.isfinite(top) else float(top)


def _listed(value):
    """An iterator (a map, a generator), a one-dimensional numpy array or another sequence as a list, as the
    pipeline lists them; anything else as it is, for check_pairs to refuse: a set (whose order, and so which
    question goes with which context, changes from run to run), a mapping other than a dict, a file."""
    if isinstance(value, (str, bytes, bytearray, list, tuple, io.IOBase)):
        return value
    if isinstance(value, np.ndarray):
        return list(value) if value.ndim == 1 else value
    return list(value) if isinstance(value, (Iterator, Sequence)) else value


def _dict_pair(item: dict, where: str) -> tuple:
    missing = [key for key in ("question", "context") if key not in item]
    if missing:
        raise ValueError(f"{where}the dict has no {' or '.join(map(repr, missing))} key: give 'question' and 'context'")
    return item["question"], item["context"]


def input_pairs(question, context) -> tuple[list[tuple[str, str]], bool]:
    """(question, context) pairs from the pipeline's input forms, and whether the input was a batch."""
    question, context = _listed(question), _listed(context)
    dicts = isinstance(question, dict) or (
        isinstance(question, (list, tuple)) and any(isinstance(q, dict) for q in question)
    )
    if dicts and context is not None:
        raise ValueError("a {'question', 'context'} dict carries its own context: give no context with it")
    if isinstance(question, dict):  # qa({"question": ..., "context": ...})
        question, context = _dict_pair(question, "")
    elif dicts:
        for i, q in enumerate(question):
            if not isinstance(q, dict):
                raise ValueError(f"input {i}: expected a {{'question', 'context'}} dict like the others")
        return [_dict_pair(q, f"input {i}: ") for i, q in enumerate(question)], True
    q_list, c_list = isinstance(question, (list, tuple)), isinstance(context, (list, tuple))
    if q_list and c_list:
        if len(question) != len(context):
            raise ValueError(f"{len(question)} questions but {len(context)} contexts: give one context per question")
        return list(zip(question, context, strict=True)), True
    if q_list:  # many questions about one context: it is tokenised once
        return [(q, context) for q in question], True
    if c_list:
        return [(question, c) for c in context], True
    return [(question, context)], False


def check_pairs(pairs, first: int | None = None) -> None:
    """Refuse a pair that is not two strings of text, in one line naming it (`first`: the number of the first
    pair in a longer stream of them, which every message then names)."""
    # Each text checked once: a question asked of 256 contexts (one request to the server) was scanned 256 times,
    # seconds of the server's event loop for a long one.
    checked = set()
    for i, (q, c) in enumerate(pairs):
        where = f"input {i if first is None else first + i}: " if len(pairs) > 1 or first is not None else ""
        for name, value in (("question", q), ("context", c)):
            if not isinstance(value, str):
                raise ValueError(f"{where}{name} must be a string, not {type(value).__name__}")
            if (name, value) in checked:
                continue
            checked.add((name, value))
            # A question of invisible characters alone (zero-width, control) gives the model no token: asks nothing.
            if blank(value) if name == "question" else not value.strip():
                raise ValueError(f"{where}{name} is empty")
            at = unpaired_surrogate(value)
            if at is not None:  # from a JSON "\ud800" escape or undecodable command-line bytes: not text
                raise ValueError(f"{where}{name} is not valid Unicode (an unpaired surrogate at character {at})")


def align_to_words(context: str, start: int, end: int, in_word) -> tuple[int, int]:
    """Widen [start, end) so that it neither starts nor ends inside a word (a span of word pieces such as
    "##ing" becomes the whole word, as the pipeline's align_to_words did), words as `in_word` (the tokenizer's
    BertTokenizer.in_word) tells them. Characters that the text cleaning deletes are taken in only between two
    characters of a word, never at its edges."""
    while 0 < start < len(context) and in_word(context[start]):
        j = start - 1
        while j > 0 and bert_removes(context[j]):
            j -= 1
        if bert_removes(context[j]) or not in_word(context[j]):
            break
        start = j
    while 0 < end < len(context) and in_word(context[end - 1]):
        j = end
        while j < len(context) - 1 and bert_removes(context[j]):
            j += 1
        if bert_removes(context[j]) or not in_word(context[j]):
            break
        end = j + 1
    return start, end


def window_settings(max_seq_len: int | None, doc_stride: int | None, max_question_len: int | None,
                    max_positions: int) -> tuple[int, int, int]:  # fmt: skip
    """(max_seq_len, doc_stride, max_question_len), checked, with one-line errors for settings the model or the
    windowing cannot take. Unset (None), max_seq_len and doc_stride are the pipeline's: max_seq_len the model's
    length up to 384, doc_stride half of it up to 128, and (a step here, see the module docstring) no more than
    the context tokens a window holds; max_question_len is 64 tokens, or half a shorter window's (below 131
    tokens), so that a window keeps room for its context."""
    if max_seq_len is None:
        max_seq_len = min(max_positions, 384)
    check_positive(max_seq_len=max_seq_len)
    check_seq_len(max_seq_len, max_positions, "max_seq_len")
    defaulted = max_question_len is None
    if defaulted:
        max_question_len = max(1, min(64, (max_seq_len - 3) // 2))
    check_positive(max_question_len=max_question_len)
    room = max_seq_len - max_question_len - 3  # the context tokens of a window whose question is that long
    if room < 1 and defaulted:  # (a window of 4 tokens or fewer)
        raise ValueError(f"max_seq_len {max_seq_len} holds no question and context: a window needs 5 tokens or more "
                         "(3 special tokens, a question token and a context token)")  # fmt: skip
    if room < 1:
        raise ValueError(f"max_seq_len {max_seq_len} leaves no context tokens after a {max_question_len}-token "
                         "question (max_question_len) and 3 special tokens; raise max_seq_len or lower "
                         "max_question_len")  # fmt: skip
    if doc_stride is None:
        doc_stride = min(128, max_seq_len // 2, room)
    check_positive(doc_stride=doc_stride)
    if doc_stride > room:
        raise ValueError(f"doc_stride {doc_stride} exceeds the {room} context tokens a window holds: max_seq_len "
                         f"{max_seq_len} less {max_question_len} question tokens (max_question_len"
                         f"{', by default' if defaulted else ''}) and 3 special tokens")  # fmt: skip
    return max_seq_len, doc_stride, max_question_len


def rank_answers(examples, features, start, end, top_k: int = 1, max_answer_len: int = 30,
                 handle_impossible_answer: bool = False, in_word=None) -> list[list[dict]]:  # fmt: skip
    """The `top_k` best distinct answers of every example, best first, from its windows' logits (see the
    module docstring for the score). Pure numpy over what `featurize` and `predict_logits` return. `in_word`:
    the tokenizer's BertTokenizer.in_word, to widen answers to whole words (align_to_words); None: not widened.

    Exact, as the pipeline's search over every pair: each window's top-n starts are paired with its top-n
    ends (n = 20 first), and a pair left out has its start or its end past the top n, so it scores at most
    max(start_(n+1) + end_1, start_1 + end_(n+1)). While that bound beats an example's k-th answer, the
    search goes twice as deep for that example. Exact up to ties: of answers with equal scores, the one
    ranked first is not specified (as in the pipeline's argpartition)."""
    start, end = np.asarray(start, np.float64), np.asarray(end, np.float64)
    width = start.shape[1]
    in_context = features.offsets[:, :width, 0] >= 0  # (N, W)
    counted = in_context & features.max_context[:, :width]  # every context token once: its max-context window
    # Each window's possible start (end) logits, best first: what bounds the pairs a search has left out.
    starts = -np.sort(np.where(counted, -start, np.inf), axis=1)
    ends = -np.sort(np.where(in_context, -end, np.inf), axis=1)
    order = np.argsort(features.example_index, kind="stable")
    rows_of = np.split(order, np.cumsum(np.bincount(features.example_index, minlength=len(examples)))[:-1])
    results, contexts = [[] for _ in examples], [ex.context for ex in examples]
    pending = list(range(len(examples)))
    n = max(20, top_k)
    while pending:
        rows = np.concatenate([rows_of[e] for e in pending])
        found = best_spans(contexts, features, start, end, rows, n, top_k, max_answer_len,
                           None if in_word is None else functools.partial(align_to_words, in_word=in_word))  # fmt: skip
        # The best score a pair left out of this search can have, per window (none left past the last column).
        left_out = np.maximum(starts[:, n] + ends[:, 0], starts[:, 0] + ends[:, n]) if n < width else None
        deeper = []
        for e in pending:
            spans = found.get(e, [])
            kth = spans[top_k - 1][0] if len(spans) == top_k else -np.inf
            if left_out is not None and left_out[rows_of[e]].max() > kth:
                deeper.append(e)
                continue
            results[e] = _scored(examples[e].context, spans, rows_of[e], start, end, counted, in_context,
                                 features.params["doc_stride"], top_k, handle_impossible_answer)  # fmt: skip
        pending, n = deeper, n * 2
    return results


def _best_end_logits(rows, end, in_context, stride: int) -> np.ndarray:
    """Each context token's highest end logit over the windows that hold it. The k-th window of an example
    (rows in order) starts at context token k * stride, so a column's token is that plus its place in the window."""
    tokens, ends = [], []
    for k, r in enumerate(rows):
        cols = np.flatnonzero(in_context[r])
        tokens.append(k * stride + cols - (cols[0] if len(cols) else 0))
        ends.append(end[r, cols])
    tokens, ends = np.concatenate(tokens), np.concatenate(ends)
    if not len(tokens):
        return ends
    order = np.argsort(tokens, kind="stable")
    first = np.flatnonzero(np.diff(tokens[order], prepend=-1))  # where each token's run begins
    return np.maximum.reduceat(ends[order], first)


def _scored(context, spans, rows, start, end, counted, in_context, stride: int, top_k: int,
            handle_impossible: bool) -> list[dict]:  # fmt: skip
    """Spans (and the null answer) as the pipeline's dicts, scored as probabilities."""
    w = rows[np.argmin(start[rows, 0] + end[rows, 0])]
    s_all = np.append(start[rows][counted[rows]], start[w, 0])
    e_all = np.append(_best_end_logits(rows, end, in_context, stride), end[w, 0])
    log_z = _logsumexp(s_all) + _logsumexp(e_all)
    null = start[w, 0] + end[w, 0] if handle_impossible else None
    answers = [{"score": float(np.exp(score - log_z)), "start": cs, "end": ce, "answer": context[cs:ce]}
               for score, cs, ce, *_ in spans]  # fmt: skip
    if null is not None:
        at = sum(1 for score, *_ in spans if score >= null)
        answers.insert(at, {"score": float(np.exp(null - log_z)), "start": 0, "end": 0, "answer": ""})
    return answers[:top_k] or [{"score": 0.0, "start": 0, "end": 0, "answer": ""}]


class QuestionAnswerer:
    """Extractive question answering with a fine-tuned BERT, the way HF's pipeline answered."""

    # One model call at a time, of every answerer in the process: the precision scope sets process-wide torch
    # flags (two answerers' scopes overlapping in two threads ran one's fp32 in the other's TF32, then left the
    # user's flags changed), and one device runs one batch at a time anyway. Reentrant: a call made inside one (a
    # should_stop or a hook that asks another answerer) nests its scope, which saves and restores the flags.
    _lock = threading.RLock()

    def __init__(self, model, tokenizer, device: torch.device, precision: Precision, batch_size: int | None = None,
                 name: str = "model", max_windows: int | None = None):  # fmt: skip
        """`model` and `tokenizer` as load_model and load_tokenizer give them; `device` and `precision` as
        from_pretrained takes them (a name, or a Precision already resolved)."""
        from .distributed import api_device

        if not isinstance(_unwrap(model), BertForQuestionAnswering):  # (torch.compile's wrapper is one too)
            raise TypeError(f"model must be bertqa's BertForQuestionAnswering (bertqa.load_model), not "
                            f"{type(model).__name__}; or use QuestionAnswerer.from_pretrained(path)")  # fmt: skip
        if not isinstance(tokenizer, BertTokenizer):
            raise TypeError(f"tokenizer must be bertqa's BertTokenizer (bertqa.load_tokenizer), not "
                            f"{type(tokenizer).__name__}")  # fmt: skip
        device = api_device(device)  # (a torch.device too: checked, and a bare "cuda" given its index)
        if not isinstance(precision, Precision):
            precision = Precision.resolve(precision, device)
        self.model = model.eval()
        self.max_windows = max_windows  # refuse inputs needing more windows than this (a server's guard)
        self.tokenizer = tokenizer
        self.device = device
        self.precision = precision
        if batch_size is not None:
            check_positive(batch_size=batch_size)
        self.batch_size = default_batch_size(device) if batch_size is None else batch_size  # windows a forward pass
        self.name = name

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device=None, precision: str | Precision | None = None,
                        batch_size: int | None = None, attention: str = "auto", trust_pickle: bool = False,
                        config=None) -> QuestionAnswerer:  # fmt: skip
        """Load a fine-tuned checkpoint (anything `load_model` reads, with its tokenizer beside it). `device`:
        default the accelerator if present; `precision`: auto (default), fp32, tf32, bf16 or fp16 (or a Precision
        already resolved for the device, as `serve` has, which then says nothing of it again); `batch_size`:
        windows per forward pass (default 128 on a CUDA GPU, else 32). As in the pipeline, an integer `device` is
        the CPU where negative, else the index of the accelerator (cuda:0 for 0 where CUDA is the one present)."""
        from .distributed import api_device

        device = api_device(device)
        if batch_size is not None:  # before the model takes seconds to load (the constructor checks it too)
            check_positive(batch_size=batch_size)

        def load():
            model = load_model(path, config=config, device=device, trust_pickle=trust_pickle,
                               attn_implementation=attention, verbose=False, require_qa_head=True)  # fmt: skip
            return model, load_tokenizer(path, config=model.config)

        model, tokenizer = read_one_version(path, load)
        if not isinstance(precision, Precision):
            precision = Precision.resolve(precision, device)
        return cls(model, tokenizer, device, precision, batch_size, str(path))

    @property
    def config(self):
        return _unwrap(self.model).config  # (DDP's wrapper does not pass it through)

    def __call__(self, question=None, context=None, top_k: int = 1, max_answer_len: int = 30,
                 handle_impossible_answer: bool = False, doc_stride: int | None = None,
                 max_seq_len: int | None = None, max_question_len: int | None = None, align_to_words: bool = True,
                 batch_size: int | None = None, num_workers: int | None = None):  # fmt: skip
        """Answer one question (a dict, or a list of `top_k` dicts when top_k > 1) or a batch: lists of
        questions and contexts, many questions about one context, or one question about many contexts (a list
        with one result per pair). Each answer: {"score", "start", "end", "answer"}, where
        `context[start:end] == answer`. Parameters as the pipeline's (see the module docstring); `batch_size`:
        windows per forward pass for this call (default: the answerer's); `num_workers` is taken, as the
        pipeline took it, and has nothing to do here (the windows are built in the calling thread).

        A generator of {"question", "context"} dicts is answered lazily, as the pipeline answered one: the
        result is an iterator of one result per dict, answered `batch_size` dicts at a time."""
        (top_k,) = _or_defaults(top_k=top_k)
        if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, (int, np.integer))
                                        or num_workers < 0):  # fmt: skip
            raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}")
        params = (top_k, max_answer_len, handle_impossible_answer, doc_stride, max_seq_len, max_question_len,
                  align_to_words)  # fmt: skip
        if isinstance(question, types.GeneratorType) and context is None:
            self._check_parameters(*params, batch_size=batch_size)  # at the call, not at the first answer
            return self._stream(question, params, batch_size)
        pairs, batched = input_pairs(question, context)
        check_pairs(pairs)
        results = self.answer_pairs(pairs, *params, batch_size=batch_size)
        if top_k == 1:
            results = [r[0] for r in results]
        return results if batched else results[0]

    def _stream(self, items, params: tuple, batch_size: int | None):
        """The results of a generator's dicts, one by one, answering them `batch_size` dicts at a time."""
        first, size = 0, batch_size or self.batch_size
        while chunk := list(itertools.islice(items, size)):
            for i, item in enumerate(chunk):
                if not isinstance(item, dict):
                    raise ValueError(f"input {first + i}: expected a {{'question', 'context'}} dict, not "
                                     f"{type(item).__name__}")  # fmt: skip
            pairs = [_dict_pair(item, f"input {first + i}: ") for i, item in enumerate(chunk)]
            check_pairs(pairs, first)
            for result in self.answer_pairs(pairs, *params, batch_size=batch_size):
                yield result[0] if params[0] == 1 else result
            first += len(chunk)

    def _check_parameters(self, top_k, max_answer_len, handle_impossible_answer, doc_stride, max_seq_len,
                          max_question_len, align_to_words, batch_size=None) -> tuple:  # fmt: skip
        """answer_pairs' parameters, checked, with None read as the default (as in the pipeline)."""
        top_k, max_answer_len, handle_impossible_answer, align_to_words = _or_defaults(
            top_k=top_k, max_answer_len=max_answer_len, handle_impossible_answer=handle_impossible_answer,
            align_to_words=align_to_words)  # fmt: skip
        check_positive(top_k=top_k, max_answer_len=max_answer_len)
        if batch_size is not None:
            check_positive(batch_size=batch_size)
        check_bool(handle_impossible_answer=handle_impossible_answer, align_to_words=align_to_words)
        window = window_settings(max_seq_len, doc_stride, max_question_len, self.config.max_position_embeddings)
        return top_k, max_answer_len, handle_impossible_answer, align_to_words, *window

    def answer_pairs(self, pairs, top_k=1, max_answer_len=30, handle_impossible_answer=False, doc_stride=None,
                     max_seq_len=None, max_question_len=None, align_to_words=True, *,
                     should_stop=None, batch_size=None) -> list[list[dict]]:  # fmt: skip
        """The ranked answers of every (question, context) pair, the pairs already checked (the server's entry);
        the parameters are checked here, before any work, None meaning the default (as in the pipeline).
        `should_stop()`, asked between the model's batches, abandons the work when True (raises Abandoned);
        `batch_size`: windows per forward pass (default: the answerer's)."""
        top_k, max_answer_len, handle_impossible_answer, align_to_words, max_seq_len, doc_stride, max_question_len = (
            self._check_parameters(top_k, max_answer_len, handle_impossible_answer, doc_stride, max_seq_len,
                                   max_question_len, align_to_words, batch_size)
        )  # fmt: skip
        examples = [Example(str(i), q, c, [], []) for i, (q, c) in enumerate(pairs)]
        features = featurize(examples, self.tokenizer, max_seq_len, doc_stride, max_question_len,
                             max_windows=self.max_windows)  # fmt: skip
        with self._lock, self.precision.scope():
            start, end = predict_logits(self.model, features, np.arange(len(features)), batch_size or self.batch_size,
                                        self.device, self.precision.autocast(), should_stop=should_stop)  # fmt: skip
        return rank_answers(examples, features, start, end, top_k, max_answer_len, handle_impossible_answer,
                            self.tokenizer.in_word if align_to_words else None)  # fmt: skip


def _or_defaults(**values) -> list:
    """The values of answer_pairs' parameters, None read as the parameter's default, as the pipeline reads it."""
    defaults = inspect.signature(QuestionAnswerer.answer_pairs).parameters
    return [defaults[name].default if value is None else value for name, value in values.items()]
