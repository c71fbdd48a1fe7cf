"""Tokenizer parity with transformers' BertTokenizerFast on the real SQuAD dev sample."""

import json
import logging
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from bertqa.tokenizer import check_vocabulary, load_tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=["tiny-squad", "dev-a"])
def dev_texts(request, tiny_squad):
    """Every context and question of our fixture, and of the real dev-a.json."""
    path = tiny_squad if request.param == "tiny-squad" else request.getfixturevalue("squad_dir") / "dev-a.json"
    data = json.loads(path.read_text())["data"]
    contexts = [p["context"] for a in data for p in a["paragraphs"]]
    pairs = [(q["question"], p["context"]) for a in data for p in a["paragraphs"] for q in p["qas"]]
    assert (len(contexts), len(pairs)) == {"tiny-squad": (5, 20), "dev-a": (913, 4961)}[request.param]
    return contexts, pairs


@pytest.fixture(scope="module")
def vocab_only_dir(tmp_path_factory, minilm_dir):
    """A Google/NVIDIA-style folder: vocab.txt alone (written from the real vocabulary)."""
    out = tmp_path_factory.mktemp("vocab")
    load_tokenizer(minilm_dir).save(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (out / name).unlink()
    return out


def hf_encode(hf, texts):
    enc = hf(texts, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], [[tuple(o) for o in offs] for offs in enc["offset_mapping"]]


def our_encode(tokenizer, texts):
    """(ids, offsets) of bertqa's tokenizer, as hf_encode gives transformers'."""
    enc = tokenizer.tokenize(texts)
    return [e.ids for e in enc], [e.offsets for e in enc]


@pytest.mark.parametrize("source", ["tokenizer.json", "vocab.txt"])
def test_parity_on_every_dev_context_and_question(source, minilm_dir, vocab_only_dir, dev_texts):
    contexts, pairs = dev_texts
    questions = [q for q, _ in pairs]
    if source == "tokenizer.json":
        ours, hf = load_tokenizer(minilm_dir), transformers.BertTokenizerFast.from_pretrained(str(minilm_dir))
    else:
        # The reference builds its tokenizer from vocab.txt its own way; ours builds it from the same file.
        ours = load_tokenizer(vocab_only_dir / "vocab.txt", do_lower_case=True)
        hf = transformers.BertTokenizerFast.from_pretrained(str(vocab_only_dir), do_lower_case=True)
    for texts in (contexts, questions):
        mine = ours.tokenize(texts)
        ref_ids, ref_offsets = hf_encode(hf, texts)
        assert [e.ids for e in mine] == ref_ids
        assert [e.offsets for e in mine] == ref_offsets
    for q, c in pairs[:300]:
        ref = hf(q, c, return_offsets_mapping=True)
        got = ours.encode_pair(q, c)
        assert got["input_ids"] == ref["input_ids"]
        assert got["token_type_ids"] == ref["token_type_ids"]
        assert got["offsets"] == [tuple(o) for o in ref["offset_mapping"]]


def test_offsets_point_into_original_text(minilm_dir):
    tok = load_tokenizer(minilm_dir)
    text = "Ünïcode  café, naïve résumé (1990s)!"
    enc = tok.tokenize([text])[0]
    assert enc.ids and all(0 <= s < e <= len(text) for s, e in enc.offsets)
    pieces = [text[s:e] for s, e in enc.offsets]
    assert pieces[0] == "Ünïcode"  # accents stripped in ids, not in offsets
    assert "café" in pieces


def test_never_truncates_or_pads(minilm_dir):
    # The shipped tokenizer.json carries truncation/padding to 128; the windows must be ours alone.
    tok = load_tokenizer(minilm_dir)
    assert len(tok.tokenize(["word " * 300])[0].ids) == 300
    assert len(tok.tokenize(["a"])[0].ids) == 1


def test_special_tokens_written_in_the_text_are_text(minilm_dir, vocab_only_dir):
    """A context or question holding "[SEP]" must not put a separator into the window (a client of the server
    could inject one); tokenizer.json and vocab.txt read such text alike, as Google's BasicTokenizer does."""
    text = "the [SEP] and [CLS] of a [MASK]"
    from_json, from_vocab = load_tokenizer(minilm_dir), load_tokenizer(vocab_only_dir / "vocab.txt")
    specials = {from_json.cls_id, from_json.sep_id, from_json.backend.token_to_id("[MASK]")}
    ids = from_json.tokenize([text])[0].ids
    assert ids == from_vocab.tokenize([text])[0].ids and not specials & set(ids)
    pair = from_json.encode_pair("What [SEP]?", text)["input_ids"]
    assert pair[0] == from_json.cls_id and pair.count(from_json.sep_id) == 2 and pair[-1] == from_json.sep_id
    # Features cached before (when such text became special ids) are not reused: the fingerprint tells them apart.
    before = from_json.fingerprint
    from_json.backend.encode_special_tokens = False
    assert from_json.fingerprint != before


def test_cased_vocab_and_fingerprint(vocab_only_dir, tmp_path):
    lower = load_tokenizer(vocab_only_dir / "vocab.txt", do_lower_case=True)
    cased = load_tokenizer(vocab_only_dir / "vocab.txt", do_lower_case=False)
    assert lower.tokenize(["Paris"])[0].ids != cased.tokenize(["Paris"])[0].ids
    assert lower.fingerprint != cased.fingerprint
    assert load_tokenizer(vocab_only_dir / "vocab.txt", do_lower_case=True).fingerprint == lower.fingerprint


def test_a_vocabulary_file_is_read_under_any_name(vocab_only_dir, tmp_path):
    """A vocabulary is told from weights by its content (NVIDIA's lies at vocab/vocab); a weights file, by its
    content or its name (a Git LFS stub is text), still stands for the tokenizer beside it."""
    vocab = (vocab_only_dir / "vocab.txt").read_bytes()
    want = load_tokenizer(vocab_only_dir / "vocab.txt", do_lower_case=True).tokenize(["Who ruled Normandy?"])[0].ids
    for name in ("vocab/vocab", "uncased.vocab", "VOCAB.TXT"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(vocab)
        assert load_tokenizer(tmp_path / name, do_lower_case=True).tokenize(["Who ruled Normandy?"])[0].ids == want
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "vocab.txt").write_bytes(vocab)
    (tmp_path / "run" / "ckpt").write_bytes(b"\x80\x04\x95" + bytes(64))  # a pickle, with no suffix
    for stub in ("model.bin", "bert_model"):  # Git LFS stubs in the weights' place: text, but not a vocabulary
        (tmp_path / "run" / stub).write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    for weights in ("ckpt", "model.bin", "bert_model"):
        tokenizer = load_tokenizer(tmp_path / "run" / weights, do_lower_case=True)
        assert tokenizer.tokenize(["Who ruled Normandy?"])[0].ids == want


def test_a_vocabulary_file_named_is_read_as_one_and_refused_as_one(vocab_only_dir, tmp_path):
    # An empty or non-UTF-8 file was taken for weights, and the tokenizer beside it loaded in its place, silently.
    shutil.copy(vocab_only_dir / "vocab.txt", tmp_path / "vocab.txt")
    (tmp_path / "latin").write_bytes("été\n".encode("latin-1"))
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "utf16").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n", encoding="utf-16")  # NUL bytes, but text
    for name, why in (("latin", "not UTF-8 text (byte 0)"), ("empty", "empty vocabulary"),
                      ("utf16", "not UTF-8 text (byte 0)")):  # fmt: skip
        with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / name))}: {re.escape(why)}$"):
            load_tokenizer(tmp_path / name)
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + (vocab_only_dir / "vocab.txt").read_bytes())
    with pytest.raises(ValueError, match=r"bom.txt: starts with a byte-order mark \(U\+FEFF\)"):  # not "lacks [PAD]"
        load_tokenizer(tmp_path / "bom.txt")


