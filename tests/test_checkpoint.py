"""Checkpoint loading/saving: HF folders, NVIDIA .pt files, strictness and bad files."""

import argparse
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from skips import file_size_limit, platform_skip

from bertqa import BertForQuestionAnswering, cli, load_model, load_tokenizer, save_pretrained
from bertqa.checkpoint import CheckpointError, read_state_dict
from bertqa.config import BertConfig

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def real_batch(minilm_dir, tiny_squad):
    """Question/context pairs from tests/data/tiny-squad.json, padded: (ids, types, mask)."""
    tok = load_tokenizer(minilm_dir)
    para = json.loads(tiny_squad.read_text())["data"][0]["paragraphs"][0]
    encs = [tok.encode_pair(q["question"], para["context"][: 100 + 60 * i]) for i, q in enumerate(para["qas"][:3])]
    T = max(len(e["input_ids"]) for e in encs)
    ids = torch.zeros(len(encs), T, dtype=torch.long)
    types, mask = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, e in enumerate(encs):
        n = len(e["input_ids"])
        ids[i, :n], types[i, :n], mask[i, :n] = (
            torch.tensor(e["input_ids"]),
            torch.tensor(e["token_type_ids"]),
            1,
        )
    assert mask.sum(1).min() < T  # really padded
    return ids, types, mask


@pytest.fixture(scope="module")
def hf_qa_dir(tmp_path_factory, minilm_dir):
    """The real pretrained encoder with a (random, seeded) QA head, saved by transformers."""
    torch.manual_seed(0)
    model = transformers.BertForQuestionAnswering.from_pretrained(str(minilm_dir))
    out = tmp_path_factory.mktemp("hfqa")
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm_dir / name, out / name)
    return out


def max_diff(a, b, mask):
    return (a - b).abs()[mask.bool()].max().item()


def qa_logits(model, batch):
    ids, types, mask = batch
    with torch.no_grad():  # keywords: HF's positional order differs (attention_mask second)
        out = model(input_ids=ids, token_type_ids=types, attention_mask=mask)
    return out[0], out[1]


def test_real_encoder_matches_transformers(minilm_dir, real_batch, capsys):
    ours = load_model(minilm_dir).eval()
    notes = capsys.readouterr().out
    assert "qa_outputs initialised fresh" in notes and "bert.pooler" in notes
    ref = transformers.BertModel.from_pretrained(str(minilm_dir)).eval()
    ids, types, mask = real_batch
    with torch.no_grad():
        want = ref(input_ids=ids, token_type_ids=types, attention_mask=mask).last_hidden_state
        got = ours.bert(ids, types, mask)
    assert max_diff(got, want, mask) < 1e-4


def test_real_qa_logits_match_transformers(hf_qa_dir, real_batch):
    ours = load_model(hf_qa_dir)  # in eval mode as it comes, as from_pretrained's (it came in training mode)
    ref = transformers.BertForQuestionAnswering.from_pretrained(str(hf_qa_dir))
    assert not ours.training and not ref.training
    assert torch.equal(qa_logits(ours, real_batch)[0], qa_logits(ours, real_batch)[0])  # no dropout
    ids, types, mask = real_batch
    for got, want in zip(qa_logits(ours, real_batch), qa_logits(ref, real_batch)):
        assert max_diff(got, want, mask) < 1e-4
    ours.set_attention("eager")
    for got, want in zip(qa_logits(ours, real_batch), qa_logits(ref, real_batch)):
        assert max_diff(got, want, mask) < 1e-4


def nvidia_checkpoint(hf_qa_dir, path, wrap=True, extra=None):
    """Re-create NVIDIA DLE's layout from HF weights: `dense_act` names, vocab padded to a multiple of 8,
    pretraining heads, and the {"model", "optimizer", "epoch"} wrapper."""
    sd = transformers.BertForQuestionAnswering.from_pretrained(str(hf_qa_dir)).state_dict()
    nv = {}
    for k, v in sd.items():
        k = k.replace("intermediate.dense.", "intermediate.dense_act.")
        if k == "bert.embeddings.word_embeddings.weight":
            v = torch.cat([v, torch.randn(30528 - v.shape[0], v.shape[1])])
        nv[k] = v.clone()
    nv["bert.pooler.dense_act.weight"] = torch.randn(384, 384)
    nv["bert.pooler.dense_act.bias"] = torch.randn(384)
    nv["cls.predictions.transform.dense_act.weight"] = torch.randn(384, 384)
    nv["cls.predictions.bias"] = torch.randn(30528)
    nv.update(extra or {})
    obj = {"model": nv, "optimizer": {"state": {}, "param_groups": []}, "epoch": 3} if wrap else nv
    torch.save(obj, path)
    return path


def test_nvidia_checkpoint_loads_to_the_same_outputs(hf_qa_dir, real_batch, tmp_path, capsys):
    pt = nvidia_checkpoint(hf_qa_dir, tmp_path / "ckpt_8601.pt")
    shutil.copy(hf_qa_dir / "config.json", tmp_path / "bert_config.json")
    ours = load_model(pt).eval()
    notes = capsys.readouterr().out
    assert "30528" in notes and "cls.predictions" in notes
    ref = transformers.BertForQuestionAnswering.from_pretrained(str(hf_qa_dir)).eval()
    ids, types, mask = real_batch
    for got, want in zip(qa_logits(ours, real_batch), qa_logits(ref, real_batch)):
        assert max_diff(got, want, mask) < 1e-4
    # A bare state dict with the config given explicitly loads the same.
    bare = nvidia_checkpoint(hf_qa_dir, tmp_path / "elsewhere.pt", wrap=False)
    (tmp_path / "bert_config.json").unlink()
    with pytest.raises(CheckpointError, match="pass config="):
        load_model(bare)
    with pytest.raises(CheckpointError, match=r"\(CLI: --config\): is a folder; name the config.json in it$"):
        load_model(bare, config=hf_qa_dir)  # (review: it was "no such file")
    with pytest.raises(CheckpointError, match=r"^config '' \(CLI: --config\): no such file"):
        load_model(bare, config="")  # (not the current folder)
    again = load_model(bare, config=hf_qa_dir / "config.json").eval()
    assert torch.equal(qa_logits(again, real_batch)[0], qa_logits(ours, real_batch)[0])
    # An NVIDIA folder (one .pt beside bert_config.json) loads by its folder name too.
    folder = tmp_path / "nvidia"
    folder.mkdir()
    pt.rename(folder / pt.name)
    shutil.copy(hf_qa_dir / "config.json", folder / "bert_config.json")
    assert torch.equal(qa_logits(load_model(folder).eval(), real_batch)[0], qa_logits(ours, real_batch)[0])


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_weights_saved_from_ddp_and_compile_wrappers_load(hf_qa_dir, tmp_path, prefix):
    """torch.compile(DDP(model)), the order PyTorch recommends, saves `_orig_mod.module.` keys: they were all
    refused as not BERT weights."""
    sd = load_model(hf_qa_dir).state_dict()
    torch.save({prefix + k: v for k, v in sd.items()}, tmp_path / "wrapped.pt")
    loaded = load_model(tmp_path / "wrapped.pt", config=hf_qa_dir / "config.json").state_dict()
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_round_trip_through_save_pretrained(hf_qa_dir, real_batch, tmp_path):
    ours = load_model(hf_qa_dir).eval()
    out = save_pretrained(ours, load_tokenizer(hf_qa_dir), tmp_path / "saved")
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt"} <= {p.name for p in out.iterdir()}
    # Every file as readable as a plain write makes it: safetensors wrote its file 0600, unreadable to other users.
    umask = os.umask(0)
    os.umask(umask)
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {p.name: 0o666 & ~umask for p in out.iterdir()}
    ref = transformers.BertForQuestionAnswering.from_pretrained(str(out)).eval()
    ids, types, mask = real_batch
    for got, want in zip(qa_logits(ours, real_batch), qa_logits(ref, real_batch)):
        assert max_diff(got, want, mask) < 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf_tok("who?", "Bob.")["input_ids"] == load_tokenizer(out).encode_pair("who?", "Bob.")["input_ids"]
    # Saving again over the folder replaces it whole; no temporary folder is left beside it.
    save_pretrained(ours, None, out)
    assert not (out / "tokenizer.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]


def test_save_pretrained_refuses_to_replace_what_is_not_a_model_folder(hf_qa_dir, tmp_path):
    """The Python API replaced any folder (or file) at its destination whole: a user's notes went with it."""
    model, tokenizer = load_model(hf_qa_dir), load_tokenizer(hf_qa_dir)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    (tmp_path / "file").write_text("precious")
    for target, why in ((tmp_path / "mine", "it holds notes.txt, not a model's file"), (tmp_path / "file", "a file")):
        with pytest.raises(CheckpointError) as e:
            save_pretrained(model, tokenizer, target)
        assert str(e.value) == (f"{target}: exists and is not a model folder ({why}), and saving replaces the whole "
                                "folder; name a new folder")  # fmt: skip
    assert (tmp_path / "mine" / "notes.txt").read_text() == (tmp_path / "file").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "mine"]
    (tmp_path / "empty").mkdir()
    assert (save_pretrained(model, tokenizer, tmp_path / "empty") / "model.safetensors").is_file()


