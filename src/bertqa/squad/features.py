"""SQuAD examples -> fixed-length model windows, the way Google's and NVIDIA's `run_squad.py` build them.

Each window is `[CLS] question [SEP] context window [SEP] [PAD]...`: the question truncated to
`max_query_length` tokens, then as much of the context as fits in `max_seq_length`, windows starting every
`doc_stride` context tokens until one reaches the end of the context. A context token seen by several
windows is "max-context" in the one where it has the most tokens on its shorter side; post-processing
only accepts answer starts there.

Tokenisation is one batched call into the Rust `tokenizers` library (each distinct context once, every
question once); the windows are then numpy slicing, never a Python loop over characters or tokens.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import time
import unicodedata
import zipfile
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np

from bertqa.files import atomic_path, first_line
from bertqa.squad.data import Example, check_bool, unpaired_surrogate
from bertqa.tokenizer import BertTokenizer

log = logging.getLogger(__name__)

# Bump when the layout or the meaning of any array changes, so older caches are never read.
FORMAT_VERSION = 3  # 2: token ends cover the combining marks after them (_cover_removed_marks); 3: params["examples"]


@dataclass
class Features:
    """N windows of length L = max_seq_length, as numpy arrays (row i of every array is window i)."""

    input_ids: np.ndarray  # (N, L) int32, padded with the tokenizer's [PAD] id
    token_type_ids: np.ndarray  # (N, L) int8: 1 on the context window and its closing [SEP]
    lengths: np.ndarray  # (N,) int32 real tokens; the attention mask is arange(L) < lengths[:, None]
    start_positions: np.ndarray  # (N,) int32 answer start token; 0 ([CLS]) if not wholly in this window
    end_positions: np.ndarray  # (N,) int32 answer end token (inclusive); 0 likewise
    example_index: np.ndarray  # (N,) int32 index of the window's example in the list given to featurize
    offsets: np.ndarray  # (N, L, 2) int32 [start, end) characters in the context; -1 off the context
    max_context: np.ndarray  # (N, L) bool: context tokens for which this window gives the most context
    params: dict = field(default_factory=dict)

    ARRAYS = ("input_ids", "token_type_ids", "lengths", "start_positions", "end_positions",
              "example_index", "offsets", "max_context")  # fmt: skip

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def max_seq_length(self) -> int:
        return self.input_ids.shape[1]

    def attention_mask(self) -> np.ndarray:
        return np.arange(self.max_seq_length) < self.lengths[:, None]  # (N, L) bool

    def digest(self) -> str:
        """A hash of what training reads: the windows, their lengths and answer positions."""
        h = hashlib.sha256()
        for name in ("input_ids", "token_type_ids", "lengths", "start_positions", "end_positions"):
            a = np.ascontiguousarray(getattr(self, name))
            h.update(f"{name} {a.dtype.str} {a.shape};".encode())
            h.update(a.data)
        return h.hexdigest()[:16]

    def select(self, indices) -> Features:
        """A subset of the windows (example_index still refers to the original examples)."""
        return Features(**{name: getattr(self, name)[indices] for name in self.ARRAYS}, params=self.params)


def check_positive(**values) -> None:
    """Each value a positive integer (a bool, a float or a string is not one), else one line naming it."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_finite(**values) -> None:
    """Each value a finite number (not a bool, nor a string), else one line naming it: nan passes every
    comparison (a threshold of nan never gives a null answer)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")


def check_window_params(max_seq_length, doc_stride, max_query_length, flags: bool = False) -> None:
    """The window settings, refused in one line where they make no windows or leave context unseen; `flags`: named
    as the command line's flags (--doc-stride), else as the parameters."""
    seq, stride, query = ("--max-seq-length", "--doc-stride", "--max-query-length") if flags else (
        "max_seq_length", "doc_stride", "max_query_length")  # fmt: skip
    check_positive(**{seq: max_seq_length, stride: doc_stride, query: max_query_length})
    shortest = max_seq_length - max_query_length - 3  # [CLS], [SEP], [SEP]
    if shortest < 1:
        raise ValueError(
            f"{seq} {max_seq_length} leaves no room for context after a {max_query_length}-token question and 3 "
            "special tokens"
        )
    if doc_stride > shortest:
        raise ValueError(
            f"{stride} {doc_stride} is longer than the shortest context window ({shortest} = {seq} - {query} - 3): "
            "windows would leave context tokens unseen"
        )