@pytest.mark.parametrize("file, form", [("tokenizer_config.json", str), ("special_tokens_map.json", dict)])
def test_a_tokenizer_whose_config_names_other_special_tokens_is_refused(vocab_only_dir, tmp_path, file, form):
    # transformers builds its inputs with the tokens these files name; bertqa's windows hold [CLS] and [SEP].
    shutil.copy(vocab_only_dir / "vocab.txt", tmp_path / "vocab.txt")

    def token(text):  # (special_tokens_map.json may give a token as an object)
        return {"content": text} if form is dict else text

    (tmp_path / file).write_text(json.dumps({"cls_token": "[CLS]", "sep_token": token("[unused2]")}))
    with pytest.raises(
        ValueError, match=rf"{file}: sep_token '\[unused2\]': bertqa builds its windows with BERT's \[SEP\]"
    ):
        load_tokenizer(tmp_path)
    hf = transformers.BertTokenizerFast.from_pretrained(tmp_path)
    assert hf("a", "b")["input_ids"][-1] == hf.convert_tokens_to_ids("[unused2]")  # what it would have differed by
    (tmp_path / file).write_text(json.dumps({"cls_token": "[CLS]", "sep_token": token("[SEP]")}))
    assert load_tokenizer(tmp_path).sep_id == hf.convert_tokens_to_ids("[SEP]")


def test_bad_tokenizer_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or vocab.txt"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("not json")
    with pytest.raises(ValueError, match="tokenizer.json: not a tokenizers JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(
        ValueError, match=rf"^{re.escape(str(tmp_path / 'vocab.txt'))}: vocabulary lacks \[CLS\] or \[SEP\]$"
    ):
        load_tokenizer(tmp_path / "vocab.txt")
    (tmp_path / "vocab.txt").write_text("[CLS]\n[SEP]\n[UNK]\na\n")  # the file named, as for tokenizer.json
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'vocab.txt'))}: tokenizer vocabulary lacks the special tokens "
                       r"\['\[PAD\]'\]$"):  # fmt: skip
        load_tokenizer(tmp_path / "vocab.txt")


def test_a_tokenizer_json_of_another_kind_names_its_file(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"<s>": 0, "<unk>": 1, "a": 2}, unk_token="<unk>")).save(
        str(tmp_path / "tokenizer.json")
    )
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'tokenizer.json'}: tokenizer vocabulary lacks the special "
                       r"tokens \['\[CLS\]', '\[SEP\]', '\[PAD\]', '\[UNK\]'\] \(another model's tokenizer\?\)$"):  # fmt: skip
        load_tokenizer(tmp_path)