def test_a_model_folder_that_cannot_be_written_names_the_file_and_keeps_the_old_folder(minilm_dir, tmp_path):
    """A write that fails (a full disk; here a file size limit) names the model folder's file, not the temporary
    folder's nor nothing (safetensors' error was an "internal error"), and leaves the previous folder whole."""
    model = BertForQuestionAnswering(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=32))  # fmt: skip
    tokenizer = load_tokenizer(minilm_dir)
    out = save_pretrained(model, tokenizer, tmp_path / "saved")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    weights = (out / "model.safetensors").stat().st_size
    assert (out / "tokenizer.json").stat().st_size > weights + 4096
    # A failed write() names no file: the folder is named then.
    for limit, path in ((4096, out / "model.safetensors"), (weights + 4096, out)):
        with file_size_limit(limit), pytest.raises(OSError) as caught:
            save_pretrained(model, tokenizer, out)
        assert (caught.value.errno, caught.value.filename) == (errno.EFBIG, str(path))
        assert cli.error_line(caught.value, False) == f"{path}: File too large"
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]


def test_a_half_precision_source_is_saved_as_the_fp32_weights_it_becomes(hf_qa_dir, tmp_path):
    # transformers writes the weights' dtype into config.json, and loads a model in the dtype named there.
    half = transformers.BertForQuestionAnswering.from_pretrained(str(hf_qa_dir), dtype=torch.float16)
    half.save_pretrained(tmp_path / "fp16")
    assert "float16" in json.dumps(json.loads((tmp_path / "fp16" / "config.json").read_text()))
    model = load_model(tmp_path / "fp16", verbose=False)
    assert "model.safetensors: weights stored in float16, loaded in float32 (--precision sets the arithmetic)" in (
        model.load_notes
    )
    assert "stored in" not in " ".join(load_model(hf_qa_dir, verbose=False).load_notes)
    out = save_pretrained(model, load_tokenizer(hf_qa_dir), tmp_path / "saved")
    saved = json.loads((out / "config.json").read_text())
    assert "float16" not in json.dumps(saved)
    ref = transformers.BertForQuestionAnswering.from_pretrained(str(out))
    assert {p.dtype for p in ref.parameters()} == {torch.float32}


def test_a_classifiers_head_is_dropped_as_the_pretraining_heads_are(hf_qa_dir, tmp_path):
    """(review) A sequence classifier (an MNLI-tuned BERT, say) fine-tuned again for SQuAD, as transformers takes it:
    its `classifier.*` head was refused as unexpected keys."""
    ref = transformers.BertForSequenceClassification.from_pretrained(str(hf_qa_dir), num_labels=3)
    ref.save_pretrained(tmp_path / "nli")
    model = load_model(tmp_path / "nli", verbose=False)
    assert model.fresh_qa_head
    dropped = "model.safetensors: dropped 4 weights question answering does not use (bert.pooler, classifier)"
    assert dropped in model.load_notes
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, ref.bert.embeddings.word_embeddings.weight)


def test_a_sources_labels_and_length_are_saved_as_the_model_has_them(hf_qa_dir, tmp_path):
    # An encoder whose config.json came from a 3-label classifier: transformers sizes qa_outputs by num_labels.
    encoder = transformers.BertModel.from_pretrained(str(hf_qa_dir))
    encoder.config.id2label = {0: "entailment", 1: "neutral", 2: "contradiction"}
    encoder.config.label2id = {v: k for k, v in encoder.config.id2label.items()}
    encoder.config.max_position_embeddings = 256
    encoder.embeddings.position_embeddings.weight.data = encoder.embeddings.position_embeddings.weight.data[:256]
    encoder.save_pretrained(tmp_path / "nli")
    model = load_model(tmp_path / "nli")
    out = save_pretrained(model, load_tokenizer(hf_qa_dir), tmp_path / "saved", with_qa_head=True)  # (its fresh one)
    ref = transformers.BertForQuestionAnswering.from_pretrained(str(out))
    assert ref.qa_outputs.weight.shape == (2, 384) and torch.equal(ref.qa_outputs.weight, model.qa_outputs.weight)
    assert transformers.AutoTokenizer.from_pretrained(str(out)).model_max_length == 256


