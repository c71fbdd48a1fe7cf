"""BERT WordPiece tokenisation through the Rust `tokenizers` library, with character offsets.

Reads either an HF `tokenizer.json` or a Google/NVIDIA `vocab.txt` (plus a lower-case flag). No torch here:
the SQuAD pipeline imports this module and stays torch-free.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import unicodedata
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers import decoders as tk_decoders
from tokenizers.models import WordPiece

from .files import LFS_POINTER, first_line, first_present

SPECIAL_TOKENS = {
    "unk_token": "[UNK]",
    "sep_token": "[SEP]",
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "mask_token": "[MASK]",
}

# BERT's WordPiece model, as transformers' BertTokenizer builds it.
BERT_WORDPIECE = {
    "type": "WordPiece",
    "unk_token": "[UNK]",
    "continuing_subword_prefix": "##",
    "max_input_chars_per_word": 100,
}

# WordPiece splits a word in time cubic in its length: a tokenizer.json allowing words of 10^9 characters took
# minutes for one word of 16,000 (a server's request, a minute of its only worker).
MAX_WORD_CHARS = 1000

# Characters whose in_word answers a tokenizer keeps (a BMP's worth, a few MB; squad.data's bert_removes keeps as
# many): a server's clients may send every code point there is.
CHARACTERS_CACHED = 65536

log = logging.getLogger("bertqa.tokenizer")


class BertTokenizer:
    """A WordPiece tokenizer that never truncates or pads on its own (the SQuAD windows do that)."""

    def __init__(self, backend: Tokenizer, do_lower_case: bool = True):
        backend.no_truncation()
        backend.no_padding()
        # "[SEP]" written in a context is text, as vocab.txt's tokenizer and Google's read it, not a separator.
        backend.encode_special_tokens = True
        self.backend = backend
        self.do_lower_case = do_lower_case
        vocab = backend.get_vocab()
        missing = [t for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]") if t not in vocab]
        if missing:
            raise ValueError(f"tokenizer vocabulary lacks the special tokens {missing}")
        unk = getattr(backend.model, "unk_token", "[UNK]")  # what WordPiece gives a word it cannot split
        if unk not in vocab:  # (it would raise at the first such word, after loading and warming up)
            raise ValueError(f"the WordPiece model's unk_token {unk!r} is not in the vocabulary")
        self.cls_id, self.sep_id = vocab["[CLS]"], vocab["[SEP]"]
        self.pad_id, self.unk_id = vocab["[PAD]"], vocab["[UNK]"]
        # The highest id + 1, not the number of tokens: a vocab.txt that repeats a token has ids past their count.
        self.vocab_size = max(vocab.values()) + 1
        self._in_word: dict[str, bool] = {}  # in_word's answers, by character

    def in_word(self, ch: str) -> bool:
        """Whether `ch` sits inside a word as this tokenizer splits words: between two letters, its normaliser and
        pre-tokenizer leave one word. Not space, punctuation or a CJK ideograph as the `tokenizers` library's
        tables have them, after normalising (an uncased model's accent stripping turns '≠' into '=');
        characters the text cleaning deletes join the letters beside them."""
        known = self._in_word.get(ch)
        if known is None:
            if len(self._in_word) >= CHARACTERS_CACHED:  # (bounded as bert_removes' cache is; rarely full)
                self._in_word.clear()
            text = f"a{ch}a"
            if self.backend.normalizer is not None:
                text = self.backend.normalizer.normalize_str(text)
            pre = self.backend.pre_tokenizer
            known = self._in_word[ch] = pre is None or len(pre.pre_tokenize_str(text)) == 1
        return known

    @property
    def fingerprint(self) -> str:
        """Stable hash of everything that decides token ids and offsets (used as a cache key)."""
        # (to_str leaves out whether special tokens written in the text are matched)
        described = f"{self.backend.to_str()}\nencode_special_tokens={self.backend.encode_special_tokens}"
        return hashlib.sha256(described.encode()).hexdigest()[:16]

    def tokenize(self, texts: list[str]):
        """Encode many texts in parallel, without special tokens: a list of `tokenizers.Encoding`
        (`.ids`, `.offsets` as (start, end) character positions into the original text)."""
        return self.backend.encode_batch(list(texts), add_special_tokens=False)

    def encode_pair(self, question: str, context: str) -> dict:
        """`[CLS] question [SEP] context [SEP]` with token type ids and character offsets
        (offsets index into the question for segment 0 and into the context for segment 1)."""
        enc = self.backend.encode(question, context, add_special_tokens=True)
        return {"input_ids": enc.ids, "token_type_ids": enc.type_ids, "offsets": enc.offsets}

    def decode(self, ids) -> str:
        return self.backend.decode(list(ids))

    def save(self, directory: str | os.PathLike, model_max_length: int = 512) -> None:
        """Write the HF tokenizer files (`tokenizer.json`, `vocab.txt`, configs) into `directory`;
        `model_max_length`: the model's position embeddings, where transformers' truncation stops."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        # What backend.save writes, written by Python: a failed write (a full disk) is an OSError naming the file.
        (d / "tokenizer.json").write_text(self.backend.to_str(pretty=True), encoding="utf-8")
        (d / "vocab.txt").write_text("".join(tok + "\n" for tok in self._vocab_lines()), encoding="utf-8")
        state = json.loads(self.backend.to_str())
        norm, pre, wordpiece = (state.get(key) or {} for key in ("normalizer", "pre_tokenizer", "model"))
        # transformers' BertTokenizer builds its normaliser (always cleaning the text), pre-tokenizer and WordPiece
        # model itself, from these settings and its defaults, not from tokenizer.json's: a tokenizer it would not
        # build so is declared as one that transformers reads from tokenizer.json as it is.
        bert = (
            norm.get("type") == "BertNormalizer"
            and norm.get("clean_text", True)
            and pre.get("type") == "BertPreTokenizer"
            and all(wordpiece.get(k) == v for k, v in BERT_WORDPIECE.items())
        )
        config = {
            "tokenizer_class": "BertTokenizer" if bert else "PreTrainedTokenizerFast",
            "do_lower_case": self.do_lower_case,
        }
        if norm.get("type") == "BertNormalizer":
            config["strip_accents"] = norm.get("strip_accents")
            config["tokenize_chinese_chars"] = norm.get("handle_chinese_chars", True)
        config = {**config, "model_max_length": model_max_length, **SPECIAL_TOKENS}
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (d / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS, indent=2) + "\n", encoding="utf-8")

    def _vocab_lines(self) -> list[str]:
        """vocab.txt's lines: line i holds the token of id i. An id no token has (the source vocab.txt repeated a
        token, whose last line gave it its id) gets a copy of the next token, whose own line comes later and wins
        again, so that every later token keeps its id for any loader that reads ids as line numbers."""
        by_id = {i: tok for tok, i in self.backend.get_vocab().items()}
        lines, later = [], None
        for i in range(max(by_id), -1, -1):
            later = by_id.get(i, later)
            lines.append(later)
        return lines[::-1]


