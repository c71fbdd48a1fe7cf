"""QuestionAnswerer: ask a fine-tuned model questions, with the contract of HuggingFace's question-answering
pipeline (removed in transformers 5.3), so code written for it carries over.

    qa = QuestionAnswerer.from_pretrained("runs/demo/model")
    qa("Who won?", "The Broncos beat the Panthers.")   # {"score", "start", "end", "answer"}

A context of any length is cut into windows (`doc_stride` apart); the best span over all windows wins.
Scores are probabilities comparable across windows: the start (end) logits of every context token, each
token counted once (from the window that gives it the most context, as evaluation does), share one softmax,
and a span scores P(start) * P(end). For a context that fits one window this is exactly the pipeline's
score. With `handle_impossible_answer` the null answer ([CLS], from the window least sure there is an
answer) joins both softmaxes and wins when it beats every span: the SQuAD v2.0 rule `evaluate` applies.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .checkpoint import load_model
from .inference import predict_logits
from .runtime import Precision
from .squad.data import Example
from .squad.features import featurize
from .squad.postprocess import span_candidates
from .tokenizer import load_tokenizer


def _logsumexp(x: np.ndarray) -> float:
    top = x.max()
    return float(top + np.log(np.exp(x - top).sum())) if np.isfinite(top) else float(top)


def _pairs(question, context) -> tuple[list[tuple[str, str]], bool]:
    """(question, context) pairs from the pipeline's input forms, and whether the input was a batch."""
    if isinstance(question, dict) and context is None:  # qa({"question": ..., "context": ...})
        question, context = question.get("question"), question.get("context")
    elif isinstance(question, list) and context is None and question and isinstance(question[0], dict):
        return [(q.get("question"), q.get("context")) for q in question], True
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


def _check(pairs) -> None:
    for i, (q, c) in enumerate(pairs):
        where = f"input {i}: " if len(pairs) > 1 else ""
        for name, value in (("question", q), ("context", c)):
            if not isinstance(value, str):
                raise ValueError(f"{where}{name} must be a string, not {type(value).__name__}")
            if not value.strip():
                raise ValueError(f"{where}{name} is empty")