def test_mismatched_checkpoints_are_refused_with_a_grouped_list(hf_qa_dir, tmp_path):
    cfg = json.loads((hf_qa_dir / "config.json").read_text())
    folder = tmp_path / "wrong"
    folder.mkdir()
    shutil.copy(hf_qa_dir / "model.safetensors", folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "hidden_size": 768, "intermediate_size": 3072}))
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    msg = str(e.value)
    assert "mis-shaped" in msg and "checkpoint (384,) vs model (768,)" in msg
    assert len(msg.splitlines()) < 30  # grouped and capped, not one line per tensor
    # A size no tensor can have is config.json's error, in one line (it was an internal error building the model).
    (folder / "config.json").write_text(json.dumps({**cfg, "vocab_size": 10**20}))
    with pytest.raises(
        ValueError, match=r"wrong/config\.json: 'vocab_size' must be a positive integer below 2\^31, not 1000"
    ):
        load_model(folder)
    # Fewer layers in the config: the extra layers are unexpected keys, grouped by layer range.
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 4}))
    with pytest.raises(CheckpointError, match=r"unexpected(.|\n)*encoder\.layer\.4-5\.attention\.self\.query\.weight"):
        load_model(folder)
    # More layers: missing keys (only the QA head may be missing).
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 7}))
    with pytest.raises(CheckpointError, match=r"missing(.|\n)*layer\.6\."):
        load_model(folder)
    # Said before a model of the config's layers is built to list what it lacks (10^6 layers: hours, gigabytes).
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 10**5}))
    with pytest.raises(CheckpointError, match=r"\(100000 layers, hidden 384, vocab 30522\) \(the weights have layers 6: "
                                              r"is this their config\?\): 99994 missing layer\(s\): "
                                              r"bert\.encoder\.layer\.6-99999\.\*$"):  # fmt: skip
        load_model(folder)
    # An extra key that is neither a BERT weight nor a known unused head.
    pt = nvidia_checkpoint(hf_qa_dir, tmp_path / "extra.pt", extra={"bert.adapter.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"1 unexpected key(.|\n)*bert\.adapter\.weight"):
        load_model(pt, config=hf_qa_dir / "config.json")
    # A layer's key holding braces is listed as it is (they were taken for format fields: an internal KeyError).
    pt = nvidia_checkpoint(
        hf_qa_dir, tmp_path / "braces.pt", extra={"bert.encoder.layer.0.adapter.{a}.weight": torch.zeros(3)}
    )
    with pytest.raises(
        CheckpointError, match=r"1 unexpected key\(s\): bert\.encoder\.layer\.0\.adapter\.\{a\}\.weight"
    ):
        load_model(pt, config=hf_qa_dir / "config.json")
    # Two names for one weight: which one holds it cannot be told (the later one used to win, silently).
    pt = nvidia_checkpoint(hf_qa_dir, tmp_path / "twice.pt", extra={"bert.embeddings.LayerNorm.gamma": torch.ones(384)})
    with pytest.raises(CheckpointError, match=r"1 doubled key\(s\): bert\.embeddings\.LayerNorm\.weight and "
                                              r"bert\.embeddings\.LayerNorm\.gamma \(both bert\.embeddings\.LayerNorm\.weight\)$"):  # fmt: skip
        load_model(pt, config=hf_qa_dir / "config.json")
    # A word embedding of the wrong rank is reported with the other shapes (it used to end in an IndexError).
    scalar = {"bert.embeddings.word_embeddings.weight": torch.tensor(0.5)}
    pt = nvidia_checkpoint(hf_qa_dir, tmp_path / "scalar.pt", extra=scalar)
    with pytest.raises(CheckpointError, match=r"1 mis-shaped key(.|\n)*word_embeddings\.weight: checkpoint \(\) vs"):
        load_model(pt, config=hf_qa_dir / "config.json")


def test_a_checkpoint_whose_bytes_rotted_is_refused(hf_qa_dir, tmp_path, rot_record):
    """torch.load reads a record whose bytes changed without a word (a NaN weight, say); the zip's CRC tells."""
    pt = nvidia_checkpoint(hf_qa_dir, tmp_path / "nv.pt")
    record = rot_record(pt, tmp_path / "rotted.pt")
    assert torch.load(tmp_path / "rotted.pt", weights_only=True)  # no complaint from torch
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "rotted.pt", config=hf_qa_dir / "config.json")
    assert str(e.value) == f"{tmp_path / 'rotted.pt'}: damaged ({record} fails its checksum); copy or download it again"
    load_model(pt, config=hf_qa_dir / "config.json", verbose=False)  # the sound file loads
    # Saved without checksums (torch's compute_crc32=False writes 0 for each record): sound, not damaged.
    from torch.utils.serialization import config as serialization

    serialization.save.compute_crc32 = False
    try:
        torch.save(torch.load(pt, weights_only=True), tmp_path / "no-crc.pt")
    finally:
        serialization.save.compute_crc32 = True
    with zipfile.ZipFile(tmp_path / "no-crc.pt") as archive:
        assert {record.CRC for record in archive.infolist()} == {0}
    assert load_model(tmp_path / "no-crc.pt", config=hf_qa_dir / "config.json").qa_outputs.weight.isfinite().all()


def test_truncated_and_non_checkpoint_files(hf_qa_dir, tmp_path):
    cfg = hf_qa_dir / "config.json"
    data = (hf_qa_dir / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    pt = nvidia_checkpoint(hf_qa_dir, tmp_path / "full.pt")
    (tmp_path / "cut.pt").write_bytes(pt.read_bytes()[:100_000])
    (tmp_path / "notes.pt").write_text("these are my notes, not a checkpoint\n")
    (tmp_path / "noise.pt").write_bytes(bytes(range(256)) * 4)  # no trust_pickle advice for garbage
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save({0: torch.zeros(3), "bert.pooler.dense.bias": torch.zeros(3)}, tmp_path / "numbered.pt")
    whole = pt.read_bytes()  # its central directory damaged, its end record intact: still "a zip file"
    at = whole.index(b"PK\x01\x02")
    (tmp_path / "damaged.pt").write_bytes(whole[:at] + b"XX" + whole[at + 2 :])
    lfs = "version https://git-lfs.github.com/spec/v1\noid sha256:4a1c0e9f\nsize 437985387\n"  # cloned without git-lfs
    (tmp_path / "lfs.safetensors").write_text(lfs)
    (tmp_path / "lfs.bin").write_text(lfs)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    for name, pattern in [
        ("model.safetensors.index.json", 'no "weight_map" of weight names to shard files'),
        ("lfs.safetensors", "a Git LFS pointer, not the weights; fetch them with `git lfs pull`"),
        ("lfs.bin", "a Git LFS pointer, not the weights"),
        ("cut.safetensors", "not a readable safetensors"),
        ("cut.pt", "not a readable PyTorch checkpoint: truncated"),
        ("notes.pt", "not a readable PyTorch checkpoint"),
        ("noise.pt", "not a readable PyTorch checkpoint"),
        ("damaged.pt", "not a readable PyTorch checkpoint"),  # was an internal error (BadZipFile)
        ("list.pt", "not a state dict"),
        ("numbered.pt", "not a state dict of named tensors"),
    ]:
        with pytest.raises(CheckpointError, match=pattern) as e:
            load_model(tmp_path / name, config=cfg)
        assert len(str(e.value).splitlines()) == 1 and name in str(e.value)
        assert "will likely succeed" not in str(e.value)  # torch's advice to unpickle in full: not for garbage
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_model(tmp_path / "absent.pt", config=cfg)


def test_a_checkpoint_cut_anywhere_is_named(tmp_path):
    """(review) At many cut points of a small .bin / .pt (a copy or download cut short) torch's archive reader raised
    OSError 'Invalid argument', naming no file: `bertqa: error: Invalid argument` (17 of these 39)."""
    cfg = BertConfig(vocab_size=45, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    cfg.to_json(tmp_path / "config.json")
    torch.manual_seed(0)
    torch.save(BertForQuestionAnswering(cfg).state_dict(), tmp_path / "pytorch_model.bin")
    whole = (tmp_path / "pytorch_model.bin").read_bytes()
    for k in range(1, 40):
        cut = tmp_path / f"cut{k}.bin"
        cut.write_bytes(whole[: len(whole) * k // 40])
        with pytest.raises(CheckpointError) as e:
            load_model(cut, config=tmp_path / "config.json")
        assert str(e.value).startswith(f"{cut}: ") and len(str(e.value).splitlines()) == 1


def test_a_pickle_needing_a_module_not_installed_names_it(hf_qa_dir, tmp_path, monkeypatch):
    (tmp_path / "trainer_state.py").write_text("class Step:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import trainer_state

    torch.save({"model": torch.load(nvidia_checkpoint(hf_qa_dir, tmp_path / "nv.pt"))["model"],
                "state": trainer_state.Step()}, tmp_path / "full.pt")  # fmt: skip
    monkeypatch.delitem(sys.modules, "trainer_state")
    (tmp_path / "trainer_state.py").unlink()
    with pytest.raises(
        CheckpointError, match=r"full\.pt: unpickling it needs the Python module 'trainer_state', which"
    ):
        load_model(tmp_path / "full.pt", config=hf_qa_dir / "config.json", trust_pickle=True)


@pytest.mark.filterwarnings("ignore:`torch.jit.s:DeprecationWarning")  # script and save: the format still exists
def test_torchscript_and_weights_of_other_formats_are_named(hf_qa_dir, tmp_path):
    script = tmp_path / "traced.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), script)  # as exported for a model server
    for trust in (False, True):
        with pytest.raises(
            CheckpointError, match=rf"^{script}: a TorchScript archive \(torch\.jit\.save\), not a state"
        ):
            load_model(script, config=hf_qa_dir / "config.json", trust_pickle=trust)
    for name, what in [("tf_model.h5.index.json", "an index of weights sharded over several files in a format"),
                       ("bert_model.ckpt.index", "a TensorFlow checkpoint"), ("tf_model.h5", "TensorFlow \\(Keras\\)"),
                       ("flax_model.msgpack", "Flax weights")]:  # fmt: skip
        folder = tmp_path / name.replace(".", "-")
        folder.mkdir()
        shutil.copy(hf_qa_dir / "config.json", folder)
        (folder / name).write_text("{}")
        with pytest.raises(
            CheckpointError,
            match=f"^{folder}: holds {re.escape(name)}, {what}.*: load it with "
            "transformers and save_pretrained it to a new folder first$",
        ):
            load_model(folder)
        with pytest.raises(CheckpointError, match=f"^{folder / name}: {what}"):
            load_model(folder / name)
    # An HF Trainer's checkpoint folder: its optimizer, scheduler and RNG states are pickles beside the weights.
    folder = tmp_path / "tf_model-h5-index-json"
    for extra in ("rng_state.pth", "optimizer.pt"):  # one pickle (it was loaded as the weights), then two
        torch.save({"step": 1}, folder / extra)
        with pytest.raises(CheckpointError, match=f"^{folder}: holds tf_model.h5.index.json, an index of weights"):
            load_model(folder)
    # One shard named (or a folder of shards without their index): "N missing keys", and "is this their config?"
    sd = load_file(hf_qa_dir / "model.safetensors")
    for name in ("model-00002-of-00002.safetensors", "pytorch_model-00001-of-00003.bin"):
        folder = tmp_path / name.replace(".", "-")
        folder.mkdir()
        shutil.copy(hf_qa_dir / "config.json", folder)
        part = {k: v for k, v in sd.items() if "layer.1." in k}
        if name.endswith(".safetensors"):
            save_file(part, folder / name)
        else:
            torch.save(part, folder / name)
        for path, shown in ((folder / name, f"{folder / name}: "), (folder, f"{folder}: holds {name}, ")):
            with pytest.raises(CheckpointError, match=f"^{shown}one shard of weights sharded over several files"
                                                      "(; name the folder that holds the shards and their index|, but "
                                                      "no index of them \\(model.safetensors.index.json or "
                                                      "pytorch_model.bin.index.json\\))$"):  # fmt: skip
                load_model(path)
    whole = tmp_path / "whole" / "model-00001-of-00001.safetensors"  # (a shard's name for a model in one file)
    whole.parent.mkdir()
    shutil.copy(hf_qa_dir / "model.safetensors", whole)
    assert torch.equal(load_model(whole, config=hf_qa_dir / "config.json").qa_outputs.weight, sd["qa_outputs.weight"])


def _shard(sd: dict, folder, ext: str, parts: int = 3) -> dict:
    """sd written as transformers' save_pretrained shards it (max_shard_size), with its index; the weight map."""
    names, weight_map = sorted(sd), {}
    prefix = "model" if ext == "safetensors" else "pytorch_model"
    for i in range(parts):
        file = f"{prefix}-{i + 1:05d}-of-{parts:05d}.{ext}"
        part = {k: sd[k].contiguous() for k in names[i::parts]}
        save_file(part, folder / file) if ext == "safetensors" else torch.save(part, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
             "weight_map": weight_map}  # fmt: skip
    (folder / f"{prefix}.{ext}.index.json").write_text(json.dumps(index))
    return weight_map


def test_weights_sharded_over_several_files_load_by_their_index(hf_qa_dir, real_batch, tmp_path):
    """(review) A folder of shards and their index, as save_pretrained(max_shard_size=...) writes it (and transformers
    4.x did above 5-10 GB by default), was refused, and `bertqa convert` refused it too: no way in."""
    whole = load_model(hf_qa_dir, verbose=False)
    want = qa_logits(whole, real_batch)
    ref = transformers.BertForQuestionAnswering.from_pretrained(str(hf_qa_dir))
    ref.save_pretrained(tmp_path / "hf", max_shard_size="4MB")  # (as transformers itself writes them)
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    sd = load_file(hf_qa_dir / "model.safetensors")
    for ext in ("safetensors", "bin"):
        (tmp_path / ext).mkdir()
        _shard(sd, tmp_path / ext, ext)
        for name in ("config.json", "tokenizer.json"):
            shutil.copy(hf_qa_dir / name, tmp_path / ext)
    (tmp_path / "trainer").mkdir()  # an HF Trainer's checkpoint: its states' pickles beside the shards
    _shard(sd, tmp_path / "trainer", "safetensors")
    shutil.copy(hf_qa_dir / "config.json", tmp_path / "trainer")
    torch.save({"step": 1}, tmp_path / "trainer" / "optimizer.pt")
    for path in (tmp_path / "hf", tmp_path / "safetensors", tmp_path / "bin", tmp_path / "trainer",
                 tmp_path / "bin" / "pytorch_model.bin.index.json"):  # fmt: skip
        model = load_model(path)
        assert all(torch.equal(a, b) for a, b in zip(qa_logits(model, real_batch), want)), path
        assert model.state_dict().keys() == whole.state_dict().keys()
    # Beside a whole model's file, the index is not read (transformers' order), even one whose shards are gone.
    shutil.copy(hf_qa_dir / "model.safetensors", tmp_path / "safetensors")
    for file in (tmp_path / "safetensors").glob("*-of-*"):
        file.unlink()
    assert all(torch.equal(a, b) for a, b in zip(qa_logits(load_model(tmp_path / "safetensors"), real_batch), want))
    # Shards without their index, beside a Trainer's pickles: not one of those read as the weights.
    (tmp_path / "trainer" / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match="trainer: holds model-00001-of-00003.safetensors, one shard of weights "
                                              "sharded over several files, but no index of them"):  # fmt: skip
        load_model(tmp_path / "trainer")
    # A variant's weights (variant="fp16": model.safetensors.index.fp16.json, model.fp16-00001-of-00003.safetensors)
    # load where the index is named, as transformers reads them only when the variant is asked for.
    ref.save_pretrained(tmp_path / "fp16", max_shard_size="4MB", variant="fp16")
    variant = tmp_path / "fp16" / "model.safetensors.index.fp16.json"
    assert variant.is_file() and list((tmp_path / "fp16").glob("model.fp16-00001-of-000*.safetensors"))
    with pytest.raises(CheckpointError, match="fp16: holds model.safetensors.index.fp16.json, the index of a variant "
                                              "of the model's weights sharded over several files; name the index file "
                                              "itself$"):  # fmt: skip
        load_model(tmp_path / "fp16")
    assert all(torch.equal(a, b) for a, b in zip(qa_logits(load_model(variant), real_batch), want))
    # `convert` makes one file of them.
    r = subprocess.run([sys.executable, "-m", "bertqa", "convert", str(tmp_path / "bin"), str(tmp_path / "one")],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert load_file(tmp_path / "one" / "model.safetensors").keys() == whole.state_dict().keys()


def test_an_index_and_shards_that_disagree_are_refused_naming_the_file(hf_qa_dir, tmp_path):
    sd = load_file(hf_qa_dir / "model.safetensors")
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(hf_qa_dir / "config.json", folder)
    weight_map = _shard(sd, folder, "safetensors")
    index = folder / "model.safetensors.index.json"
    first = "model-00001-of-00003.safetensors"
    key = min(k for k, v in weight_map.items() if v == first)
    shown = re.escape(str(index))

    def refused(pattern, data=None):
        if data is not None:
            index.write_text(data if isinstance(data, str) else json.dumps(data))
        with pytest.raises(CheckpointError, match=pattern) as e:
            load_model(folder)
        assert len(str(e.value).splitlines()) == 1
        index.write_text(json.dumps({"weight_map": weight_map}))

    refused(f"^{shown}: not an index of weight shards \\(Expecting", "{not json")
    refused(f"^{shown}: not an index of weight shards \\(JSON nested too deeply\\)$", "[" * 100_000)
    refused(
        f"^{shown}: a Git LFS pointer, not the index", "version https://git-lfs.github.com/spec/v1\noid sha256:4a\n"
    )
    for bad in ({}, {"weight_map": []}, {"weight_map": {key: 3}}, [1, 2], "null"):
        refused(f'^{shown}: no "weight_map" of weight names to shard files; not an index of weight shards$', bad)
    # Only files beside the index, in its format (what `convert` checks that its output folder does not hold).
    for elsewhere in ("../m/" + first, "/etc/passwd", "model.safetensors.index.json", "", "..", "part.data"):
        refused(f"^{shown}: shard '{re.escape(elsewhere)}' \\(of {key}\\) is not a .safetensors file beside the "
                "index$", {"weight_map": {**weight_map, key: elsewhere}})  # fmt: skip
    (folder / first).rename(tmp_path / first)  # a download not finished
    refused(f"^{shown}: its shard {first} \\(of {key}, \\d+ weights\\) is not in {re.escape(str(folder))}: a "
            "download or copy not finished\\?$")  # fmt: skip
    (folder / first).symlink_to(tmp_path / "blobs" / "4a1c")  # an HF cache whose blob was cleaned
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(str(folder / first))}: a symbolic link to "
                                                f"{re.escape(str(tmp_path))}/blobs/4a1c, which does not exist"):  # fmt: skip
        load_model(folder)  # (as a whole model.safetensors that is such a link)
    (folder / first).unlink()
    (tmp_path / first).rename(folder / first)
    moved = {**weight_map, key: "model-00002-of-00003.safetensors"}  # the index of another save, say
    refused(
        f"^{re.escape(str(folder / first))}: not the shard model.safetensors.index.json names \\(1 weight\\(s\\) "
        f"differ: {key} in it, which the index puts elsewhere\\)$",
        {"weight_map": moved},
    )
    fewer = {k: v for k, v in weight_map.items() if k != key}
    refused(
        f"^{re.escape(str(folder / first))}: not the shard .* \\(1 weight\\(s\\) differ: {key} in it, not in "
        "the index\\)$",
        {"weight_map": fewer},
    )
    save_file({k: v.contiguous() for k, v in sd.items() if weight_map[k] == first and k != key}, folder / first)
    refused(f"^{re.escape(str(folder / first))}: not the shard .* \\(1 weight\\(s\\) differ: {key} not in it\\)$")


def test_a_pt_with_a_compressed_record_is_refused_before_it_is_inflated(hf_qa_dir, tmp_path):
    """torch.save stores its records; a deflated one (1000 times its size when inflated: a zip bomb) was inflated in
    full before torch compared its size with the tensor's, and a 50 MB file asked for 50 GB."""
    plain, bomb = tmp_path / "plain.pt", tmp_path / "bomb.pt"
    torch.save({"w": torch.zeros(4)}, plain)
    with zipfile.ZipFile(plain) as zin, zipfile.ZipFile(bomb, "w") as zout:
        for info in zin.infolist():
            packed = zipfile.ZIP_DEFLATED if info.filename.endswith("/data/0") else zipfile.ZIP_STORED
            zout.writestr(info.filename, zin.read(info) + b"\0" * 10**6 * (packed == zipfile.ZIP_DEFLATED),
                          compress_type=packed)  # fmt: skip
    for trust in (False, True):
        with pytest.raises(CheckpointError, match=rf"^{bomb}: compressed record [^ ]*/data/0; torch.save writes none: "
                                                  "not a PyTorch checkpoint$"):  # fmt: skip
            load_model(bomb, config=hf_qa_dir / "config.json", trust_pickle=trust)


def test_full_unpickling_needs_explicit_trust(hf_qa_dir, tmp_path):
    sd = transformers.BertForQuestionAnswering.from_pretrained(str(hf_qa_dir)).state_dict()
    path = tmp_path / "pretrain.pt"
    torch.save({"model": sd, "args": argparse.Namespace(lr=1e-4)}, path)  # pickles a Python object
    with pytest.raises(CheckpointError, match="trust_pickle=True .*--trust-pickle"):
        load_model(path, config=hf_qa_dir / "config.json")
    model = load_model(path, config=hf_qa_dir / "config.json", trust_pickle=True)
    assert torch.equal(model.qa_outputs.weight, sd["qa_outputs.weight"])
    # Only True is trust: "no" (a true string) unpickled in full, which runs whatever code the file names.
    for no in ("no", "False", 0, None):
        with pytest.raises(ValueError, match=f"^trust_pickle must be True or False, got {re.escape(repr(no))}$"):
            load_model(path, config=hf_qa_dir / "config.json", trust_pickle=no)
        with pytest.raises(ValueError, match="^trust_pickle must be True or False"):
            read_state_dict(path, trust_pickle=no)


def test_the_python_apis_wrong_kinds_of_input_are_refused_before_any_work(hf_qa_dir, tmp_path, minilm_dir):
    """(review) save_pretrained checked its model and tokenizer only once the weights were written (an
    AttributeError), wrote an extra file named "../x" outside the folder and kept the head for with_qa_head="no";
    load_model failed on a device it cannot use only after reading the weights, with torch's RuntimeError."""
    model, tokenizer = load_model(hf_qa_dir), load_tokenizer(hf_qa_dir)
    hf_model = transformers.BertForQuestionAnswering.from_pretrained(str(hf_qa_dir))
    out = tmp_path / "out"
    for kwargs, error, message in [
        ({"model": hf_model}, TypeError, "model must be bertqa's BertForQuestionAnswering (bertqa.load_model), not "
                                         "BertForQuestionAnswering"),
        ({"tokenizer": str(hf_qa_dir)}, TypeError, "tokenizer must be bertqa's BertTokenizer (bertqa.load_tokenizer) "
                                                   "or None, not str"),
        ({"extra_files": ["notes.txt"]}, TypeError, "extra_files must be a dict of file name -> text, not list"),
        ({"extra_files": {"../x.txt": "x"}}, ValueError, "extra_files['../x.txt']: a file name in the folder"),
        ({"with_qa_head": "no"}, ValueError, "with_qa_head must be True or False, got 'no'"),
    ]:  # fmt: skip
        with pytest.raises(error, match=f"^{re.escape(message)}"):
            save_pretrained(**{"model": model, "tokenizer": tokenizer, "directory": out, **kwargs})
    assert sorted(os.listdir(tmp_path)) == []
    for device, message in (("gpu", "device 'gpu': "), (2.5, "device must be a name ('cpu', 'cuda:0'), a torch")):
        with pytest.raises((ValueError, TypeError), match=f"^{re.escape(message)}"):
            load_model(tmp_path / "missing", device=device)  # (said before the path is even looked at)
    assert load_model(hf_qa_dir, device=-1).qa_outputs.weight.device == torch.device("cpu")  # (the pipeline's rule)


def test_an_nvidia_checkpoint_saved_mid_pretraining_loads(hf_qa_dir, tmp_path):
    """NVIDIA's run_pretraining.py keeps its data loader, of a class its script defines, in every checkpoint before
    the last step: unpickled in full, that class is missing here. It was reported as a corrupt file."""
    nv = nvidia_checkpoint(hf_qa_dir, tmp_path / "nv.pt")
    script = ("import sys, torch\n"
              "class pretraining_dataset:\n    def __init__(self, f):\n        self.files = [f]\n"
              "class Files(list):\n    pass\nclass Options(dict):\n    pass\n"
              "class Loader:\n    def __init__(self):\n        self.dataset = pretraining_dataset('shard_0.hdf5')\n"
              "        self.files, self.options = Files(['a', 'b']), Options(workers=4)\n"
              "ckpt = torch.load(sys.argv[1])\n"
              "torch.save({**ckpt, 'files': [0, 'shard_0.hdf5'], 'data_loader': Loader()}, sys.argv[2])\n"
              "torch.save(Loader(), sys.argv[3])\n")  # fmt: skip
    mid, other = tmp_path / "ckpt_1000.pt", tmp_path / "loader.pt"
    subprocess.run([sys.executable, "-c", script, nv, mid, other], check=True)
    cfg = hf_qa_dir / "config.json"
    with pytest.raises(CheckpointError, match="trust_pickle=True"):
        load_model(mid, config=cfg)
    ours, reference = load_model(mid, config=cfg, trust_pickle=True), load_model(nv, config=cfg)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), reference.state_dict().values()))
    with pytest.raises(CheckpointError, match=r"loader\.pt: unpickling it needs the class 'Loader' of the script"):
        load_model(other, config=cfg, trust_pickle=True)


def test_weights_of_the_right_shape_but_no_float_data_are_refused(hf_qa_dir, tmp_path):
    """Integers and booleans were cast to floats, and meta tensors (no data) failed inside torch's load_state_dict."""
    sd = load_file(str(hf_qa_dir / "model.safetensors"))
    sd["qa_outputs.weight"] = sd["qa_outputs.weight"].to(torch.int32)
    sd["qa_outputs.bias"] = torch.empty_like(sd["qa_outputs.bias"], device="meta")
    torch.save(sd, tmp_path / "bad.bin")
    with pytest.raises(CheckpointError, match=r"2 non-float key\(s\): qa_outputs\.bias: meta tensor, no data, "
                                              r"qa_outputs\.weight: int32$"):  # fmt: skip
        load_model(tmp_path / "bad.bin", config=hf_qa_dir / "config.json")


def test_safetensors_under_another_name_load(hf_qa_dir, tmp_path):
    """A .bin that is a safetensors file was refused with torch's unpickling boilerplate as the reason."""
    shutil.copy(hf_qa_dir / "model.safetensors", tmp_path / "weights.bin")
    ours = load_model(tmp_path / "weights.bin", config=hf_qa_dir / "config.json")
    assert torch.equal(ours.qa_outputs.weight, load_model(hf_qa_dir).qa_outputs.weight)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json", "vocab.txt"])
def test_a_model_file_that_is_a_link_to_nothing_is_named_not_taken_for_no_file(hf_qa_dir, tmp_path, run_here, name):
    """(review) In an HF cache snapshot whose blob is gone, model.safetensors is a link to nothing: the error said
    the folder held no model.safetensors (nor config.json), and a tokenizer.json to nothing was passed over for
    vocab.txt."""
    folder = tmp_path / "snapshot"
    shutil.copytree(hf_qa_dir, folder)
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n")  # (present: tokenizer.json is read first)
    (folder / name).unlink(missing_ok=True)
    (folder / name).symlink_to(tmp_path / "blobs" / "0123abcd")
    r = run_here("ask", "--model", folder, "--question", "Who?", "--context", "Denver won.")
    if name == "vocab.txt":  # beside a tokenizer.json, which is read first (as transformers does), it is not read
        assert r.returncode == 0, r.stderr
        (folder / "tokenizer.json").unlink()
        r = run_here("ask", "--model", folder, "--question", "Who?", "--context", "Denver won.")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"bertqa: error: {folder / name}: a symbolic link to {tmp_path / 'blobs' / '0123abcd'}, which does not exist "
        "(an unfinished download, or a cleaned cache?)"
    ], r.stderr


def test_an_empty_model_path_is_refused_not_read_as_the_current_folder(hf_qa_dir, monkeypatch, run_here):
    monkeypatch.chdir(hf_qa_dir)  # a model folder: Path("") would load it
    with pytest.raises(CheckpointError, match="model path '': empty"):
        load_model("")
    r = run_here("ask", "--model", "", "--question", "Who?", "--context", "Denver won.", cwd=hf_qa_dir)
    assert (
        r.returncode == 1
        and r.stdout == ""
        and r.stderr.strip().splitlines() == ["bertqa: error: --model '': empty; name the checkpoint file or folder"]
    )


def test_convert_cli(hf_qa_dir, real_batch, tmp_path, run_here):
    pt = nvidia_checkpoint(hf_qa_dir, tmp_path / "nv.pt")
    load_tokenizer(hf_qa_dir).save(tmp_path / "vocab")
    r = run_here(
        "convert",
        pt,
        tmp_path / "out",
        "--config",
        hf_qa_dir / "config.json",
        "--vocab",
        tmp_path / "vocab" / "vocab.txt",
    )
    assert r.returncode == 0, r.stderr
    ref = transformers.BertForQuestionAnswering.from_pretrained(str(tmp_path / "out")).eval()
    orig = transformers.BertForQuestionAnswering.from_pretrained(str(hf_qa_dir)).eval()
    ids, types, mask = real_batch
    for got, want in zip(qa_logits(ref, real_batch), qa_logits(orig, real_batch)):
        assert max_diff(got, want, mask) < 1e-4
    (tmp_path / "bad.pt").write_text("hello")
    r = run_here("convert", tmp_path / "bad.pt", tmp_path / "out2", "--config", hf_qa_dir / "config.json")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "bad.pt" in r.stderr
    assert not (tmp_path / "out2").exists()
    # A mistyped --vocab, or one without a tokenizer, is named as the flag's, not answered with "pass --vocab".
    for vocab, problem in ((tmp_path / "vocb" / "vocab.txt", "no such file or folder"), (tmp_path, "no tokenizer")):
        r = run_here("convert", pt, tmp_path / "out2", "--config", hf_qa_dir / "config.json", "--vocab", vocab)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith(f"bertqa: error: --vocab {vocab}: {problem}") and "pass --vocab" not in r.stderr
        assert not (tmp_path / "out2").exists()


def test_convert_of_a_pretrained_encoder_does_not_save_its_random_head(minilm_dir, tmp_path, run_here):
    """Saved, a freshly initialised QA head would pass for a fine-tuned one in evaluate, ask and serve."""
    from safetensors.torch import load_file

    r = run_here("convert", minilm_dir, tmp_path / "encoder")
    assert r.returncode == 0, r.stderr
    assert "no QA head: fine-tune it" in r.stdout
    saved = load_file(str(tmp_path / "encoder" / "model.safetensors"))
    assert saved and not any(k.startswith("qa_outputs.") for k in saved)
    # (review) The count named the fresh head's parameters too, which it does not write.
    written = sum(v.numel() for k, v in saved.items() if not k.endswith(("position_ids", "token_type_ids")))
    assert f"({written:,} parameters in float32; no QA head" in r.stdout
    with pytest.raises(CheckpointError, match="no fine-tuned question-answering head"):
        load_model(tmp_path / "encoder", require_qa_head=True)
    assert load_model(tmp_path / "encoder").fresh_qa_head  # fine to train from
    # Its fresh head comes from the caller's seed, as it did, without drawing from the caller's generator (the
    # initial weights that the checkpoint's replace, too).
    torch.manual_seed(5)
    state = torch.get_rng_state()
    heads = [load_model(tmp_path / "encoder").qa_outputs.weight for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), state) and torch.equal(*heads)
    torch.manual_seed(5)
    assert torch.equal(heads[0], BertForQuestionAnswering(load_model(tmp_path / "encoder").config).qa_outputs.weight)
    # save_pretrained too: by default it wrote the random head, and the folder then answered questions with it.
    encoder, tok = load_model(minilm_dir, verbose=False), load_tokenizer(minilm_dir)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):  # (cast, it was taken for a trained head)
        save_pretrained(load_model(minilm_dir, verbose=False).to(dtype), tok, tmp_path / "resaved")
        with pytest.raises(CheckpointError, match="no fine-tuned question-answering head"):
            load_model(tmp_path / "resaved", require_qa_head=True)
    with torch.no_grad():
        encoder.qa_outputs.bias += 0.5  # a head trained (in a loop of the user's own) is kept
    save_pretrained(encoder, tok, tmp_path / "resaved")
    assert torch.equal(load_model(tmp_path / "resaved", require_qa_head=True).qa_outputs.bias, encoder.qa_outputs.bias)
    save_pretrained(encoder, tok, tmp_path / "headless", with_qa_head=False)  # as asked, either way
    assert not any(k.startswith("qa_outputs.") for k in load_file(str(tmp_path / "headless" / "model.safetensors")))