def _vocab_token(line: str) -> str:
    """The token of a vocab.txt line: the line without the whitespace at its end, as transformers reads it
    (Unicode's White_Space: not the separators U+001C-U+001F, which Python's isspace counts). "who " kept whole
    matched no word: each became [UNK]."""
    end = len(line)
    while end and line[end - 1].isspace() and line[end - 1] not in "\x1c\x1d\x1e\x1f":
        end -= 1
    return line[:end]


def _from_vocab(vocab_file: Path, do_lower_case: bool, strip_accents: bool | None = None,
                chinese_chars: bool = True) -> Tokenizer:  # fmt: skip
    with open(vocab_file, encoding="utf-8") as f:
        lines = [_vocab_token(line) for line in f]
    while lines and not lines[-1]:  # blank lines at the end are no tokens: the model's vocabulary has no row for them
        lines.pop()
    # The id of a token is its line number, blank lines included (as Google's and HF's loaders).
    vocab = {token: i for i, token in enumerate(lines)}
    if not vocab:
        raise ValueError(f"{vocab_file}: empty vocabulary")
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    # Google's BasicTokenizer: clean text, split CJK characters, lower-case and strip accents when uncased
    # (unless tokenizer_config.json says otherwise, as transformers' BertTokenizer reads it).
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=chinese_chars, strip_accents=strip_accents, lowercase=do_lower_case
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = vocab.get("[CLS]"), vocab.get("[SEP]")
    if cls_id is None or sep_id is None:
        raise ValueError(f"{vocab_file}: vocabulary lacks [CLS] or [SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.decoder = tk_decoders.WordPiece(prefix="##")
    return tok


def _has_upper_case(tokens) -> bool:
    """Whether any word piece other than the bracketed specials ([CLS], [unused0], ...) has a capital."""
    return any(not (t.startswith("[") and t.endswith("]")) and t != t.lower() for t in map(str.strip, tokens))


def _has_marks(tokens, decomposed: bool = True) -> bool:
    """Whether any word piece holds a mark that stripping accents removes: a nonspacing mark (Mn), once decomposed
    (é's accent) or as written (Devanagari's virama and vowel signs above or below, Arabic's harakat, Thai's vowels
    above)."""
    form = functools.partial(unicodedata.normalize, "NFD") if decomposed else str
    return any(not t.isascii() and any(unicodedata.category(c) == "Mn" for c in form(t)) for t in tokens)


def load_tokenizer(path: str | os.PathLike, do_lower_case: bool | None = None, config=None) -> BertTokenizer:
    """Load from a checkpoint folder (`tokenizer.json` or `vocab.txt`), a `tokenizer.json`, a vocabulary file
    (`vocab.txt`, or any other name: a text file), or a weights file (the tokenizer beside it).

    Lower-casing is never guessed from a name. `do_lower_case` (--lower-case / --no-lower-case) overrides what
    the files say; by default it is what `tokenizer.json`'s normaliser does, else `tokenizer_config.json`'s
    `do_lower_case`, else the model's `config.json` if it says, else the vocabulary itself: one with
    upper-case word pieces is cased (lower-casing the input would make those pieces unreachable), one
    without is uncased. Lower-casing a vocabulary that has upper-case pieces is allowed but warned about.

    With the model's `config`, the tokenizer is checked against it (check_vocabulary).
    """
    if do_lower_case is not None and not isinstance(do_lower_case, (bool, np.bool_)):
        raise ValueError(f"do_lower_case must be True, False or None, got {do_lower_case!r}")  # ("no" is true)
    tokenizer = _read_tokenizer(path, None if do_lower_case is None else bool(do_lower_case))  # (numpy's: JSON)
    if config is not None:
        check_vocabulary(tokenizer, config, path)
    return tokenizer


def check_vocabulary(tokenizer: BertTokenizer, config, source) -> None:
    """Refuse a tokenizer whose ids run past the model's vocabulary: another model's (its ids would index past
    the embedding table). A smaller one may be right (NVIDIA's checkpoints pad the table to a multiple of 8,
    others to 64 or 128), but one short by more than that is most likely another model's: warned about."""
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"{source}: the tokenizer has {tokenizer.vocab_size:,} tokens, more than the model's "
                         f"vocabulary of {config.vocab_size:,}: it belongs to another model")  # fmt: skip
    if config.vocab_size > -(-tokenizer.vocab_size // 128) * 128:
        log.warning("%s: the tokenizer has %s tokens, the model's vocabulary %s: is it this model's tokenizer? "
                    "(a cased and an uncased BERT differ so)", source, f"{tokenizer.vocab_size:,}",
                    f"{config.vocab_size:,}")  # fmt: skip


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def _is_weights(p: Path) -> bool:
    """Whether a file given for the tokenizer is weights (its tokenizer then lies beside it), not a vocabulary of
    any name (NVIDIA's lies at vocab/vocab): a weights file's suffix, binary content (pickle, zip and safetensors'
    length prefix all hold a NUL byte at their start), or a Git LFS stub in the weights' place. Any other file is
    read as the vocabulary it was given as, and refused as one where it is not (empty, not UTF-8)."""
    if p.suffix.lower() in WEIGHT_SUFFIXES:
        return True
    with open(p, "rb") as f:
        head = f.read(4096)
    if head.startswith((b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")):  # UTF-16 / UTF-32 text: NULs, but text
        return False
    return b"\0" in head or head.startswith(LFS_POINTER)


# The special tokens bertqa builds windows with, by the names tokenizer configs give them.
SPECIAL_TOKENS_USED = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]"}


def _check_special_tokens(folder: Path) -> None:
    """Refuse a tokenizer whose config names other special tokens than BERT's: bertqa's windows would hold [CLS]
    and [SEP] where its model was trained with others (transformers reads them from these files); or more of them
    (additional / extra special tokens: transformers matches each whole in the text, bertqa would split it)."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        d = _json_object(folder / name)
        for key, ours in SPECIAL_TOKENS_USED.items():
            value = d.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if value is not None and value != ours:
                raise ValueError(f"{folder / name}: {key} {value!r}: bertqa builds its windows with BERT's {ours}, "
                                 "and this tokenizer's model was trained with another")  # fmt: skip
        for key in ("additional_special_tokens", "extra_special_tokens"):
            extra = d.get(key) or []
            for value in extra.values() if isinstance(extra, dict) else extra if isinstance(extra, list) else [extra]:
                _check_not_extra_special(folder / name, value.get("content") if isinstance(value, dict) else value)


def _check_not_extra_special(source: Path, content) -> None:
    """Refuse a special token other than BERT's own five (an entity marker added with add_special_tokens, or put
    in place of an [unusedN]): transformers matches it whole in the text, as its model was trained, where bertqa,
    which reads special tokens written in a text as text, would split it into word pieces."""
    if content not in SPECIAL_TOKENS.values():
        raise ValueError(f"{source}: special token {content!r}: transformers matches it whole in the text, where "
                         "bertqa would split it into word pieces (bertqa takes BERT's own special tokens only)")  # fmt: skip


def _read_tokenizer(path: str | os.PathLike, do_lower_case: bool | None) -> BertTokenizer:
    p = Path(path)
    if p.is_file() and p.suffix.lower() not in (".json", ".txt") and _is_weights(p):
        p = p.parent  # a weights file: its tokenizer lies beside it
    if p.is_dir():
        json_file, folder = first_present(p, ["tokenizer.json"]), p
        vocab_file = first_present(p, ["vocab.txt"]) if json_file is None else None  # (read only without it)
    elif p.is_file():
        json_file = p if p.suffix.lower() == ".json" else None
        vocab_file = None if json_file else p
        folder = p.parent
    else:
        raise FileNotFoundError(f"{p}: no such tokenizer file or folder")
    _check_special_tokens(folder)
    cls = _tokenizer_class(folder)
    if json_file is not None and json_file.is_file():
        try:
            backend = Tokenizer.from_str(json_file.read_text(encoding="utf-8"))  # (from_file takes UTF-8 paths only)
        except Exception as e:  # the Rust error is long; keep the first line
            raise ValueError(f"{json_file}: not a tokenizers JSON file ({first_line(e)})") from None
        spec = json.loads(backend.to_str())
        longest = (spec.get("model") or {}).get("max_input_chars_per_word")
        if isinstance(longest, int) and longest > MAX_WORD_CHARS:
            raise ValueError(f"{json_file}: model.max_input_chars_per_word {longest}: at most {MAX_WORD_CHARS} "
                             "(BERT's is 100; WordPiece's time grows with the cube of a word's length)")  # fmt: skip
        for added in spec.get("added_tokens") or []:
            if isinstance(added, dict) and added.get("special"):
                _check_not_extra_special(json_file, added.get("content"))
        norm = spec.get("normalizer") or {}
        bert, lower = norm.get("type") == "BertNormalizer", _lowercases(norm)
        # As transformers' BertTokenizer(Fast): the settings tokenizer_config.json states win over tokenizer.json's
        # BertNormalizer; --[no-]lower-case over both.
        wanted = _stated_settings(folder, cls) if bert else {}
        if do_lower_case is not None:
            if not bert and do_lower_case != lower:
                raise ValueError(f"{json_file}: cannot change lower-casing of a {norm.get('type')} normaliser")
            wanted["lowercase"] = do_lower_case
        if bert:
            current = {"clean_text": norm.get("clean_text", True), "handle_chinese_chars": norm.get("handle_chinese_chars",
                       True), "strip_accents": norm.get("strip_accents"), "lowercase": lower}  # fmt: skip
            settings = {**current, **wanted}
            if settings != current:
                backend.normalizer = normalizers.BertNormalizer(**settings)
                lower = settings["lowercase"]
        try:
            tokenizer = BertTokenizer(backend, do_lower_case=lower)
        except ValueError as e:
            raise ValueError(f"{json_file}: {e} (another model's tokenizer?)") from None
        # (the word pieces alone: an added token with capitals, "New York", is matched after lower-casing too)
        strips = _strips_accents({"type": "BertNormalizer", **settings} if bert else norm)
        if bert and not _as_written(cls):
            fix = 'with "strip_accents": false in tokenizer_config.json beside it (it wins over tokenizer.json\'s)'
        else:
            fix = (
                "in tokenizer.json's normalizer (a BertNormalizer's strip_accents false; in a sequence of steps, no "
                "StripAccents, nor an NFD or NFKD step that nothing recomposes)"
            )
        pieces = tokenizer.backend.get_vocab(with_added_tokens=False)
        _warn_unreachable_pieces(pieces, tokenizer.do_lower_case, json_file, strips, fix)
        return tokenizer
    if vocab_file is not None and vocab_file.is_file():
        if do_lower_case is None:
            do_lower_case = _lower_case_setting(folder)
        try:
            tokens = vocab_file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise ValueError(f"{vocab_file}: not UTF-8 text (byte {e.start})") from None
        if tokens and tokens[0].startswith("\ufeff"):  # (transformers too would read it as part of the first token)
            raise ValueError(f"{vocab_file}: starts with a byte-order mark (U+FEFF); save it as UTF-8 without one")
        if do_lower_case is None:
            do_lower_case = not _has_upper_case(tokens)
        strip_accents, chinese_chars = _normaliser_settings(folder)
        strips = _strips_accents({"type": "BertNormalizer", "lowercase": do_lower_case, "strip_accents": strip_accents})
        _warn_unreachable_pieces(tokens, do_lower_case, vocab_file, strips,
                       'with "strip_accents": false in tokenizer_config.json beside it')  # fmt: skip
        backend = _from_vocab(vocab_file, do_lower_case, strip_accents, chinese_chars)
        _check_added_tokens(folder, backend.get_vocab())
        try:
            return BertTokenizer(backend, do_lower_case=do_lower_case)
        except ValueError as e:
            raise ValueError(f"{vocab_file}: {e}") from None
    where = str(path) if Path(path).is_file() else str(p)
    raise FileNotFoundError(
        f"{where}: no tokenizer.json or vocab.txt beside it (copy the model's tokenizer files there)"
    )


# The tokenizer classes of transformers that split text as BERT's WordPiece does, by their names without "Tokenizer"
# and "Fast": those whose normaliser transformers builds from tokenizer_config.json's settings, and those for which
# it reads tokenizer.json as written (in transformers 5, the classes that add no constructor to BERT's, ConvBert's
# and DPR's Fast ones, and RetriBert's and Realm's, which are the base that reads it so).
BERT_TOKENIZERS = ("Bert", "DistilBert", "Electra", "LayoutLM", "MobileBert", "SqueezeBert", "Lxmert",
                   "DPRContextEncoder", "DPRQuestionEncoder", "DPRReader")  # fmt: skip
AS_WRITTEN = ("PreTrained", "TokenizersBackend", "ConvBert", "RetriBert", "Realm")
AS_WRITTEN_CLASSES = ("DPRContextEncoderTokenizerFast", "DPRQuestionEncoderTokenizerFast", "DPRReaderTokenizerFast")


def _family(cls) -> str | None:
    """A tokenizer class's name without "Tokenizer" and "Fast" (None for a value that is no name)."""
    return cls.removesuffix("Fast").removesuffix("Tokenizer") if isinstance(cls, str) else None


def _tokenizer_class(folder: Path):
    """The tokenizer_class a folder states: tokenizer_config.json's, else config.json's, as transformers reads them
    (None where neither does). One that is not BERT's is refused: a Japanese BERT's MeCab or character tokenizer,
    say, whose ids bertqa's WordPiece would not give (it answered silently on the wrong ids)."""
    for name in ("tokenizer_config.json", "config.json"):
        cls = _json_object(folder / name).get("tokenizer_class")
        if cls is None:
            continue
        if _family(cls) not in BERT_TOKENIZERS + AS_WRITTEN:
            raise ValueError(f"{folder / name}: tokenizer_class {cls!r} is not BERT's WordPiece tokenizer, the one "
                             "bertqa has: this model's tokenizer splits text another way")  # fmt: skip
        return cls
    return None


def _check_added_tokens(folder: Path, vocab: dict) -> None:
    """Refuse the added tokens of a folder read through its vocab.txt (added_tokens.json, tokenizer_config.json's
    added_tokens_decoder): transformers matches them in the text before WordPiece, and a model fine-tuned after
    `add_tokens` knows their new ids; bertqa takes them from tokenizer.json only. Special tokens at their vocab.txt
    ids, which every tokenizer_config.json that transformers writes lists, stay (written in a text, they are text)."""
    listed = [(folder / "added_tokens.json", content, i, content in SPECIAL_TOKENS.values())
              for content, i in _json_object(folder / "added_tokens.json").items()]  # fmt: skip
    f = folder / "tokenizer_config.json"
    decoder = _json_object(f).get("added_tokens_decoder") or {}
    for i, entry in decoder.items() if isinstance(decoder, dict) else ():
        entry = entry if isinstance(entry, dict) else {}
        if not isinstance(entry.get("content"), str):
            raise ValueError(f"{f}: added_tokens_decoder[{i!r}]: 'content' must be a string, got "
                             f"{entry.get('content')!r}")  # fmt: skip
        listed.append((f, entry.get("content"), i, entry.get("special") is True))
    for source, content, i, special in listed:
        if special:
            _check_not_extra_special(source, content)
        if not (special and str(vocab.get(content)) == str(i)):
            raise ValueError(f"{source}: added token {content!r} (id {i}): bertqa reads added tokens from a "
                             "tokenizer.json only; write one beside vocab.txt with transformers (AutoTokenizer."
                             "from_pretrained(FOLDER).save_pretrained(FOLDER))")  # fmt: skip


def _json_object(f: Path) -> dict:
    """The JSON object a tokenizer or model config file holds ({} where there is no such file)."""
    if not f.is_file():
        return {}
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, RecursionError):  # (ValueError: also not UTF-8, or an integer of more digits than Python reads)
        d = None
    if not isinstance(d, dict):
        raise ValueError(f"{f}: not a JSON object")
    return d