def test_a_tokenizer_json_splitting_words_of_any_length_is_refused(minilm_dir, tmp_path):
    """WordPiece splits a word in time cubic in its length: a tokenizer.json allowing words of 10^9 characters (BERT's
    stop at 100, then [UNK]) took a minute for one word of 16,000, the length of a context a server takes."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm_dir / name, tmp_path)
    spec = json.loads((minilm_dir / "tokenizer.json").read_text())
    for longest, refused in ((1000, False), (1001, True), (10**9, True)):
        spec["model"]["max_input_chars_per_word"] = longest
        (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
        if not refused:
            assert load_tokenizer(tmp_path).tokenize(["x" * 900])[0].tokens != ["[UNK]"]
            continue
        with pytest.raises(ValueError, match=rf"^{tmp_path / 'tokenizer.json'}: model\.max_input_chars_per_word "
                           rf"{longest}: at most 1000 \(BERT's is 100; "):  # fmt: skip
            load_tokenizer(tmp_path)


def test_a_lowercase_step_in_a_sequence_of_normalisers_is_read_as_lower_casing(vocab_only_dir, tmp_path, caplog):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = load_tokenizer(vocab_only_dir / "vocab.txt").backend.get_vocab()
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.save(str(tmp_path / "tokenizer.json"))
    with caplog.at_level(logging.WARNING, logger="bertqa"):
        tok = load_tokenizer(tmp_path)
        assert tok.do_lower_case and load_tokenizer(tmp_path, do_lower_case=True).do_lower_case
    assert caplog.text == "" and tok.tokenize(["Paris"])[0].ids == tok.tokenize(["paris"])[0].ids
    # Saved, transformers reads it as it is: it used to be declared a BertTokenizer, whose normaliser transformers
    # builds from tokenizer_config.json, and which cleans the text (the NUL) and splits CJK characters apart.
    tok.save(tmp_path / "saved")
    (tmp_path / "saved" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    texts = ["東京 Café\x00x", "Paris"]
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert hf_encode(hf, texts) == our_encode(tok, texts)


def test_a_repeated_token_counts_up_to_the_highest_id(tmp_path):
    """Line numbers are ids: a token listed twice keeps the later one, past the count of distinct tokens, and
    the check against the model's vocabulary must see it."""
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n[UNK]\n")
    tok = load_tokenizer(tmp_path / "vocab.txt", do_lower_case=True)
    assert tok.unk_id == 5 and tok.vocab_size == 6
    with pytest.raises(ValueError, match="the tokenizer has 6 tokens, more than the model's vocabulary of 5"):
        check_vocabulary(tok, SimpleNamespace(vocab_size=5), tmp_path / "vocab.txt")


def test_blank_lines_at_the_end_of_a_vocab_txt_are_no_tokens(tmp_path):
    """An editor's extra newline: no row of the model's embedding table is behind it (transformers counts it as a
    token "" and lets it be; counted here, the model was refused as another's)."""
    (tmp_path / "vocab.txt").write_text("[PAD]\n\n[UNK]\n[CLS]\n[SEP]\nhello\n\n\n")  # the blank line inside stays
    tok = load_tokenizer(tmp_path / "vocab.txt", do_lower_case=True, config=SimpleNamespace(vocab_size=6))
    assert tok.vocab_size == 6 and tok.backend.get_vocab()["hello"] == 5 and tok.backend.get_vocab()[""] == 1


def test_a_saved_vocab_txt_keeps_every_id_of_a_source_that_repeats_a_token(tmp_path):
    """Read back by line number (transformers' slow BertTokenizer, Google's and NVIDIA's scripts), the saved
    vocab.txt must give every token the id the model was trained with, not shift the tokens after a repeat."""
    source = "[PAD]\n\n[UNK]\n\n[CLS]\n[SEP]\nhello\nworld\n"  # a blank line twice: id 1 belongs to no token
    (tmp_path / "vocab.txt").write_text(source)
    tok = load_tokenizer(tmp_path / "vocab.txt", do_lower_case=True)
    tok.save(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved" / "vocab.txt", do_lower_case=True)
    assert again.backend.get_vocab() == tok.backend.get_vocab() == {
        "[PAD]": 0, "[UNK]": 2, "": 3, "[CLS]": 4, "[SEP]": 5, "hello": 6, "world": 7}  # fmt: skip
    assert again.tokenize(["Hello world"])[0].ids == [6, 7] and again.vocab_size == 8


def test_a_tokenizer_much_smaller_than_the_models_vocabulary_is_warned_about(vocab_only_dir, caplog):
    tok = load_tokenizer(vocab_only_dir / "vocab.txt")  # 30,522 tokens
    with caplog.at_level(logging.WARNING, logger="bertqa"):
        for padded in (30_522, 30_528, 30_592):  # none, NVIDIA's multiple of 8, a multiple of 128
            check_vocabulary(tok, SimpleNamespace(vocab_size=padded), "model")
        assert caplog.text == ""
        check_vocabulary(tok, SimpleNamespace(vocab_size=31_090), "model")  # a cased model's tokenizer is 28,996
    assert "model: the tokenizer has 30,522 tokens, the model's vocabulary 31,090: is it this model's" in caplog.text


def test_whitespace_at_the_end_of_a_vocab_txt_line_is_not_part_of_the_token(tmp_path):
    """(review) "who " was read as a token no word matches: every "who" became [UNK], where transformers (and
    Google's and NVIDIA's loaders) read "who". Whitespace before a token stays, as in transformers."""
    ends = [" ", "\t", "\u3000", "\xa0", "\x0b", "\x0c", "\x1c", "\x1f", "\u200b", ""]
    lines = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(f"w{i}{end}" for i, end in enumerate(ends)), "  lead"]
    (tmp_path / "vocab.txt").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    ours = load_tokenizer(tmp_path / "vocab.txt", do_lower_case=True).backend.get_vocab()
    theirs = transformers.BertTokenizer(str(tmp_path / "vocab.txt")).get_vocab()
    assert ours == theirs and ours["w0"] == 5 and "w6\x1c" in ours and "  lead" in ours
    tok = load_tokenizer(tmp_path / "vocab.txt", do_lower_case=True)
    assert tok.tokenize(["w0 w1 w9"])[0].ids == [5, 6, 14]