def check_types(examples, tokenizer) -> None:
    """featurize's inputs, refused in one line before any work (not an AttributeError from deep inside)."""
    if not isinstance(tokenizer, BertTokenizer):
        raise TypeError(f"tokenizer must be bertqa's BertTokenizer (bertqa.load_tokenizer(path)), not "
                        f"{type(tokenizer).__name__}")  # fmt: skip
    if not isinstance(examples, (list, tuple)) or not all(isinstance(ex, Example) for ex in examples):
        raise TypeError("examples must be a list of bertqa.squad.Example (read_squad gives one)")
    for ex in examples:  # (fields built by hand: a str of answers labelled its first letter, say)
        for name in ("qid", "question", "context"):
            if not isinstance(getattr(ex, name), str):
                raise TypeError(
                    f"question id {ex.qid!r}: {name} must be a string, not {type(getattr(ex, name)).__name__}"
                )
        # (a list, a tuple or a numpy array; the first answer's start is the one read, the others' texts are gold)
        answers, starts = ex.answers, ex.answer_starts
        if not _sequence(answers) or not all(isinstance(text, str) for text in answers):
            raise TypeError(f"question id {ex.qid!r}: answers must be a list of strings, not {answers!r}")
        if (not _sequence(starts) or (len(starts) == 0) != (len(answers) == 0)
                or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in starts)):  # fmt: skip
            raise TypeError(f"question id {ex.qid!r}: answer_starts must be a list of integers, at least the first "
                            f"answer's, not {starts!r}")  # fmt: skip


def _sequence(value) -> bool:
    return isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim == 1)


def examples_digest(examples) -> str:
    """Which examples, in which order, windows were built from (their ids and context lengths): post-processing
    cuts each answer from its example's context, so another list of the same length gave wrong answers silently."""
    return hashlib.sha256("\n".join(f"{ex.qid}\t{len(ex.context)}" for ex in examples).encode()).hexdigest()[:16]


def _pointers(lengths) -> np.ndarray:
    """Start of each segment in a concatenation, plus the total: ptr[i]:ptr[i+1] is segment i."""
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])


def _concat(encodings, with_offsets: bool = False):
    """Segment pointers, token ids and (optionally) (n, 2) character offsets of many encodings, as flat
    int32 arrays built straight from the Python lists without a per-token loop."""
    ptr = _pointers([len(e) for e in encodings])
    n = int(ptr[-1])
    ids = np.fromiter(chain.from_iterable(e.ids for e in encodings), np.int32, n)
    if not with_offsets:
        return ptr, ids
    pairs = chain.from_iterable(chain.from_iterable(e.offsets for e in encodings))
    return ptr, ids, np.fromiter(pairs, np.int32, 2 * n).reshape(n, 2)