def _lower_case_setting(folder: Path) -> bool | None:
    """`do_lower_case` as tokenizer_config.json, else the model's config.json, states it; None if neither does."""
    for name in ("tokenizer_config.json", "config.json"):
        value = _json_object(folder / name).get("do_lower_case")
        if isinstance(value, bool):
            return value
    return None


def _normaliser_settings(folder: Path, d: dict | None = None) -> tuple[bool | None, bool]:
    """tokenizer_config.json's (`d`, where it has been read already) `strip_accents` (None: as lower-casing does)
    and `tokenize_chinese_chars`."""
    f = folder / "tokenizer_config.json"
    d = _json_object(f) if d is None else d
    strip, chinese = d.get("strip_accents"), d.get("tokenize_chinese_chars")
    if not all(v is None or isinstance(v, bool) for v in (strip, chinese)):
        raise ValueError(f"{f}: strip_accents and tokenize_chinese_chars must be true, false or null")
    return strip, chinese is not False


def _stated_settings(folder: Path, cls) -> dict:
    """The normaliser settings that tokenizer_config.json states for a BERT tokenizer (of the BERT-family class
    `cls`, the folder's tokenizer_class), as BertNormalizer's arguments: transformers builds the normaliser from
    them. Those it leaves out are not given, and tokenizer.json's stay (transformers would take its class's
    defaults, lower-casing among them)."""
    if _as_written(cls):  # tokenizer.json as it is
        return {}
    d = _json_object(folder / "tokenizer_config.json")
    strip, chinese = _normaliser_settings(folder, d)  # (checked there)
    stated = {"lowercase": d.get("do_lower_case"), "strip_accents": strip, "handle_chinese_chars": chinese}
    given = {"lowercase": isinstance(d.get("do_lower_case"), bool), "strip_accents": "strip_accents" in d,
             "handle_chinese_chars": d.get("tokenize_chinese_chars") is not None}  # fmt: skip
    return {k: v for k, v in stated.items() if given[k]}