def test_vocab_ids_are_line_numbers(tmp_path):
    # Google's and HF's loaders give a token the id of its line, blank lines counting.
    (tmp_path / "vocab.txt").write_text("[PAD]\n\n[UNK]\n[CLS]\n[SEP]\nhello\nworld\n")
    tok = load_tokenizer(tmp_path / "vocab.txt", do_lower_case=True)
    assert tok.tokenize(["Hello world"])[0].ids == [5, 6]
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id) == (0, 2, 3, 4)


def test_lower_casing_comes_from_the_vocabulary_not_the_folder_name(tmp_path):
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused0]"]
    for folder, words, lower in (("bert-base-cased", ["the", "paris", "##is"], True),
                                 ("bert-base-uncased", ["the", "Paris", "##is"], False)):  # fmt: skip
        d = tmp_path / folder  # each name says the opposite of its vocabulary
        d.mkdir()
        (d / "vocab.txt").write_text("\n".join(specials + words) + "\n")
        tok = load_tokenizer(d / "vocab.txt")
        assert tok.do_lower_case is lower
        assert tok.tokenize(["Paris"])[0].ids == [len(specials) + 1]  # its own piece, not [UNK]
        assert load_tokenizer(d / "vocab.txt", do_lower_case=not lower).do_lower_case is (not lower)


def test_lower_casing_read_from_the_files_and_overridden_by_the_flag(tmp_path, minilm_dir, caplog):
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    d = tmp_path / "nvidia"
    d.mkdir()
    (d / "vocab.txt").write_text("\n".join(specials + ["the", "paris", "Paris"]) + "\n")
    assert load_tokenizer(d).do_lower_case is False  # capitals in the vocabulary: cased
    (d / "config.json").write_text(json.dumps({"hidden_size": 32, "do_lower_case": True}))
    with caplog.at_level("WARNING", logger="bertqa.tokenizer"):
        tok = load_tokenizer(d)  # the model's config says so: obeyed, but a cased vocabulary is not silently lowered
    assert tok.do_lower_case is True and tok.tokenize(["Paris"])[0].ids == [6]
    assert "upper-case word pieces" in caplog.text and "--no-lower-case" in caplog.text
    assert "bertqa convert MODEL NEW --no-lower-case" in caplog.text  # for commands that lack the flag (ask, serve)
    (d / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))  # read before config.json
    assert load_tokenizer(d).tokenize(["Paris"])[0].ids == [7]

    # tokenizer.json: its normaliser decides, and --no-lower-case rewrites it (kept when saved).
    uncased = load_tokenizer(minilm_dir)
    cased = load_tokenizer(minilm_dir, do_lower_case=False)
    assert uncased.do_lower_case is True and cased.do_lower_case is False
    assert uncased.tokenize(["Paris"])[0].ids != cased.tokenize(["Paris"])[0].ids
    assert load_tokenizer(minilm_dir, do_lower_case=True).fingerprint == uncased.fingerprint
    cased.save(tmp_path / "saved")
    assert load_tokenizer(tmp_path / "saved").fingerprint == cased.fingerprint


def test_stripping_the_marks_that_word_pieces_hold_is_warned_of(tmp_path, caplog):
    """Devanagari, Arabic and Thai have no capitals: a vocabulary of them alone is read as uncased, and an uncased
    tokenizer strips accents by default (as transformers reads the same files), taking vowel signs and harakat off
    the input, so that the pieces holding them come out [UNK]. Right for a model pretrained on stripped text (some
    uncased models' vocabularies hold accented pieces all the same), wrong for the others: a warning says where to
    turn it off, in the file that decides it."""
    words = ["दिल्ली", "भारत", "है", "عَاصِمَة", "กรุงเทพ", "##มหานคร", "café", "the"]
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    text = "दिल्ली भारत है عَاصِمَة กรุงเทพมหานคร CAFÉ The"

    def load(path, **kwargs):
        caplog.clear()
        with caplog.at_level("WARNING", logger="bertqa.tokenizer"):
            tok = load_tokenizer(path, **kwargs)
        return tok, caplog.text

    stripped, warned = load(tmp_path)
    assert stripped.do_lower_case is True and 1 in stripped.tokenize([text])[0].ids  # [UNK]
    assert "stripping accents and marks" in warned and '"strip_accents": false in tokenizer_config.json' in warned
    assert not load(tmp_path / "vocab.txt", do_lower_case=False)[1]  # cased: nothing stripped
    stripped.save(tmp_path / "stripping")  # tokenizer.json, its BertNormalizer's strip_accents null
    _, warned = load(tmp_path / "stripping")
    assert "stripping accents and marks" in warned and "tokenizer_config.json beside it (it wins over" in warned
    for folder in (tmp_path, tmp_path / "stripping"):  # the advice, followed
        config = folder / "tokenizer_config.json"
        config.write_text(json.dumps({**(json.loads(config.read_text()) if config.exists() else {}),
                                      "strip_accents": False}))  # fmt: skip
        kept, warned = load(folder)
        assert kept.tokenize([text])[0].ids == [5, 6, 7, 8, 9, 10, 11, 12] and not warned  # each its own piece
    kept.save(tmp_path / "kept")  # (strip_accents false written down: the same tokenizer read again)
    again, warned = load(tmp_path / "kept")
    assert again.tokenize([text])[0].ids == kept.tokenize([text])[0].ids and not warned
    # Normalisers of steps, read as written: the fix is in tokenizer.json. A StripAccents step on text not
    # decomposed leaves é whole, and takes off only the marks written apart (Devanagari's, Arabic's).
    spec = json.loads((tmp_path / "kept" / "tokenizer.json").read_text())
    config = json.loads((tmp_path / "kept" / "tokenizer_config.json").read_text())
    (tmp_path / "kept" / "tokenizer_config.json").write_text(
        json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"})
    )
    for steps, warns in ((["NFD", "StripAccents", "Lowercase"], True), (["StripAccents", "Lowercase"], True),
                         (["NFD", "NFC", "StripAccents", "Lowercase"], True), (["NFD", "Lowercase"], False),
                         (["Lowercase"], False)):  # fmt: skip
        spec["normalizer"] = {"type": "Sequence", "normalizers": [{"type": step} for step in steps]}
        (tmp_path / "kept" / "tokenizer.json").write_text(json.dumps(spec))
        _, warned = load(tmp_path / "kept")
        assert ("stripping accents and marks" in warned) is warns, steps
        assert not warns or "in tokenizer.json's normalizer" in warned
    # é alone, written whole: only a decomposing step before StripAccents reaches its accent.
    spec["model"]["vocab"] = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "café"])}
    for steps, warns in ((["StripAccents", "Lowercase"], False), (["NFD", "StripAccents", "Lowercase"], True)):
        spec["normalizer"] = {"type": "Sequence", "normalizers": [{"type": step} for step in steps]}
        (tmp_path / "kept" / "tokenizer.json").write_text(json.dumps(spec))
        _, warned = load(tmp_path / "kept")
        assert ("stripping accents and marks" in warned) is warns, steps