def _positive(**values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def rank_answers(examples, features, start, end, top_k: int = 1, max_answer_len: int = 30,
                 handle_impossible_answer: bool = False) -> list[list[dict]]:  # fmt: skip
    """The `top_k` best distinct answers of every example, best first, from its windows' logits (see the
    module docstring for the score). Pure numpy over what `featurize` and `predict_logits` return."""
    start, end = np.asarray(start, np.float64), np.asarray(end, np.float64)
    width = start.shape[1]
    # Every context token once: where this window gives it the most context.
    counted = (features.offsets[:, :width, 0] >= 0) & features.max_context[:, :width]  # (N, W)
    order = np.argsort(features.example_index, kind="stable")
    rows_of = np.split(order, np.cumsum(np.bincount(features.example_index, minlength=len(examples)))[:-1])
    results = [[] for _ in examples]
    pending = list(range(len(examples)))
    n = max(20, top_k)
    while pending:
        rows = np.concatenate([rows_of[e] for e in pending])
        cand = span_candidates(features.select(rows), start[rows], end[rows], n, max_answer_len)
        bounds = np.searchsorted(cand["example"], np.asarray(pending + [len(examples)]))
        short = []
        for i, e in enumerate(pending):
            results[e] = _answers_of(examples[e], cand, bounds[i], bounds[i + 1], rows_of[e], start, end, counted,
                                     top_k, handle_impossible_answer)  # fmt: skip
            # Fewer than top_k distinct answers from the top-n starts and ends: look further down, if there is
            # further to look.
            if sum(1 for a in results[e] if a["answer"]) < top_k and n < width:
                short.append(e)
        pending, n = short, n * 2
    return results


def _answers_of(ex, cand, lo, hi, rows, start, end, counted, top_k, handle_impossible) -> list[dict]:
    s_all = start[rows][counted[rows]]
    e_all = end[rows][counted[rows]]
    null = None
    if handle_impossible:
        w = rows[np.argmin(start[rows, 0] + end[rows, 0])]
        null = (start[w, 0], end[w, 0])
        s_all, e_all = np.append(s_all, null[0]), np.append(e_all, null[1])
    log_z = _logsumexp(s_all) + _logsumexp(e_all)
    answers, seen = [], set()
    for a in range(lo, hi):
        if len(answers) == top_k:
            break
        cs, ce = int(cand["char_start"][a]), int(cand["char_end"][a])
        text = ex.context[cs:ce]
        if text in seen:  # the same words at two places are one answer, with the better score
            continue
        seen.add(text)
        score = float(np.exp(cand["score"][a] - log_z))
        answers.append({"score": score, "start": cs, "end": ce, "answer": text})
    if null is not None:
        null_score = float(np.exp(null[0] + null[1] - log_z))
        at = sum(1 for x in answers if x["score"] >= null_score)
        answers.insert(at, {"score": null_score, "start": 0, "end": 0, "answer": ""})
        answers = answers[:top_k]
    return answers or [{"score": 0.0, "start": 0, "end": 0, "answer": ""}]


class QuestionAnswerer:
    """Extractive question answering with a fine-tuned BERT, the way HF's pipeline answered."""

    def __init__(self, model, tokenizer, device: torch.device, precision: Precision, batch_size: int = 32,
                 name: str = "model"):  # fmt: skip
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = device
        self.precision = precision
        self.batch_size = batch_size
        self.name = name

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device=None, precision: str | None = None,
                        batch_size: int = 32, attention: str = "sdpa", trust_pickle: bool = False,
                        config=None) -> QuestionAnswerer:  # fmt: skip
        """Load a fine-tuned checkpoint (anything `load_model` reads, with its tokenizer beside it). `device`:
        default the accelerator if present; `precision`: auto (default), fp32, tf32, bf16 or fp16."""
        from .distributed import resolve_device

        device = resolve_device(None if device is None else str(device))
        _positive(batch_size=batch_size)
        model = load_model(path, config=config, device=device, trust_pickle=trust_pickle,
                           attn_implementation=attention, verbose=False, require_qa_head=True)  # fmt: skip
        return cls(model, load_tokenizer(path), device, Precision.resolve(precision, device), batch_size, str(path))

    @property
    def config(self):
        return self.model.config

    def __call__(self, question=None, context=None, top_k: int = 1, max_answer_len: int = 30,
                 handle_impossible_answer: bool = False, doc_stride: int = 128, max_seq_len: int = 384,
                 max_question_len: int = 64):  # fmt: skip
        """Answer one question (a dict, or a list of `top_k` dicts when top_k > 1) or a batch: lists of
        questions and contexts, many questions about one context, or one question about many contexts (a list
        with one result per pair). Each answer: {"score", "start", "end", "answer"}, where
        `context[start:end] == answer`."""
        pairs, batched = _pairs(question, context)
        _check(pairs)
        _positive(top_k=top_k, max_answer_len=max_answer_len, doc_stride=doc_stride, max_seq_len=max_seq_len,
                  max_question_len=max_question_len)  # fmt: skip
        if max_seq_len > self.config.max_position_embeddings:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's {self.config.max_position_embeddings} "
                             "position embeddings")  # fmt: skip
        if max_seq_len - max_question_len - 3 < doc_stride:
            raise ValueError(f"max_seq_len {max_seq_len} leaves fewer than doc_stride {doc_stride} context tokens "
                             f"after a {max_question_len}-token question and 3 special tokens")  # fmt: skip
        results = self.answer_pairs(pairs, top_k, max_answer_len, handle_impossible_answer, doc_stride, max_seq_len,
                                    max_question_len)  # fmt: skip
        if top_k == 1:
            results = [r[0] for r in results]
        return results if batched else results[0]

    def answer_pairs(self, pairs, top_k=1, max_answer_len=30, handle_impossible_answer=False, doc_stride=128,
                     max_seq_len=384, max_question_len=64) -> list[list[dict]]:  # fmt: skip
        """The ranked answers of every (question, context) pair, inputs already checked (the server's entry)."""
        examples = [Example(str(i), q, c, [], []) for i, (q, c) in enumerate(pairs)]
        features = featurize(examples, self.tokenizer, max_seq_len, doc_stride, max_question_len)
        with self.precision.scope():
            start, end = predict_logits(self.model, features, np.arange(len(features)), self.batch_size,
                                        self.device, self.precision.autocast())  # fmt: skip
        return rank_answers(examples, features, start, end, top_k, max_answer_len, handle_impossible_answer)