def _as_written(cls) -> bool:
    """Whether transformers reads tokenizer.json as it is for a folder whose tokenizer_class is `cls`, not building
    its normaliser from tokenizer_config.json's settings."""
    return cls in AS_WRITTEN_CLASSES or _family(cls) in AS_WRITTEN


def _strips_accents(norm: dict) -> str | None:
    """How a tokenizers normaliser (its JSON) strips accents: "decomposed" (a BertNormalizer whose `strip_accents`
    is true, or null while it lower-cases, or a StripAccents step after NFD or NFKD: the marks of é too), "as
    written" (a StripAccents step on text not decomposed: the marks written apart, Devanagari's or Arabic's), or
    None."""
    kind = norm.get("type")
    if kind == "BertNormalizer":
        strip = norm.get("strip_accents")
        return "decomposed" if (_lowercases(norm) if strip is None else strip is True) else None
    steps = norm.get("normalizers") or [] if kind == "Sequence" else [norm]
    decomposed, mode = False, None
    for step in steps:
        kind = (step or {}).get("type")
        decomposed = kind in ("NFD", "NFKD") or decomposed and kind not in ("NFC", "NFKC")
        if kind == "StripAccents":
            mode = "decomposed" if decomposed else mode or "as written"
        elif kind == "BertNormalizer" and _strips_accents(step):
            mode = "decomposed"
    return mode