def test_missing_tokenizer_names_the_weights_file(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors: no tokenizer\.json or vocab\.txt beside it"):
        load_tokenizer(weights)


def test_the_lower_case_flag_reaches_the_tokenizer(tiny_dir, tmp_path):
    from bertqa.cli import _config, build_parser
    from bertqa.distributed import Dist
    from bertqa.evaluate import EvalConfig, load_tokenizer_and_model

    # Each flag against a default it changes: tiny_dir's tokenizer lower-cases, the copy's is cased.
    cased = tmp_path / "cased"
    shutil.copytree(tiny_dir, cased)
    load_tokenizer(tiny_dir, do_lower_case=False).save(cased)
    assert load_tokenizer(cased).do_lower_case is False
    for model, flag, lower in ((tiny_dir, [], True), (tiny_dir, ["--no-lower-case"], False), (cased, [], False),
                               (cased, ["--lower-case"], True)):  # fmt: skip
        args = ["evaluate", "--model", str(model), "--predict-file", "x.json", "--output-dir", str(tmp_path / "out")]
        cfg = _config(EvalConfig, build_parser().parse_args(args + flag))
        tokenizer, _ = load_tokenizer_and_model(cfg, Dist(), for_inference=False)
        assert tokenizer.do_lower_case is lower


@pytest.mark.parametrize("settings", [{"strip_accents": False}, {"tokenize_chinese_chars": False},
                                      {"strip_accents": True, "do_lower_case": False}, {}])  # fmt: skip
def test_tokenizer_config_accent_and_cjk_settings_read_and_written_as_transformers_does(tmp_path, settings):
    # An uncased vocabulary for an accented language keeps its accents when tokenizer_config.json says so;
    # transformers reads these two settings from there, for a vocab.txt folder and (version 5) for every folder.
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    src = tmp_path / "src"
    src.mkdir()
    # (cased pieces too: stripping accents without lower-casing must show, "Café" -> "Cafe")
    (src / "vocab.txt").write_text(
        "\n".join(specials + ["cafe", "café", "Cafe", "Café", "東", "京", "東京", "##京"]) + "\n"
    )
    (src / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, **settings}))
    texts = ["Café au lait", "東京 CAFÉ"]
    hf = transformers.BertTokenizerFast.from_pretrained(str(src))
    ref = hf_encode(hf, texts)
    ours = load_tokenizer(src)
    assert our_encode(ours, texts) == ref
    ours.save(tmp_path / "saved")  # tokenizer.json and tokenizer_config.json agree, for either reader
    assert hf_encode(transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved")), texts) == ref
    assert load_tokenizer(tmp_path / "saved").fingerprint == ours.fingerprint


@pytest.mark.parametrize("settings", [{"do_lower_case": False}, {"strip_accents": False},
                                      {"tokenize_chinese_chars": False}, {"do_lower_case": True},
                                      {"tokenizer_class": "ElectraTokenizer", "do_lower_case": False}])  # fmt: skip
def test_tokenizer_config_settings_win_over_tokenizer_json_as_in_transformers(minilm_dir, tmp_path, settings):
    """A folder whose tokenizer_config.json states a setting its tokenizer.json's BertNormalizer does not follow:
    transformers builds the normaliser from tokenizer_config.json. bertqa followed tokenizer.json."""
    folder = tmp_path / "tok"
    folder.mkdir()
    for name in ("tokenizer.json", "special_tokens_map.json"):
        shutil.copy(minilm_dir / name, folder)
    config = json.loads((minilm_dir / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, **settings}))
    if settings.get("do_lower_case"):  # MiniLM's tokenizer.json lower-cases already: one that does not, so it shows
        state = json.loads((folder / "tokenizer.json").read_text())
        state["normalizer"]["lowercase"] = False
        (folder / "tokenizer.json").write_text(json.dumps(state))
    texts = ["Héllo WORLD Café", "東京 naïve Übung"]
    ref = hf_encode(transformers.AutoTokenizer.from_pretrained(str(folder)), texts)
    ours = load_tokenizer(folder)
    assert our_encode(ours, texts) == ref
    assert ours.do_lower_case is settings.get("do_lower_case", True)
    assert load_tokenizer(folder, do_lower_case=True).do_lower_case  # the flag still wins over both