def test_convert_never_replaces_its_source_or_a_folder_that_is_not_a_model(hf_qa_dir, tmp_path, run_here):
    (tmp_path / "models").mkdir()
    pt = nvidia_checkpoint(hf_qa_dir, tmp_path / "models" / "nv.pt")
    (tmp_path / "models" / "notes.txt").write_text("mine")
    shutil.copy(hf_qa_dir / "tokenizer.json", tmp_path / "models" / "tokenizer.json")
    cfg = hf_qa_dir / "config.json"
    for dst, why in ((tmp_path / "models", "it holds"), (tmp_path, "it holds")):
        r = run_here("convert", pt, dst, "--config", cfg)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and why in r.stderr, r.stderr
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "data.json").write_text("{}")
    r = run_here("convert", pt, tmp_path / "other", "--config", cfg)
    assert r.returncode == 1 and "exists and is not a model folder (it holds data.json, not a model's" in r.stderr
    (tmp_path / "project").mkdir()  # a config.json does not make a model folder of a folder holding other files
    (tmp_path / "project" / ".git").mkdir()
    shutil.copy(cfg, tmp_path / "project" / "config.json")
    r = run_here("convert", pt, tmp_path / "project", "--config", cfg)
    assert r.returncode == 1 and "not a model folder (it holds .git, not a model's file)" in r.stderr, r.stderr
    shutil.copy(hf_qa_dir / "tokenizer.json", tmp_path / "other" / "tokenizer.json")
    (tmp_path / "other" / "data.json").rename(tmp_path / "data.json")
    r = run_here("convert", pt, tmp_path / "other", "--config", cfg)
    assert r.returncode == 1 and "not a model folder (no config.json)" in r.stderr, r.stderr
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["notes.txt", "nv.pt", "tokenizer.json"]
    assert sorted(p.name for p in (tmp_path / "project").iterdir()) == [".git", "config.json"]
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["tokenizer.json"]
    for _ in range(2):  # a new folder, then the model folder it made: replaced whole
        r = run_here("convert", pt, tmp_path / "hf", "--config", cfg)
        assert r.returncode == 0, r.stderr
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(b"")  # HF's other model files are a model folder's too
    r = run_here("convert", pt, tmp_path / "hf", "--config", cfg)
    assert r.returncode == 0 and not (tmp_path / "hf" / "pytorch_model.bin").exists(), r.stderr