def _lowercases(norm: dict) -> bool:
    """Whether a tokenizers normaliser (its JSON) lower-cases: a BertNormalizer unless its `lowercase` is false, a
    Lowercase step, alone or within a Sequence."""
    kind = norm.get("type")
    if kind == "BertNormalizer":
        return norm.get("lowercase", True) is not False
    if kind == "Sequence":
        return any(_lowercases(n or {}) for n in norm.get("normalizers") or [])
    return kind == "Lowercase"


def _warn_unreachable_pieces(tokens, lower: bool, source: Path, strips: str | None = None, fix: str = "") -> None:
    """A warning where the normaliser makes word pieces unreachable: it lower-cases, or `strips` accents (as
    _strips_accents says), but the vocabulary has capitals, or marks (`fix`: where to turn the stripping off)."""
    if lower and _has_upper_case(tokens):
        log.warning("%s: lower-casing the input although the vocabulary has upper-case word pieces, which can then "
                    "never match; if the model is cased, pass --no-lower-case (train, evaluate, predict), or write "
                    "a cased copy for ask, serve, export and bench: bertqa convert MODEL NEW --no-lower-case",
                    source)  # fmt: skip
    elif strips and _has_marks(tokens, strips == "decomposed"):
        log.warning("%s: stripping accents and marks from the input although the vocabulary has word pieces with "
                    "them (é, Devanagari's vowel signs, Arabic's harakat), which can then never match: right for a "
                    "model pretrained on text stripped of them, as transformers reads these files; for one pretrained "
                    "with them, turn the stripping off %s", source, fix)  # fmt: skip