def test_bad_accent_setting_in_tokenizer_config_is_one_line(tmp_path):
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"strip_accents": "yes"}))
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: strip_accents and tokenize_chinese_chars must"):
        load_tokenizer(tmp_path, do_lower_case=True)
    (tmp_path / "tokenizer_config.json").write_text("[1]")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: not a JSON object"):
        load_tokenizer(tmp_path, do_lower_case=True)


SMALL_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "c", "##o", "##v", "##i", "##d", "-",
               "1", "##9", "!", "x", "##x", "日", "本"]  # fmt: skip


def small_folder(path, **files):
    path.mkdir()
    (path / "vocab.txt").write_text("\n".join(SMALL_VOCAB) + "\n")
    for name, content in files.items():
        (path / f"{name}.json").write_text(json.dumps(content))
    return path


def wordpiece_json(folder, normalizer, vocab=SMALL_VOCAB, unk_token="[UNK]"):
    """A tokenizer.json in `folder`: WordPiece over `vocab` (ids in order) after `normalizer` and BERT's
    pre-tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token=unk_token))
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.save(str(folder / "tokenizer.json"))
    return folder


def test_a_tokenizer_class_other_than_berts_is_refused(tmp_path, minilm_dir):
    """A Japanese BERT's folder (vocab.txt and tokenizer_class BertJapaneseTokenizer, MeCab or characters) was read
    as BERT's WordPiece: other ids than the model was trained on, and nothing said so."""
    japanese = {"tokenizer_class": "BertJapaneseTokenizer", "do_lower_case": False}
    folder = small_folder(tmp_path / "ja", tokenizer_config=japanese)
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: tokenizer_class 'BertJapaneseTokenizer' is not"):
        load_tokenizer(folder)
    # Stated in config.json only, as transformers also reads it there.
    folder = small_folder(tmp_path / "ja2", config={"model_type": "bert", "tokenizer_class": "BertJapaneseTokenizer"})
    with pytest.raises(ValueError, match=r"ja2/config\.json: tokenizer_class 'BertJapaneseTokenizer'"):
        load_tokenizer(folder)
    with_json = tmp_path / "xlmr"
    shutil.copytree(minilm_dir, with_json, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((with_json / "tokenizer_config.json").read_text())
    (with_json / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "XLMRobertaTokenizer"}))
    with pytest.raises(ValueError, match="tokenizer_class 'XLMRobertaTokenizer' is not BERT's WordPiece"):
        load_tokenizer(with_json)
    # The BERT family's classes build BERT's tokenizer: read, and as transformers reads them.
    for cls in ("BertTokenizerFast", "DistilBertTokenizer", "ElectraTokenizerFast", "DPRReaderTokenizer"):
        folder = small_folder(tmp_path / cls, tokenizer_config={"tokenizer_class": cls, "do_lower_case": True})
        texts = ["Hello world! covid-19 xxx 日本"]
        hf = transformers.AutoTokenizer.from_pretrained(str(folder))
        assert hf_encode(hf, texts) == our_encode(load_tokenizer(folder), texts)


def test_a_class_read_as_written_stated_in_config_json_keeps_tokenizer_json_as_it_is(tmp_path, minilm_dir):
    """PreTrainedTokenizerFast in config.json (no class in tokenizer_config.json): transformers reads tokenizer.json
    as it is, and tokenizer_config.json's do_lower_case false has no say; bertqa applied it: [UNK] for capitals."""
    folder = tmp_path / "fast"
    folder.mkdir()
    shutil.copy(minilm_dir / "tokenizer.json", folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    (folder / "config.json").write_text(
        json.dumps({"model_type": "bert", "tokenizer_class": "PreTrainedTokenizerFast"})
    )
    texts = ["Hello World"]
    ours = our_encode(load_tokenizer(folder), texts)
    assert hf_encode(transformers.AutoTokenizer.from_pretrained(str(folder)), texts) == ours
    assert ours == our_encode(load_tokenizer(minilm_dir), texts)


@pytest.mark.parametrize("cls", ["ConvBertTokenizer", "RealmTokenizerFast", "RetriBertTokenizer", "DistilBertTokenizer",
                                 "LxmertTokenizerFast", "DPRReaderTokenizerFast"])  # fmt: skip
def test_each_bert_family_class_takes_tokenizer_config_settings_as_transformers_does(tmp_path, minilm_dir, cls):
    """transformers 5 builds the normaliser from tokenizer_config.json's settings for some of these classes and reads
    tokenizer.json as written for others (ConvBert, RetriBert, Realm); bertqa applied the settings to all of them:
    do_lower_case false made the capitals [UNK] where transformers lower-cased them."""
    folder = tmp_path / cls
    folder.mkdir()
    shutil.copy(minilm_dir / "tokenizer.json", folder)
    shutil.copy(minilm_dir / "config.json", folder)
    settings = {"do_lower_case": False, "tokenize_chinese_chars": False}
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": cls, **settings}))
    texts = ["Hello World, café 中文"]
    assert hf_encode(transformers.AutoTokenizer.from_pretrained(str(folder)), texts) == our_encode(
        load_tokenizer(folder), texts
    )


def test_added_tokens_beside_a_vocab_txt_are_refused_not_ignored(tmp_path):
    """transformers matches added tokens in the text before WordPiece ("covid-19" one token, a new id); bertqa split
    them into word pieces, and a model fine-tuned after add_tokens answered on ids it was not trained on."""
    folder = small_folder(tmp_path / "added", added_tokens={"covid-19": len(SMALL_VOCAB)})
    with pytest.raises(ValueError, match=r"added_tokens\.json: added token 'covid-19' \(id 20\): bertqa reads added"):
        load_tokenizer(folder)
    # The special tokens at their vocab.txt ids, which every tokenizer_config.json of transformers 4 lists: read.
    specials = {str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                         "single_word": False} for i, t in enumerate(SMALL_VOCAB[:5])}  # fmt: skip
    folder = small_folder(
        tmp_path / "specials",
        tokenizer_config={"tokenizer_class": "BertTokenizer", "do_lower_case": True, "added_tokens_decoder": specials},
    )
    texts = ["Hello world! covid-19"]
    assert hf_encode(transformers.AutoTokenizer.from_pretrained(str(folder)), texts) == our_encode(
        load_tokenizer(folder), texts
    )
    # Any other: a token of the vocabulary that is not special, or a special one past it (or in it: below).
    for i, entry, said in (("7", {"content": "c", "special": False}, "added token 'c' (id 7)"),
                           ("20", {"content": "[ENT]", "special": True}, "special token '[ENT]'")):  # fmt: skip
        config = {"do_lower_case": True, "added_tokens_decoder": {**specials, i: entry}}
        folder = small_folder(tmp_path / f"decoder{i}", tokenizer_config=config)
        with pytest.raises(ValueError, match=rf"tokenizer_config\.json: {re.escape(said)}"):
            load_tokenizer(folder)