def _cover_removed_marks(contexts: list[str], ptr: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Each token's end moved over the combining marks right after it that are in no token. An uncased
    tokenizer strips accents, and the combining marks that some texts write them with (and Devanagari's or
    Thai's vowel signs and viramas) are then in no token; a prediction, cut at its last token's end, lost them:
    "José" written with a combining accent came out as "Jose", a Hindi or Thai word as its first letter, and
    the official metric scored it 0. (Zero-width and control characters, also in no token, are left out.)"""
    if not contexts:
        return offsets
    text = " ".join(contexts)  # a space after each context: no end moves into the next one
    base = np.repeat(np.cumsum([0] + [len(c) + 1 for c in contexts[:-1]]), np.diff(ptr))
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
    ends = offsets[:, 1] + base
    limit = np.append(offsets[1:, 0] + base[1:], len(text))  # the next token's start
    pending = np.flatnonzero(ends < limit)  # (tokens that share a character are left alone)
    while pending.size:  # one character a round, over the tokens still followed by a mark
        chars = codes[ends[pending]]
        unique, index = np.unique(chars, return_inverse=True)
        pending = pending[np.array([unicodedata.category(chr(c))[0] == "M" for c in unique], bool)[index]]
        ends[pending] += 1
        pending = pending[ends[pending] < limit[pending]]
    out = offsets.copy()
    out[:, 1] = ends - base
    return out


class TooManyWindows(ValueError):
    """The inputs need more windows than `featurize`'s max_windows allows: the caller's input, not a fault."""


def featurize(
    examples: list[Example],
    tokenizer,
    max_seq_length: int = 384,
    doc_stride: int = 128,
    max_query_length: int = 64,
    is_training: bool = False,
    max_windows: int | None = None,
) -> Features:
    """Windows for every example (see the module docstring). Labels come from each example's first
    answer whenever it has one, so evaluation windows carry labels too (for an evaluation loss);
    `is_training` additionally insists that every answerable example has an answer. With `max_windows`,
    inputs that need more windows are refused before any window is built (a server's guard)."""
    check_window_params(max_seq_length, doc_stride, max_query_length)
    check_bool(is_training=is_training)
    check_types(examples, tokenizer)
    L, stride = int(max_seq_length), int(doc_stride)
    t0 = time.perf_counter()

    # Many questions share a context (about 5 in SQuAD), and a server's batch may ask one question of many
    # contexts: tokenise each distinct context and question once, all in a single batch so the Rust side runs
    # them in parallel.
    context_id: dict[str, int] = {}
    question_id: dict[str, int] = {}
    ctx_of_ex = np.array([context_id.setdefault(ex.context, len(context_id)) for ex in examples], np.int64)
    q_of_ex = np.array([question_id.setdefault(ex.question, len(question_id)) for ex in examples], np.int64)
    # Text that is no Unicode (a lone surrogate): the tokenizers library refuses it naming nothing, or (older
    # versions) tokenises it somehow. Each distinct text is scanned once (ASCII at once).
    for name, texts in (("context", context_id), ("question", question_id)):
        for text in texts:
            if (at := unpaired_surrogate(text)) is not None:
                qid = next(ex.qid for ex in examples if getattr(ex, name) == text)
                raise ValueError(f"question id {qid!r}: {name} holds an unpaired surrogate at character {at}: not "
                                 "Unicode text")  # fmt: skip
    encodings = tokenizer.tokenize(list(context_id) + list(question_id))
    n_ctx = len(context_id)
    ctx_ptr, ctx_ids, ctx_offsets = _concat(encodings[:n_ctx], with_offsets=True)
    ctx_offsets = _cover_removed_marks(list(context_id), ctx_ptr, ctx_offsets)
    q_ptr, q_ids = _concat(encodings[n_ctx:])

    # Per example: question length after truncation, context length T, window length W and count K.
    # Windows start at 0, stride, 2*stride, ... and stop at the first that reaches the end (as Google's).
    n_ex = len(examples)
    q_len = np.minimum(np.diff(q_ptr), max_query_length)[q_of_ex]
    T = np.diff(ctx_ptr)[ctx_of_ex]
    W = L - q_len - 3
    K = 1 + np.maximum(0, -(-(T - W) // stride))  # ceil division; an empty context still gets one window
    if max_windows is not None and K.sum() > max_windows:
        raise TooManyWindows(f"these inputs need {K.sum()} windows, more than the limit of {max_windows}: shorter "
                         "contexts or a larger doc_stride")  # fmt: skip

    # Per window (row): its example, position among the example's windows, and its context slice.
    ex_of_row = np.repeat(np.arange(n_ex), K)
    first_row = _pointers(K)[:-1]
    win_start = (np.arange(len(ex_of_row)) - first_row[ex_of_row]) * stride
    win_len = np.minimum(W[ex_of_row], T[ex_of_row] - win_start)
    c0 = q_len[ex_of_row] + 2  # first context column, after [CLS] question [SEP]
    lengths = c0 + win_len + 1
    N = len(ex_of_row)

    input_ids = np.full((N, L), tokenizer.pad_id, np.int32)
    offsets = np.full((N, L, 2), -1, np.int32)
    input_ids[:, 0] = tokenizer.cls_id
    rows = np.arange(N)
    input_ids[rows, c0 - 1] = tokenizer.sep_id
    input_ids[rows, lengths - 1] = tokenizer.sep_id
    cs = ctx_ptr[ctx_of_ex][ex_of_row] + win_start  # window start in the flat context arrays
    qs = q_ptr[:-1][q_of_ex][ex_of_row]
    for i, (q, a, n, c) in enumerate(zip(c0 - 2, cs, win_len, c0, strict=True)):
        input_ids[i, 1 : q + 1] = q_ids[qs[i] : qs[i] + q]
        input_ids[i, c : c + n] = ctx_ids[a : a + n]
        offsets[i, c : c + n] = ctx_offsets[a : a + n]
    col = np.arange(L)
    in_window = (col >= c0[:, None]) & (col < (c0 + win_len)[:, None])  # (N, L) context columns
    token_type_ids = (in_window | (col == (lengths - 1)[:, None])).astype(np.int8)

    # Max context: a context token in one window has it trivially; fix up examples with several windows.
    max_context = in_window.copy()
    for e in np.flatnonzero(K > 1):
        r = slice(first_row[e], first_row[e] + K[e])
        _max_context_rows(max_context[r], win_start[r], win_len[r], c0[r], int(T[e]))

    start_positions, end_positions = _labels(
        examples, ctx_of_ex, ctx_ptr, ctx_offsets, ex_of_row, win_start, win_len, c0, is_training
    )
    params = {"max_seq_length": L, "doc_stride": stride, "max_query_length": int(max_query_length),
              "is_training": bool(is_training), "tokenizer": tokenizer.fingerprint,
              "examples": examples_digest(examples)}  # fmt: skip
    log.info("featurised %d examples into %d windows in %.2f s", n_ex, N, time.perf_counter() - t0)
    return Features(
        input_ids=input_ids,
        token_type_ids=token_type_ids,
        lengths=lengths.astype(np.int32),
        start_positions=start_positions,
        end_positions=end_positions,
        example_index=ex_of_row.astype(np.int32),
        offsets=offsets,
        max_context=max_context,
        params=params,
    )


def _max_context_rows(mask: np.ndarray, starts, lens, c0, T: int) -> None:
    """Keep, for each context token, only the window maximising min(left, right) + 0.01 * window length
    (Google's `_check_is_max_context`; the first window wins a tie). Over (window, token) pairs that exist
    only, not a (windows, T) grid: a 1 MB context has ~1,400 windows over ~200,000 tokens."""
    k = np.repeat(np.arange(len(starts)), lens)  # the window of each pair
    j = np.arange(len(k)) - np.repeat(_pointers(lens)[:-1], lens)  # its column within the window's context
    p = starts[k] + j  # its token in the context
    n = lens[k]
    score = np.minimum(j, n - 1 - j) + 0.01 * n
    order = np.lexsort((k, -score, p))  # by token, then best score, then first window
    first = order[np.r_[True, p[order][1:] != p[order][:-1]]]
    best = np.empty(T, np.int64)
    best[p[first]] = k[first]
    mask[k, c0[k] + j] = best[p] == k


def _labels(examples, ctx_of_ex, ctx_ptr, ctx_offsets, ex_of_row, win_start, win_len, c0, is_training):
    """Start/end token of the first answer in each window: the smallest run of context tokens touching
    the answer's characters [a, b), i.e. from the first token ending after a to the last starting before
    b. Windows that do not hold the whole run, and impossible questions, point at [CLS] (0)."""
    n_ex = len(examples)
    answerable = np.zeros(n_ex, bool)
    a = np.zeros(n_ex, np.int64)
    b = np.zeros(n_ex, np.int64)
    for i, ex in enumerate(examples):
        if ex.is_impossible:
            continue
        text, start = (ex.answers[0], ex.answer_starts[0]) if len(ex.answers) else ("", -1)
        # Evaluation files may carry answer_starts that do not point at the text (the official metric
        # never looks at them): such windows just get no label. Training labels must be right.
        # (An empty text "matches" even at a start far past the end, which would overflow int64 below.)
        if 0 <= start <= len(ex.context) and ex.context[start : start + len(text)] == text:
            answerable[i], a[i], b[i] = True, start, start + len(text)
        elif is_training:
            raise ValueError(f"question id {ex.qid!r}: the first answer is not in the context at answer_start")
    # One searchsorted over all contexts at once: key = context id * M + character position, which is
    # sorted because each context's token offsets are non-decreasing and contexts follow each other.
    M = max((len(ex.context) for ex in examples), default=0) + 1
    tok_ctx = np.repeat(np.arange(len(ctx_ptr) - 1), np.diff(ctx_ptr))
    base = ctx_of_ex * M
    first = np.searchsorted(tok_ctx * M + ctx_offsets[:, 1], base + a, side="right")
    last = np.searchsorted(tok_ctx * M + ctx_offsets[:, 0], base + b, side="left") - 1
    first -= ctx_ptr[ctx_of_ex]  # local token index within the context
    last -= ctx_ptr[ctx_of_ex]
    answerable &= first <= last  # an answer of only whitespace has no token

    s, e = first[ex_of_row], last[ex_of_row]
    inside = answerable[ex_of_row] & (s >= win_start) & (e < win_start + win_len)
    start = np.where(inside, s - win_start + c0, 0).astype(np.int32)
    end = np.where(inside, e - win_start + c0, 0).astype(np.int32)
    return start, end


# ---- on-disk cache

# What the windows depend on (max_windows only refuses inputs: not part of a cache key).
_DEFAULTS = {k: p.default for k, p in inspect.signature(featurize).parameters.items()
             if p.default is not p.empty and k != "max_windows"}  # fmt: skip


def _cache_key(examples, tokenizer, params: dict) -> str:
    """Everything the features depend on: the examples as read (ids, texts and the answer each is labelled with,
    which reading may re-anchor), the tokenizer, every parameter, this code's format. Not the data file's bytes,
    read again: a file replaced after it was parsed would file these features under the new file's."""
    ex_hash = hashlib.sha256()
    context = None
    for ex in examples:
        if ex.context != context:  # (a paragraph's questions follow one another: its text is hashed once)
            context = ex.context
            ex_hash.update(json.dumps(["context", context]).encode() + b"\n")
        fields = [ex.qid, ex.question, [str(a) for a in ex.answers[:1]], [int(s) for s in ex.answer_starts[:1]],
                  bool(ex.is_impossible)]  # fmt: skip
        ex_hash.update(json.dumps(fields).encode() + b"\n")
    key = {
        "format": FORMAT_VERSION,
        "examples": ex_hash.hexdigest(),
        "tokenizer": tokenizer.fingerprint,
        "params": params,
    }
    return json.dumps(key, sort_keys=True)


# A cache write takes seconds: a temporary cache file untouched for this long was left by a killed run.
STALE_WRITE_S = 3600


def remove_killed_writes(cache_dir: Path) -> list[Path]:
    """Delete the temporary files that cache writes killed outright (SIGKILL, SIGTERM, a power loss) left in
    `cache_dir` (a full train set's are hundreds of MB each), and return them. Concurrent runs share the folder, so
    a temporary file is judged by its age, not by a lock on the folder."""
    removed = []
    try:
        leftovers = sorted(cache_dir.glob(".squad-features-*.tmp.npz"))
    except OSError:  # a folder that cannot be searched or named (the write says so, and the command goes on)
        return removed
    for tmp in leftovers:
        try:
            if time.time() - tmp.stat().st_mtime > STALE_WRITE_S:
                tmp.unlink()
                removed.append(tmp)
                log.info("removed %s, left by a run that was killed", tmp)
        except OSError:  # gone meanwhile, or not ours to remove
            continue
    return removed


def load_features(examples, tokenizer, cache_dir, **params) -> Features:
    """`featurize(examples, tokenizer, **params)`, cached in `cache_dir` (None: no cache).

    The cache file name is a hash of the full key and the key itself is stored inside and compared, so
    changed examples (a text edited in the file), tokenizer or parameter (defaults included) is a miss, never a stale
    hit.
    """
    unknown = set(params) - set(_DEFAULTS)
    if unknown:
        raise TypeError(f"load_features() got unknown parameters {sorted(unknown)}")
    params = {**_DEFAULTS, **params}  # spelling out a default must give the same key as leaving it out
    if cache_dir is None:
        return featurize(examples, tokenizer, **params)  # (which checks them)
    check_bool(is_training=params["is_training"])  # (what the cache's key is made of: checked before it is)
    check_types(examples, tokenizer)
    if not str(cache_dir).strip():  # Path("") is the current folder
        raise ValueError("cache_dir '': empty; name a folder, or None for no features cache")
    check_window_params(params["max_seq_length"], params["doc_stride"], params["max_query_length"])
    key = _cache_key(examples, tokenizer, {k: int(v) for k, v in params.items()})
    path = Path(cache_dir) / f"squad-features-{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz"
    try:  # a cache only saves time: one that cannot be read (a folder not searchable, a damaged file) is a miss
        if path.is_file():
            with open(path, "rb") as f:  # (an open file: is_zipfile(path) takes a file it cannot read for no zip)
                if not zipfile.is_zipfile(f):  # (numpy reads anything else as a pickle, and says to allow it)
                    raise ValueError("not a features file: no .npz archive")
                f.seek(0)
                with np.load(f, allow_pickle=False) as z:
                    if str(z["key"]) == key:
                        arrays = {name: z[name] for name in Features.ARRAYS}
                        cached = Features(**arrays, params=json.loads(str(z["params"])))
                        log.info("features from cache %s", path)
                        return cached
    except Exception as e:  # zipfile and numpy raise many kinds: EOFError, NotImplementedError, RuntimeError, ...
        log.warning(
            "%s: unreadable feature cache (%s); rebuilding it", path, getattr(e, "strerror", None) or first_line(e)
        )
    features = featurize(examples, tokenizer, **params)
    remove_killed_writes(path.parent)
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # readers never see half a cache
            arrays = {name: getattr(features, name) for name in Features.ARRAYS}
            np.savez(f, key=np.array(key), params=np.array(json.dumps(features.params)), **arrays)
    except OSError as e:  # a cache only saves time: a full disk or a read-only folder does not stop the command
        log.warning("%s: cannot write the feature cache (%s); going on without it", path, e.strerror or e)
    return features