def test_convert_refuses_a_dst_that_is_or_holds_the_current_folder(hf_qa_dir, tmp_path, monkeypatch, capsys):
    """'.' cannot be renamed (EBUSY, and an empty ..old- folder was left in it); '' stood for it; by its name from
    inside it, replacing it would delete the current folder (and, named relatively, atomic_dir's renames after the
    first were looked up in the folder moved aside: the model folder was lost)."""
    shutil.copytree(hf_qa_dir, tmp_path / "hf")
    before = sorted(p.name for p in (tmp_path / "hf").iterdir())
    monkeypatch.chdir(tmp_path / "hf")
    # (review) '.' was told "a folder named '.' or '..' cannot be replaced; name the folder itself", which was
    # then refused for holding the current folder.
    for dst, message in ((".", "DST .: it holds the current folder, which replacing it would delete; name a new"),
                         ("..", "DST ..: it holds the current folder"),
                         ("", "DST '': empty"), ("../hf", "DST ../hf: it holds the current folder"),
                         ("new/sub/..", "DST new/sub/..: a folder named '.' or '..' cannot be replaced"),
                         (str(tmp_path), f"DST {tmp_path}: it holds the current folder")):  # fmt: skip
        assert cli.main(["convert", str(hf_qa_dir), dst]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert cli.main(["convert", "", str(tmp_path / "out")]) == 1  # '' is not the current folder either as SRC
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SRC '': empty; name the checkpoint file or folder" in err, err
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_convert_never_replaces_a_folder_it_reads_from(hf_qa_dir, tmp_path, run_here):
    # An HF cache's snapshot links each file to a blob elsewhere: the folder of the link is still read from.
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(hf_qa_dir / name, snapshot / name)
    (snapshot / "model.safetensors").symlink_to(hf_qa_dir / "model.safetensors")
    before = sorted(p.name for p in snapshot.iterdir())
    r = run_here("convert", snapshot / "model.safetensors", snapshot)
    assert r.returncode == 1 and "it holds the config and tokenizer read beside" in r.stderr, r.stderr
    out = tmp_path / "out"
    r = run_here("convert", hf_qa_dir, out)
    assert r.returncode == 0, r.stderr
    written = (out / "config.json").read_text()
    for flag, path in (("--config", out / "config.json"), ("--vocab", out / "tokenizer.json")):
        r = run_here("convert", hf_qa_dir, out, flag, path)
        assert r.returncode == 1 and f"it holds {flag} {path}" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert sorted(p.name for p in snapshot.iterdir()) == before and (snapshot / "model.safetensors").is_symlink()
    assert (out / "config.json").read_text() == written
    # A folder of links to a model folder's files: that folder is read from too.
    links = tmp_path / "links"
    links.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (links / name).symlink_to(out / name)
    names = sorted(os.listdir(out))
    r = run_here("convert", links, out)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert f"{out}: it holds {out / 'config.json'}, read through {links / 'config.json'}" in r.stderr, r.stderr
    assert sorted(os.listdir(out)) == names and all(p.exists() for p in links.iterdir())
    # A link there that is not read (a checkpoints folder's `latest`, leading to an earlier conversion) is no input.
    shutil.copytree(hf_qa_dir, tmp_path / "ckpts")
    (tmp_path / "ckpts" / "latest").symlink_to(out)
    r = run_here("convert", tmp_path / "ckpts", out)
    assert r.returncode == 0 and (tmp_path / "ckpts" / "latest" / "model.safetensors").is_file(), r.stderr
    # A preset name reads no file: a folder of that name (an earlier conversion's) is not an input. (The preset
    # does not fit these weights: refused for that, after the check.)
    shutil.copytree(out, tmp_path / "base")
    r = run_here("convert", hf_qa_dir / "model.safetensors", "base", "--config", "base", cwd=tmp_path)
    assert r.returncode == 1 and "does not match the BERT model of its config" in r.stderr, r.stderr


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused(hf_qa_dir, tmp_path, run_here):
    """Another model's tokenizer would index past the embedding table (an IndexError deep in the model)."""
    from bertqa import QuestionAnswerer

    vocab = hf_qa_dir.parent / "big-vocab"
    load_tokenizer(hf_qa_dir).save(vocab)
    words = (vocab / "vocab.txt").read_text().splitlines()
    (vocab / "vocab.txt").write_text("\n".join(words + [f"extra{i}" for i in range(100)]) + "\n")
    r = run_here("convert", hf_qa_dir, tmp_path / "out", "--vocab", vocab / "vocab.txt")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert f"{vocab / 'vocab.txt'}: the tokenizer has {len(words) + 100:,} tokens, more than the model's" in r.stderr
    folder = tmp_path / "mixed"
    shutil.copytree(hf_qa_dir, folder)
    (folder / "tokenizer.json").unlink()
    shutil.copy(vocab / "vocab.txt", folder / "vocab.txt")
    with pytest.raises(ValueError, match="more than the model's vocabulary"):
        QuestionAnswerer.from_pretrained(folder)


def test_a_saved_config_names_no_dtype_or_labels_of_its_source():
    """(mutation review) transformers loads a model in the dtype config.json names, and sizes qa_outputs by its
    labels: neither is the saved model's."""
    from bertqa.config import DROPPED_ON_SAVE, BertConfig

    source = {"vocab_size": 100, "torch_dtype": "float16", "dtype": "bfloat16", "id2label": {"0": "a"},
              "label2id": {"a": 0}, "num_labels": 1, "_num_labels": 1, "problem_type": "regression", "kept": 1}  # fmt: skip
    saved = BertConfig.from_dict(source).to_dict()
    assert not set(DROPPED_ON_SAVE) & set(saved) and saved["kept"] == 1
    assert set(DROPPED_ON_SAVE) == set(source) - {"vocab_size", "kept"}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"pad_token_id": 1000}, "pad_token_id 1000 is not a token of the 1000-token vocabulary"),
        ({"hidden_dropout_prob": 1.0}, "'hidden_dropout_prob' must be at least 0 and below 1, not 1.0"),
        ({"type_vocab_size": 1}, r"'type_vocab_size' must be at least 2 \(question and context segments\), not 1"),
        ({"model_type": "roberta"}, "model_type 'roberta' is not BERT; bertqa runs BERT-architecture models"),
        ({"is_decoder": True}, r"is_decoder true \(a causal decoder\) is not supported: bertqa runs BERT encoders"),
        ({"add_cross_attention": True}, r"add_cross_attention true \(cross-attention\) is not supported: .*"),
        ({"position_embedding_type": "relative_key"}, "position_embedding_type 'relative_key' is not supported"),
        ({"layer_norm_eps": float("inf")}, "'layer_norm_eps' must be a number >= 0, not Infinity"),  # (mutation review)
        (
            {"hidden_act": "gelu_fast"},
            r"unsupported hidden_act 'gelu_fast'; choose from \['gelu', 'gelu_new', .*'relu'\]",
        ),
    ],
)
def test_config_values_the_model_cannot_take_name_the_file(change, message, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"vocab_size": 1000, "hidden_size": 32, "num_attention_heads": 2, **change}))
    with pytest.raises(ValueError, match=f"^{path}: {message}$"):
        BertConfig.from_json(path)