@pytest.mark.parametrize("where", ["special_tokens_map", "additional_special_tokens", "extra_special_tokens",
                                   "tokenizer.json"])  # fmt: skip
def test_a_special_token_other_than_berts_is_refused_not_split(tmp_path, minilm_dir, where):
    """(review) An entity marker added with add_special_tokens, or put in place of [unused0] and declared special:
    transformers matches it whole ('<ent>', one id), bertqa split it into word pieces ('<', 'en', '##t', '>') and
    the model read ids it was not trained on, with no word of it."""
    folder = tmp_path / "tok"
    if where == "tokenizer.json":
        hf = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
        hf.add_special_tokens({"additional_special_tokens": ["<ent>"]})
        hf.save_pretrained(str(folder))
    else:
        ids = json.loads((minilm_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
        vocab = sorted(ids, key=ids.get)
        folder.mkdir()
        (folder / "vocab.txt").write_text("\n".join([vocab[0], "<ent>", *vocab[2:]]) + "\n", encoding="utf-8")
        config = {"do_lower_case": True, "tokenizer_class": "BertTokenizer"}
        if where == "special_tokens_map":
            (folder / "special_tokens_map.json").write_text(json.dumps({"additional_special_tokens": ["<ent>"]}))
        else:
            config[where] = ["<ent>"]
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))  # (one id for the marker)
    assert hf.convert_tokens_to_ids("<ent>") in hf_encode(hf, ["The <ent> Paris"])[0][0]
    with pytest.raises(ValueError, match=r"special token '<ent>': transformers matches it whole in the text"):
        load_tokenizer(folder)


def test_a_tokenizer_json_of_other_word_piece_settings_is_saved_as_transformers_reads_it_back(vocab_only_dir, tmp_path):
    """save() declared BertTokenizer, whose WordPiece transformers 5 builds itself (a word of over 100 characters is
    [UNK]), for a tokenizer.json whose WordPiece splits words of up to 200: transformers then read other ids."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = load_tokenizer(vocab_only_dir / "vocab.txt").backend.get_vocab()
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=200))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    tok.save(tmp_path / "saved")
    texts = ["x" * 150, "Hello world"]
    ours = our_encode(tok, texts)
    assert len(ours[0][0]) > 1  # in word pieces, not [UNK]
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert hf_encode(hf, texts) == ours
    assert load_tokenizer(tmp_path / "saved").fingerprint == tok.fingerprint


def test_broken_tokenizer_files_are_refused_in_one_line_when_read(tmp_path, caplog):
    """(review) A tokenizer.json whose WordPiece unk_token is not in its vocabulary loaded, then failed as an internal
    error at the first word it could not split (after the server's warm-up); a non-string 'content' in
    added_tokens_decoder was an internal error; a vocab.txt with a byte-order mark warned, wrongly, that the
    vocabulary was cased before its error."""
    from tokenizers import normalizers

    folder = wordpiece_json(
        small_folder(tmp_path / "unk"), normalizers.BertNormalizer(lowercase=True), unk_token="<unk>"
    )
    with pytest.raises(ValueError, match=r"tokenizer\.json: the WordPiece model's unk_token '<unk>' is not in the voc"):
        load_tokenizer(folder)
    folder = small_folder(tmp_path / "decoder", tokenizer_config={"added_tokens_decoder": {"2": {"content": ["[CLS]"],
                                                                                                  "special": True}}})  # fmt: skip
    with pytest.raises(
        ValueError, match=r"tokenizer_config\.json: added_tokens_decoder\['2'\]: 'content' must be a str"
    ):
        load_tokenizer(folder)
    folder = small_folder(tmp_path / "bom")
    (folder / "vocab.txt").write_bytes(b"\xef\xbb\xbf" + (folder / "vocab.txt").read_bytes())
    with caplog.at_level(logging.WARNING, logger="bertqa"), pytest.raises(ValueError, match="byte-order mark"):
        load_tokenizer(folder)
    assert caplog.records == []


def test_the_per_character_caches_are_bounded(minilm_dir):
    """A server's clients may send every code point there is: unbounded, bert_removes' cache and in_word's grew by
    about 275 MB over them, never given back."""
    from bertqa.squad.data import bert_removes
    from bertqa.tokenizer import CHARACTERS_CACHED

    tok = load_tokenizer(minilm_dir)
    for c in range(0x10000, 0x10000 + CHARACTERS_CACHED + 500):  # (past the surrogates)
        tok.in_word(chr(c))
        bert_removes(chr(c))
    assert len(tok._in_word) <= CHARACTERS_CACHED and bert_removes.cache_info().currsize <= CHARACTERS_CACHED
    # Still right past the bound: an ideograph is a word of its own, a BOM is cleaned away.
    assert tok.in_word("b") and not tok.in_word("\u4e00") and bert_removes("\ufeff") and not bert_removes("b")


def test_added_tokens_with_capitals_do_not_make_an_uncased_tokenizer_look_cased(minilm_dir, tmp_path, caplog):
    """An added token is matched after lower-casing too ("New York" as "new york"): counted among the word pieces,
    its capitals brought the warning that the vocabulary is cased, whose advice (--no-lower-case) breaks the model."""
    from tokenizers import Tokenizer

    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm_dir / name, tmp_path)
    backend = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    backend.add_tokens(["New York", "COVID19"])
    backend.save(str(tmp_path / "tokenizer.json"))
    with caplog.at_level(logging.WARNING, logger="bertqa"):
        tok = load_tokenizer(tmp_path)
    assert tok.do_lower_case and "upper-case" not in caplog.text
    assert tok.tokenize(["flights to new york"])[0].tokens[-1] == "new york"


def test_tokenizer_config_edge_cases_are_read_as_the_files_say(tmp_path, caplog):
    """(mutation review) What no test held: tokenizer_config.json's class before config.json's; a special token
    listed at an id other than its vocab.txt line; a file nested too deeply for Python's JSON; a numpy bool for
    do_lower_case; a null tokenize_chinese_chars (not given: tokenizer.json's setting stays); NFKC after NFKD
    (composed again: no accents stripped, no warning); a bracketed piece that is no special token ("[X": cased)."""
    from tokenizers import normalizers

    folder = small_folder(tmp_path / "order", tokenizer_config={"tokenizer_class": "BertJapaneseTokenizer"},
                          config={"tokenizer_class": "BertTokenizer"})  # fmt: skip
    with pytest.raises(ValueError, match=r"order/tokenizer_config\.json: tokenizer_class 'BertJapaneseTokenizer'"):
        load_tokenizer(folder)
    moved = {"7": {"content": "[PAD]", "special": True}}  # [PAD] is line 0
    folder = small_folder(tmp_path / "moved", tokenizer_config={"added_tokens_decoder": moved})
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: added token '\[PAD\]' \(id 7\)"):
        load_tokenizer(folder)
    folder = small_folder(tmp_path / "deep")
    (folder / "tokenizer_config.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ValueError, match=r"deep/tokenizer_config\.json: not a JSON object$"):
        load_tokenizer(folder)
    folder = small_folder(tmp_path / "numpy")
    assert our_encode(load_tokenizer(folder, do_lower_case=np.bool_(False)), ["Hello"]) == our_encode(
        load_tokenizer(folder, do_lower_case=False), ["Hello"]
    )

    def with_json(name, normalizer, vocab=SMALL_VOCAB, **config):
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **config}
        return wordpiece_json(small_folder(tmp_path / name, tokenizer_config=config), normalizer, vocab)

    vocab = SMALL_VOCAB + ["中", "##文", "文"]
    cjk = with_json("cjk", normalizers.BertNormalizer(lowercase=True, handle_chinese_chars=False), vocab,
                    tokenizer_class="BertTokenizer", tokenize_chinese_chars=None)  # fmt: skip
    (cjk / "vocab.txt").write_text("\n".join(vocab) + "\n")
    texts = ["中文"]  # (transformers' BertTokenizer refuses the null: a TypeError)
    assert load_tokenizer(cjk).tokenize(texts)[0].tokens == ["中", "##文"]
    accented = SMALL_VOCAB + ["é"]
    steps = normalizers.Sequence([normalizers.NFKD(), normalizers.NFKC(), normalizers.StripAccents()])
    folder = with_json("nfkc", steps, accented)
    (folder / "vocab.txt").write_text("\n".join(accented) + "\n")
    with caplog.at_level(logging.WARNING, logger="bertqa"):
        load_tokenizer(folder)
    assert not [r for r in caplog.records if "accents" in r.getMessage()], caplog.text
    assert load_tokenizer(folder).tokenize(["é"])[0].tokens == ["é"]
    folder = small_folder(tmp_path / "bracket")
    (folder / "vocab.txt").write_text("\n".join(SMALL_VOCAB[:5] + ["the", "[X"]) + "\n")
    assert load_tokenizer(folder).tokenize(["The"])[0].tokens == ["[UNK]"]  # cased: "The" is not "the"


def test_a_tokenizer_without_text_cleaning_is_saved_as_one_read_as_written(tmp_path):
    """(mutation review) transformers' BertTokenizer always cleans the text: a tokenizer.json that does not is saved
    as PreTrainedTokenizerFast, which transformers reads as it is, keeping the ids."""
    from tokenizers import normalizers

    folder = wordpiece_json(
        small_folder(tmp_path / "raw"), normalizers.BertNormalizer(clean_text=False, lowercase=True)
    )
    load_tokenizer(folder).save(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert saved["tokenizer_class"] == "PreTrainedTokenizerFast"
    texts = ["hello\x00world"]
    assert hf_encode(transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved")), texts) == our_encode(
        load_tokenizer(folder), texts
    )