def test_config_json_numbers_and_nesting_json_takes_but_python_cannot_read_name_the_file(tmp_path):
    """(review) An integer past float's range in a float field passed the check (it compares below inf) and failed
    in torch (an internal error); an integer of more digits than Python converts, or nesting past its recursion
    limit, in any key, failed without naming the file."""
    from bertqa.tokenizer import load_tokenizer

    path = tmp_path / "config.json"
    base = '{"vocab_size": 1000, "hidden_size": 32, "num_attention_heads": 2, '
    for field in ("layer_norm_eps", "initializer_range"):
        path.write_text(base + f'"{field}": 1{"0" * 400}}}')
        with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: '{field}' must be a number >= 0, not 1000"):
            BertConfig.from_json(path)
    for tail, why in (('"notes": 1' + "0" * 5000 + "}", "Exceeds the limit"), ('"x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply")):  # fmt: skip
        path.write_text(base + tail)
        with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: not a JSON config \\({why}"):
            BertConfig.from_json(path)
        (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n")
        (tmp_path / "tokenizer_config.json").write_text("{" + tail)
        with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / 'tokenizer_config.json'))}: not a JSON"):
            load_tokenizer(tmp_path)
    assert BertConfig(layer_norm_eps=10**300).layer_norm_eps == 10**300  # (within float's range: taken)
    # (review) Nested less deeply than the parser refuses, more than Python's recursion takes when written back
    # (convert, train's save, serve's /model): an internal error (RecursionError) there.
    for depth, fails in ((99, False), (600, True)):
        path.write_text(base + '"custom": ' + "[" * depth + "]" * depth + "}")
        if fails:
            with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: nested too deeply \\(more than 100"):
                BertConfig.from_json(path)
        else:
            BertConfig.from_json(path).to_json(tmp_path / "back.json")


def test_a_config_built_in_python_takes_no_dropout_rate_outside_0_to_1():
    """from_json checks the JSON's types first; a BertConfig built in Python took NaN or a negative rate, which
    failed only in training (NaN: "cannot convert float NaN to integer")."""
    for value, shown, message in ((float("nan"), "NaN", "a number >= 0"), (-0.1, "-0.1", "a number >= 0"),
                                  (1.0, "1.0", "at least 0 and below 1")):  # fmt: skip
        with pytest.raises(ValueError, match=rf"^'attention_probs_dropout_prob' must be {message}, not {shown}$"):
            BertConfig(attention_probs_dropout_prob=value)
    # Every field, as config.json's are: a division by zero heads, or a size that fails deep in torch, before.
    for change, message in ((dict(num_attention_heads=0), "'num_attention_heads' must be a positive integer below 2^31, not 0"),
                            (dict(type_vocab_size="2"), "'type_vocab_size' must be a positive integer below 2^31, not \"2\""),
                            (dict(hidden_size=-4, num_attention_heads=2), "'hidden_size' must be a positive integer"),
                            # sizes torch cannot make a tensor of (they failed building the model: "internal error")
                            (dict(vocab_size=2**62), "'vocab_size' must be a positive integer below 2^31, not 4611686018427387904"),
                            (dict(max_position_embeddings=2**63), "'max_position_embeddings' must be a positive integer below 2^31"),
                            (dict(pad_token_id=2**31), "'pad_token_id' must be an integer >= 0 below 2^31, not 2147483648"),
                            (dict(hidden_act=None), "'hidden_act' must be a string, not null")):  # fmt: skip
        with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
            BertConfig(**change)
    # numpy's numbers are numbers (held as Python's, which config.json can take).
    config = BertConfig(
        vocab_size=np.int64(100), hidden_size=16, num_attention_heads=2, layer_norm_eps=np.float32(1e-5)
    )
    assert type(config.vocab_size) is int and type(config.layer_norm_eps) is float
    assert json.loads(json.dumps(config.to_dict()))["vocab_size"] == 100


@pytest.mark.parametrize(
    "dst, refused", [("runs\\model\\", False), ("model\\", False), ("..\\", True), (".\\", True), ("runs\\x\\..", True)]
)
def test_a_dst_with_a_trailing_backslash_names_its_folder_on_windows(monkeypatch, capsys, tmp_path, dst, refused):
    """(review) Only '/' was stripped before the check for '.' and '..': on Windows, a folder named with the
    backslash that tab completion adds (`.\\runs\\model\\`) was refused as a folder named '.' or '..'."""
    from pathlib import PureWindowsPath

    import bertqa.files

    def past_the_check(*args):
        raise ValueError("past the check")

    with monkeypatch.context() as m:  # (paths as on Windows, for the check alone: the run stops right after it)
        m.setattr(cli, "Path", PureWindowsPath)
        m.setattr(bertqa.files, "check_no_link_loop", lambda *args: None)
        m.setattr(bertqa.files, "holds_current_folder", lambda path: False)
        m.setattr(bertqa.files, "check_not_claimed", past_the_check)
        assert cli.main(["convert", str(tmp_path / "nowhere"), dst]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"bertqa: error: DST {dst}: a folder named '.' or '..' cannot be replaced; name the folder itself\n"
        if refused
        else "bertqa: error: past the check\n"
    ), err


def test_a_model_in_a_folder_whose_path_is_not_utf8_loads(tiny_dir, tmp_path):
    """(review) safetensors and tokenizers open UTF-8 paths only: a model folder named with a byte that is not (a
    surrogate escape in Python), as bertqa's own train and convert write one, could not be loaded, and the error
    blamed its files."""
    if sys.platform == "darwin" or os.name == "nt":
        platform_skip("file names here are Unicode: a name's byte cannot be other than UTF-8")
    folder = tmp_path / os.fsdecode(b"m\xff")
    shutil.copytree(tiny_dir, folder)
    model, reference = load_model(folder), load_model(tiny_dir)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    text = ["Who founded the Zebra Club in 1931?"]
    assert [e.ids for e in load_tokenizer(folder).tokenize(text)] == [
        e.ids for e in load_tokenizer(tiny_dir).tokenize(text)
    ]


def test_weights_that_cannot_be_opened_are_named(tiny_dir, monkeypatch):
    """(review) Out of file descriptors (ulimit -n), torch's mapping of a safetensors file failed with a
    RuntimeError, an internal error in place of the file and its reason."""
    import bertqa.checkpoint

    def out_of_descriptors(path, *args, **kwargs):
        raise RuntimeError(f"unable to open file <{path}> in read-only mode: Too many open files (24)")

    monkeypatch.setattr(bertqa.checkpoint, "load_file", out_of_descriptors)
    path = tiny_dir / "model.safetensors"
    with pytest.raises(
        CheckpointError, match=rf"^{re.escape(str(path))}: cannot be read \(unable to open file .*Too many"
    ):
        read_state_dict(path)


def test_a_model_wrapped_in_ddp_and_compile_in_either_order_saves_its_own_weights(tmp_path):
    """(mutation review) DDP(torch.compile(model)) could not be saved: the wrapper under `.module` was tested for
    truth, which torch.compile's passes to the model as len(), which it has not."""

    class DDPLike(torch.nn.Module):  # as DDP holds a model: under `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = BertForQuestionAnswering(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=32))  # fmt: skip
    for i, wrapped in enumerate((DDPLike(torch.compile(model)), torch.compile(DDPLike(model)))):
        out = save_pretrained(wrapped, None, tmp_path / str(i))
        loaded = load_model(out).state_dict()
        assert loaded.keys() == model.state_dict().keys()
        assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_names_and_sizes_that_only_look_like_a_models_are_refused_and_those_that_are_load(hf_qa_dir, tmp_path):
    """(mutation review) TensorFlow's LayerNorm names and saved buffers load; NVIDIA's padding is only up to the next
    multiple of 8; half a QA head is a missing key, not a fresh head; a folder of two .pt files names neither; exactly
    three mis-shaped keys are listed whole; one missing layer is said in one line."""
    cfg = hf_qa_dir / "config.json"
    sd = load_model(hf_qa_dir).state_dict()

    def loads_as_it_was(weights, name):
        torch.save(weights, tmp_path / name)
        loaded = load_model(tmp_path / name, config=cfg).state_dict()
        assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)

    tf = {re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma", re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", k)): v
          for k, v in sd.items()}  # fmt: skip
    assert sum(k.endswith(".beta") for k in tf) == 13
    loads_as_it_was(tf, "tf.pt")
    loads_as_it_was({**sd, "bert.embeddings.position_ids": torch.arange(512)[None],
                     "bert.embeddings.token_type_ids": torch.zeros(1, 512, dtype=torch.long)}, "buffers.pt")  # fmt: skip
    word = "bert.embeddings.word_embeddings.weight"
    padded = torch.cat([sd[word], torch.randn(14, 384)])  # 30536 rows: a multiple of 8, but not the next one
    torch.save({**sd, word: padded}, tmp_path / "more.pt")
    with pytest.raises(CheckpointError, match=r"the weights have vocab 30536.*1 mis-shaped key\(s\): bert\.embeddings"):
        load_model(tmp_path / "more.pt", config=cfg)
    torch.save({k: v for k, v in sd.items() if k != "qa_outputs.bias"}, tmp_path / "half.pt")
    with pytest.raises(CheckpointError, match=r": 1 missing key\(s\): qa_outputs\.bias$"):
        load_model(tmp_path / "half.pt", config=cfg)
    folder = tmp_path / "two"
    folder.mkdir()
    for name in ("ckpt_100.pt", "ckpt_200.pt"):
        torch.save(sd, folder / name)
    shutil.copy(cfg, folder / "bert_config.json")
    with pytest.raises(CheckpointError, match=r"two: no .* in this folder, and not exactly one \.pt/\.pth \(2 found\)"):
        load_model(folder)
    three = ("qa_outputs.bias", "qa_outputs.weight", "bert.embeddings.LayerNorm.bias")
    torch.save({**sd, **{k: torch.zeros(3) for k in three}}, tmp_path / "three.pt")
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "three.pt", config=cfg)
    assert str(e.value).endswith(
        ": 3 mis-shaped key(s): bert.embeddings.LayerNorm.bias: checkpoint (3,) vs model (384,), qa_outputs.bias: "
        "checkpoint (3,) vs model (2,), qa_outputs.weight: checkpoint (3,) vs model (2, 384)"
    )
    config = json.loads(cfg.read_text())
    (tmp_path / "seven.json").write_text(json.dumps({**config, "num_hidden_layers": 7}))
    with pytest.raises(CheckpointError, match=r"\(the weights have layers 6: is this their config\?\): 1 missing "
                                              r"layer\(s\): bert\.encoder\.layer\.6\.\*$"):  # fmt: skip
        load_model(hf_qa_dir, config=tmp_path / "seven.json")
