"""Load and save BERT question-answering weights: HF folders and NVIDIA DeepLearningExamples `.pt` files.

Loading is strict. The QA head is the only thing allowed to be missing (a pretrained encoder gets a fresh
head); weights the QA model has no use for (pooler, pretraining heads, a classifier's head) are dropped with a note;
every other missing, unexpected or mis-shaped key is a one-line error that lists the first of them, grouped by
layer.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import types
import zipfile
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save_file

from .config import BertConfig
from .files import LFS_POINTER, atomic_dir, first_line, first_present, not_a_model_folder, note, utf8_name
from .model import BertForQuestionAnswering
from .runtime import own_rng
from .squad.data import check_bool
from .tokenizer import BertTokenizer

# Key renames from other layouts to ours, applied in order (converters as data).
KEY_RENAMES = [
    # Saved from a model wrapped in DDP (module.), torch.compile (_orig_mod.) or both, in either order.
    (r"^(?:module\.|_orig_mod\.)+", ""),
    (r"^(embeddings|encoder|pooler)\.", r"bert.\1."),  # BertModel weights without the `bert.` prefix
    (r"\.dense_act\.", ".dense."),  # NVIDIA fuses bias+GELU in `LinearActivation` named dense_act
    (r"\.gamma$", ".weight"),  # LayerNorm names of checkpoints converted from TensorFlow
    (r"\.beta$", ".bias"),
]
# Keys present in BERT checkpoints that question answering does not use: dropped with a one-line note.
# (classifier.: the head of a sequence or token classification model, fine-tuned again for QA as transformers does)
UNUSED = re.compile(r"^(bert\.pooler\.|cls\.|classifier\.)")
# Buffers some HF versions save; they are recomputed, not learned.
BUFFERS = re.compile(r"^bert\.embeddings\.(position_ids|token_type_ids)$")
QA_HEAD = {"qa_outputs.weight", "qa_outputs.bias"}
# In transformers' order: a whole model's file, else the index of one sharded over several (save_pretrained's
# max_shard_size: {"weight_map": {weight name: shard file}}).
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
CONFIG_FILES = ("config.json", "bert_config.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message says why and what to do."""


def _rename(key: str) -> str:
    for pattern, repl in KEY_RENAMES:
        key = re.sub(pattern, repl, key)
    return key


def _group(keys) -> list[str]:
    """Collapse `encoder.layer.<i>.` into one line per parameter name, with the layer indices."""
    groups = defaultdict(list)  # (text before the layer index, text after it): layer indices
    for k in keys:
        m = re.match(r"^(.*\.layer\.)(\d+)(\..*)$", k)
        if m:
            groups[m.group(1), m.group(3)].append(int(m.group(2)))
        else:
            groups[k, ""] = []
    lines = []
    for (name, after), layers in sorted(groups.items()):
        if layers:
            layers.sort()
            if len(layers) == 1:
                span = str(layers[0])
            elif layers == list(range(layers[0], layers[-1] + 1)):
                span = f"{layers[0]}-{layers[-1]}"
            else:
                span = ",".join(map(str, layers))
            name += span + after + (f" ({len(layers)} layers)" if len(layers) > 1 else "")
        lines.append(name)
    return lines


# Weights in a folder that bertqa does not read, and what they are (for the error that names them).
OTHER_FORMATS = [
    ("*.ckpt.index", "a TensorFlow checkpoint"),
    ("tf_model.h5", "TensorFlow (Keras) weights"),
    ("flax_model.msgpack", "Flax weights"),
    ("*.index.json", "an index of weights sharded over several files in a format other than safetensors or PyTorch"),
]


# HF's name for one of several shards (model-00001-of-00003.safetensors); "-00001-of-00001" is a whole model.
_SHARD = re.compile(r".+-(\d{5})-of-(\d{5})\.(safetensors|bin)")
SHARD = "one shard of weights sharded over several files"


def _is_shard(name: str) -> bool:
    found = _SHARD.fullmatch(name)
    return found is not None and int(found[2]) > 1


# The index of safetensors or PyTorch weight shards: save_pretrained's, or a variant's (variant="fp16":
# model.safetensors.index.fp16.json, its shards model.fp16-00001-of-00002.safetensors). Group 1: the shards' format.
_INDEX = re.compile(r".+\.(safetensors|bin)\.index(?:\.[^.]+)?\.json")


def _is_index(name: str) -> bool:
    return _INDEX.fullmatch(name) is not None


def _other_format(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}; bertqa reads safetensors or PyTorch weights: load it with transformers "
                           "and save_pretrained it to a new folder first")  # fmt: skip


def _stubbing_pickle(stubbed: list):
    """The pickle module, but for a class of the script that saved the file (its `__main__`), which this process
    lacks: a stand-in whose objects hold nothing, its name added to `stubbed`. NVIDIA's run_pretraining.py keeps its
    data loader (of its own `pretraining_dataset` class) in every checkpoint before the last step, beside the
    weights under "model"."""

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            try:
                return super().find_class(module, name)
            except AttributeError:
                if module != "__main__":
                    raise
                stubbed.append(name)
                ignore = lambda self, *args, **kwargs: None  # noqa: E731
                # (what unpickling calls on an object: to make it, set its state, fill it as a dict or as a list)
                return type(
                    name, (), dict.fromkeys(("__init__", "__setstate__", "__setitem__", "append", "extend"), ignore)
                )

    module = types.ModuleType("pickle")
    module.__dict__.update(vars(pickle))
    module.Unpickler = Unpickler
    return module


def _needs_class(path: Path, name: str) -> CheckpointError:
    return CheckpointError(f"{path}: unpickling it needs the class {name!r} of the script that saved it; save the "
                           "weights alone (a state dict)")  # fmt: skip


def damaged_record(path: Path) -> str | None:
    """The first record of a torch.save archive whose bytes fail their checksum (torch.load reads them unchecked:
    flipped bits load as wrong weights, NaN say), or None: sound, or not such an archive (torch.load tells). A
    record of checksum 0 is not checked: torch writes none where saving was told not to (compute_crc32=False)."""
    try:
        with zipfile.ZipFile(path) as archive:
            for record in archive.infolist():
                if not record.CRC:  # (saved without one)
                    continue
                try:
                    with archive.open(record) as f:
                        while f.read(1 << 24):  # (zipfile compares the checksum at the end)
                            pass
                except zipfile.BadZipFile:
                    return record.filename
    except OSError:
        raise
    except Exception:  # the legacy format, or no archive at all (zipfile's errors vary)
        return None
    return None


def _read_pickle(path: Path, trust_pickle: bool):
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:  # torch.jit.save's archive: code and constants, not a state dict
                infos = z.infolist()
        except zipfile.BadZipFile:  # a damaged archive: torch.load below says so, in the terms below
            infos = []
        if any(i.filename.endswith("/constants.pkl") for i in infos):
            raise CheckpointError(f"{path}: a TorchScript archive (torch.jit.save), not a state dict; save the "
                                  "weights with torch.save(model.state_dict(), ...)")  # fmt: skip
        compressed = next((i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED), None)
        if compressed is not None:  # (inflated in full before torch reads its size: 1000 times the file, a zip bomb)
            raise CheckpointError(f"{path}: compressed record {compressed}; torch.save writes none: not a PyTorch "
                                  "checkpoint")  # fmt: skip
        if (damaged := damaged_record(path)) is not None:
            raise CheckpointError(f"{path}: damaged ({damaged} fails its checksum); copy or download it again")
    stubbed: list[str] = []
    try:
        if not trust_pickle:
            return torch.load(path, map_location="cpu", weights_only=True)
        ckpt = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_stubbing_pickle(stubbed))
        if stubbed and not (isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict)):
            raise _needs_class(path, stubbed[0])
        return ckpt
    except CheckpointError:
        raise
    except OSError as e:
        if e.filename is not None:  # missing, unreadable: the file system's own words
            raise
        # torch's archive reader on a cut file ("Invalid argument", naming nothing: a copy or download cut short)
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint: truncated or corrupt "
                              f"({e.strerror or e})") from None  # fmt: skip
    except Exception as e:  # the unpickler fails in many ways on a file that is not a checkpoint
        # Only a readable pickle that names a Python global is worth unpickling in full; garbage is not.
        if isinstance(e, pickle.UnpicklingError) and "Unsupported global" in str(e):
            raise CheckpointError(
                f"{path}: this checkpoint holds pickled Python objects beyond tensors; loading it can run code. "
                "If you trust its source, pass trust_pickle=True (CLI: --trust-pickle)"
            ) from None
        if isinstance(e, ModuleNotFoundError):  # unpickled in full (trust_pickle), it names what it needs
            raise CheckpointError(f"{path}: unpickling it needs the Python module {e.name!r}, which is not "
                                  "installed here; install it, or save the weights alone (a state dict)") from None  # fmt: skip
        if stubbed:  # a stand-in that could not take what the class held
            raise _needs_class(path, stubbed[0]) from None
        reason = first_line(e)
        if "WeightsUnpickler error:" in str(e):  # the cause alone: torch's preamble advises unpickling in full
            reason = " ".join(str(e).split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0].split())
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint: truncated, corrupt or another kind of file ({reason})"
        ) from None


def read_state_dict(path: str | os.PathLike, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The raw tensors of a weights file (safetensors or pickle), `ckpt["model"]` when wrapped; of every shard, given
    their index (`*.safetensors.index.json`, `*.bin.index.json`)."""
    check_bool(trust_pickle=trust_pickle)  # ("no" would unpickle in full: run the file's code)
    path = Path(path)
    index = _is_index(path.name)
    with open(path, "rb") as f:  # a repository cloned without git-lfs holds a small text stub in its place
        head = f.read(max(len(LFS_POINTER), 9))
        if head.startswith(LFS_POINTER):
            what = "the index; fetch it" if index else "the weights; fetch them"
            raise CheckpointError(f"{path}: a Git LFS pointer, not {what} with `git lfs pull`")
    if index:
        return _read_shards(path, trust_pickle)
    # safetensors under another name: an 8-byte little-endian header length, then the JSON header
    safetensors = head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size
    if path.suffix == ".safetensors" or safetensors:
        try:
            sd = load_file(str(path)) if utf8_name(path) else load(path.read_bytes())  # (load_file: UTF-8 only)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({first_line(e)})") from None
        except RuntimeError as e:  # torch's, mapping the file: "unable to open file <...>: Too many open files (24)"
            if not str(e).startswith(("unable to open file", "unable to mmap")):
                raise
            raise CheckpointError(f"{path}: cannot be read ({first_line(e)})") from None
    else:
        sd = _read_pickle(path, trust_pickle)
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]  # NVIDIA: {"model", "optimizer", "grad_scaler", "epoch", ...}
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                     for k, v in sd.items()):  # fmt: skip
        raise CheckpointError(f"{path}: not a state dict of named tensors (nor a dict with a 'model' state dict)")
    return sd


def _read_shards(index: Path, trust_pickle: bool) -> dict[str, torch.Tensor]:
    """The tensors of a model sharded over several files, by its index: each shard, a file beside the index, must
    hold exactly the weights the index puts in it (a shard of another save, or one cut short, is refused)."""
    try:
        with open(index, "rb") as f:
            data = json.loads(f.read())
    except RecursionError:
        raise CheckpointError(f"{index}: not an index of weight shards (JSON nested too deeply)") from None
    except ValueError as e:  # (invalid JSON or UTF-8)
        raise CheckpointError(f"{index}: not an index of weight shards ({first_line(e)})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not (isinstance(weight_map, dict) and weight_map
            and all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())):  # fmt: skip
        raise CheckpointError(f"{index}: no \"weight_map\" of weight names to shard files; not an index of weight "
                              "shards")  # fmt: skip
    kind = _INDEX.fullmatch(index.name)[1]
    names = defaultdict(set)  # shard file: the weights the index puts in it
    for name, shard in weight_map.items():
        names[shard].add(name)
    for shard, want in names.items():  # (all before the first shard takes seconds to read)
        # As save_pretrained names them: beside the index, in its format (what `convert` checks its output against)
        if Path(shard).name != shard or not shard.endswith(f".{kind}"):
            raise CheckpointError(f"{index}: shard {shard!r} (of {min(want)}) is not a .{kind} file "
                                  "beside the index")  # fmt: skip
    sd = {}
    for shard, want in sorted(names.items()):
        path = first_present(index.parent, [shard])
        if path is None:
            raise CheckpointError(f"{index}: its shard {shard} (of {min(want)}, {len(want)} weights) is not in "
                                  f"{index.parent}: a download or copy not finished?")  # fmt: skip
        part = read_state_dict(path, trust_pickle)
        if part.keys() != want:
            odd = [f"{k} not in it" for k in sorted(want - part.keys())] + [
                f"{k} in it, which the index puts elsewhere" if k in weight_map else f"{k} in it, not in the index"
                for k in sorted(part.keys() - want)
            ]
            raise CheckpointError(f"{path}: not the shard {index.name} names ({len(odd)} weight(s) differ: "
                                  f"{', '.join(odd[:3])}{', ...' if len(odd) > 3 else ''})")  # fmt: skip
        sd.update(part)
    return sd


def _find(path: Path, config) -> tuple[Path, BertConfig]:
    """Resolve (weights file, config) from a folder or a file plus an optional config/path."""
    if path.is_dir():
        weights = first_present(path, WEIGHT_FILES)
        if weights is None:
            pickles = sorted(path.glob("*.pt")) + sorted(path.glob("*.pth"))
            variant = next((f for f in sorted(path.glob("*.json")) if _is_index(f.name)), None)
            if variant is not None:  # (model.safetensors.index.fp16.json, say)
                raise CheckpointError(f"{path}: holds {variant.name}, the index of a variant of the model's weights "
                                      "sharded over several files; name the index file itself")  # fmt: skip
            other = next(((f, what) for pattern, what in OTHER_FORMATS for f in sorted(path.glob(pattern))), None)
            if other is not None and (not pickles or other[0].name.endswith(".index.json")):
                # (a Trainer's folder holds optimizer.pt, scheduler.pt and rng_state.pth beside the model)
                raise _other_format(path, f"holds {other[0].name}, {other[1]}")
            shard = next((f for f in sorted(path.glob("*-of-*")) if _is_shard(f.name)), None)
            if shard is not None:
                raise CheckpointError(f"{path}: holds {shard.name}, {SHARD}, but no index of them "
                                      f"({' or '.join(n for n in WEIGHT_FILES if _is_index(n))})")  # fmt: skip
            if len(pickles) != 1:
                raise CheckpointError(
                    f"{path}: no {' or '.join(WEIGHT_FILES)} in this folder, and not exactly one .pt/.pth "
                    f"({len(pickles)} found); name the weights file itself"
                )
            weights = pickles[0]  # an NVIDIA checkpoint folder: ckpt.pt + bert_config.json + vocab.txt
        folder = path
    elif path.is_file():
        if _is_shard(path.name):
            raise CheckpointError(f"{path}: {SHARD}; name the folder that holds the shards and their index")
        other = next((what for pattern, what in OTHER_FORMATS if path.match(pattern)), None)
        if other is not None and not _is_index(path.name):
            raise _other_format(path, other)
        weights, folder = path, path.parent
    else:
        raise CheckpointError(f"{path}: no such checkpoint file or folder")
    if config is None:
        config = first_present(folder, CONFIG_FILES)
        if config is None:
            raise CheckpointError(
                f"{path}: no {' or '.join(CONFIG_FILES)} beside the weights; pass config= (CLI: --config)"
            )
    if isinstance(config, str) and config in ("base", "large"):
        config = BertConfig.preset(config)
    elif not isinstance(config, BertConfig):
        if os.fspath(config) and Path(config).is_dir():  # (Path("") is the current folder)
            raise CheckpointError(f"config {str(config)!r} (CLI: --config): is a folder; name the config.json in it")
        if not Path(config).is_file():
            raise CheckpointError(f"config {str(config)!r} (CLI: --config): no such file, nor a preset (base, large)")
        config = BertConfig.from_json(config)
    return weights, config


def convert_state_dict(sd: dict, config: BertConfig, expected: dict, source: str = "checkpoint"):
    """Rename `sd` into our keys and check it against `expected` (name -> tensor).

    Returns (state_dict, notes, missing_qa_head). Raises CheckpointError listing every problem.
    """
    out, dropped, named, twice = {}, [], {}, []
    for original, v in sd.items():
        k = _rename(original)
        if BUFFERS.match(k):
            continue
        if UNUSED.match(k):
            dropped.append(k)
            continue
        if k in out:  # two names for one weight (`gamma` and `weight`, a `module.` prefix and none): which one?
            twice.append(f"{named[k]} and {original} (both {k})")
        out[k], named[k] = v, original
    notes = []
    word = "bert.embeddings.word_embeddings.weight"
    if word in out and word in expected and out[word].dim() == 2:
        rows, want = out[word].shape[0], expected[word].shape[0]
        # NVIDIA pads the vocabulary to a multiple of 8 rows for tensor cores (30522 -> 30528).
        if rows > want and rows == -(-want // 8) * 8:
            out[word] = out[word][:want]
            notes.append(f"word embedding padded to {rows} rows, sliced back to the vocabulary's {want}")
    if dropped:
        prefixes = sorted({".".join(k.split(".")[: 1 if k.startswith("classifier.") else 2]) for k in dropped})
        notes.append(f"dropped {len(dropped)} weights question answering does not use ({', '.join(prefixes)})")
    missing = sorted(set(expected) - set(out))
    unexpected = sorted(set(out) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(out[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(out) & set(expected)
        if out[k].shape != expected[k].shape
    )
    # Right shapes, but no weights: integers or booleans (cast, they would load as other numbers), or meta tensors
    # (a model built without memory): shapes and no data.
    kinds = sorted(
        f"{k}: {'meta tensor, no data' if v.is_meta else str(v.dtype).removeprefix('torch.')}"
        for k, v in out.items()
        if k in expected and (v.is_meta or not v.is_floating_point())
    )
    missing_head = QA_HEAD.issubset(missing)
    if missing_head:
        missing = [k for k in missing if k not in QA_HEAD]
    if not set(out) & set(expected):
        shown = ", ".join(sorted(sd)[:3]) + (", ..." if len(sd) > 3 else "")
        raise CheckpointError(f"{source}: not a BERT checkpoint: none of its {len(sd)} tensors ({shown}) is a "
                              "BERT weight; is it another kind of model?")  # fmt: skip
    problems = []
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes),
                        ("non-float", kinds), ("doubled", twice)):  # fmt: skip
        if keys:
            lines, first = (_group(keys), 10) if title in ("missing", "unexpected") else (keys, 3)  # (long lines)
            shown = ", ".join(lines[:first]) + (f", ... and {len(lines) - first} more" if len(lines) > first else "")
            problems.append(f"{len(keys)} {title} key(s): {shown}")
    if problems:
        size = {"layers": config.num_hidden_layers, "hidden": config.hidden_size, "vocab": config.vocab_size}
        found = _size_of(out)
        differ = [f"{name} {found[name]}" for name in size if name in found and found[name] != size[name]]
        hint = f" (the weights have {', '.join(differ)}: is this their config?)" if differ else ""
        raise CheckpointError(
            f"{source} does not match the BERT model of its config "
            f"({size['layers']} layers, hidden {size['hidden']}, vocab {size['vocab']}){hint}: " + "; ".join(problems)
        )
    return out, notes, missing_head


def _size_of(sd: dict) -> dict:
    """The layers, hidden size and vocabulary that the tensors themselves show (those they show)."""
    found = {}
    layers = [int(m.group(1)) for k in sd if (m := re.match(r"^bert\.encoder\.layer\.(\d+)\.", k))]
    if layers:
        found["layers"] = max(layers) + 1
    word = sd.get("bert.embeddings.word_embeddings.weight")
    if word is not None and word.dim() == 2:
        found["vocab"], found["hidden"] = word.shape
    return found


def _check_layers(sd: dict, config: BertConfig, source) -> None:
    """Weights of fewer layers than their config: said before a model of the config's layers is built to list what
    is missing (a config.json of 10^6 layers beside 2 layers' weights took hours and gigabytes to be refused)."""
    have, want = _size_of({_rename(k): v for k, v in sd.items()}).get("layers"), config.num_hidden_layers
    if have is not None and have < want:
        span = f"{have}" if want - have == 1 else f"{have}-{want - 1}"
        raise CheckpointError(
            f"{source} does not match the BERT model of its config ({want} layers, hidden {config.hidden_size}, vocab "
            f"{config.vocab_size}) (the weights have layers {have}: is this their config?): {want - have} missing "
            f"layer(s): bert.encoder.layer.{span}.*"
        )


def load_model(
    path: str | os.PathLike,
    config: BertConfig | str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    trust_pickle: bool = False,
    attn_implementation: str = "auto",
    verbose: bool = True,
    require_qa_head: bool = False,
) -> BertForQuestionAnswering:
    """Load a `BertForQuestionAnswering` from an HF folder, a safetensors/bin file, the index of such files' shards or
    an NVIDIA `.pt`.

    `config` is a BertConfig, a path to a config.json, or a preset name; by default the `config.json` or
    `bert_config.json` beside the weights. A checkpoint without a QA head gets a fresh one (to fine-tune),
    unless `require_qa_head` (to answer questions: a random head would answer nonsense). The model comes in
    eval mode (no dropout), as transformers' `from_pretrained` returns it: call `.train()` to fine-tune it.
    """
    from .distributed import api_device

    if not os.fspath(path):  # Path("") is the current folder: a model there would load unasked
        raise CheckpointError("model path '': empty; name the checkpoint file or folder")
    check_bool(trust_pickle=trust_pickle, verbose=verbose, require_qa_head=require_qa_head)
    device = api_device(device)  # before the weights take seconds to load
    weights, config = _find(Path(path), config)
    sd = read_state_dict(weights, trust_pickle)
    _check_layers(sd, config, weights)
    with torch.device("meta"):
        expected = BertForQuestionAnswering(config, attn_implementation).state_dict()
    sd, notes, missing_head = convert_state_dict(sd, config, expected, source=str(weights))
    if missing_head and require_qa_head:
        raise CheckpointError(
            f"{weights}: no fine-tuned question-answering head (qa_outputs.*) in this checkpoint; it is a "
            "pretrained encoder: fine-tune it first (bertqa train) and use the model folder that writes"
        )
    with own_rng(torch.device("cpu")):  # (its initial weights, all but a fresh QA head's replaced next)
        model = BertForQuestionAnswering(config, attn_implementation)
    model.fresh_qa_head = missing_head  # the checkpoint had no QA head: qa_outputs is freshly initialised
    if missing_head:
        notes.append("no QA head in the checkpoint: qa_outputs initialised fresh (expected for a pretrained encoder)")
    stored = sorted({str(v.dtype).removeprefix("torch.") for v in sd.values()} - {"float32"})
    if stored:  # (load_state_dict copies them into the model's fp32 parameters)
        notes.append(f"weights stored in {', '.join(stored)}, loaded in float32 (--precision sets the arithmetic)")
    model.load_state_dict(sd, strict=not missing_head)
    if missing_head:  # (what save_pretrained compares with: a head still this one was never trained)
        model.fresh_qa_head_state = {k: v.detach().clone() for k, v in model.qa_outputs.state_dict().items()}
    model.load_notes = [f"{weights.name}: {line}" for line in notes]
    if verbose:
        print_load_notes(model)
    return model.to(device).eval()


def print_load_notes(model) -> None:
    """What load_model noted of the checkpoint it read (weights renamed or dropped, a fresh QA head): printed by
    the caller once the load is final, where a load may be run again (files.read_one_version)."""
    for line in model.load_notes:
        note(f"bertqa: {line}")


def _unwrap(model: torch.nn.Module) -> BertForQuestionAnswering:
    """The plain model under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        # (not `or`: torch.compile's wrapper passes len() to the model, which has none, so it has no truth value)
        inner = getattr(model, "module", None)
        model = inner if inner is not None else model._orig_mod
    return model


def check_save_target(directory: str | os.PathLike) -> None:
    """Refuse a `directory` that save_pretrained may not replace whole: one that exists and is neither empty nor a
    model folder (files.not_a_model_folder)."""
    why = not_a_model_folder(Path(directory)) if Path(directory).exists() else None
    if why:
        raise CheckpointError(f"{directory}: exists and is not a model folder ({why}), and saving replaces the whole "
                              "folder; name a new folder")  # fmt: skip
    if Path(directory).is_dir() and not os.access(directory, os.W_OK | os.X_OK):  # (moving it aside writes in it)
        raise CheckpointError(f"{directory}: cannot be replaced: it is not writable here")


def _untrained_head(model: BertForQuestionAnswering) -> bool:
    """Whether the QA head is still the random one load_model gave a checkpoint without one."""
    fresh = getattr(model, "fresh_qa_head_state", None)
    # (in the model's dtype now: .half() rounds the head as it rounds the copy; torch.equal of two dtypes is False)
    return fresh is not None and all(torch.equal(v.detach().cpu(), fresh[k].to(v.dtype))
                                     for k, v in model.qa_outputs.state_dict().items())  # fmt: skip


def save_pretrained(model, tokenizer, directory: str | os.PathLike, extra_files: dict[str, str] | None = None,
                    with_qa_head: bool | None = None, replaced=None):  # fmt: skip
    """Write an HF folder (config.json, model.safetensors, tokenizer files, `extra_files` name -> text)
    that `transformers.BertForQuestionAnswering.from_pretrained` loads. Written to a temporary sibling, flushed to
    disk and renamed into place, so an existing folder is replaced whole or not at all, even by a power loss.
    `with_qa_head=False` leaves qa_outputs out of the weights (a pretrained encoder's: loaders then know it has no
    fine-tuned head); by default it is left out only where it is still the random head load_model gave a checkpoint
    without one (saved, it passed for a fine-tuned head: `ask` and `serve` answered with it). An existing `directory` must be empty or a model folder (files.not_a_model_folder): one
    holding anything else is refused, not replaced. `replaced()`, if given, runs once the folder is in place, before
    a Ctrl-C or SIGTERM that came while it was swapped in is delivered (files.atomic_dir)."""
    model = _unwrap(model)
    if not isinstance(model, BertForQuestionAnswering):  # (transformers' own: save it with its save_pretrained)
        raise TypeError(
            f"model must be bertqa's BertForQuestionAnswering (bertqa.load_model), not {type(model).__name__}"
        )
    if tokenizer is not None and not isinstance(tokenizer, BertTokenizer):
        raise TypeError(f"tokenizer must be bertqa's BertTokenizer (bertqa.load_tokenizer) or None, not "
                        f"{type(tokenizer).__name__}")  # fmt: skip
    if not isinstance(extra_files or {}, dict):
        raise TypeError(f"extra_files must be a dict of file name -> text, not {type(extra_files).__name__}")
    for name, text in (extra_files or {}).items():  # (a name with a path in it wrote outside the folder)
        if (
            not (isinstance(name, str) and isinstance(text, str))
            or name in ("", ".", "..")
            or name != os.path.basename(name)
        ):
            raise ValueError(f"extra_files[{name!r}]: a file name in the folder (no path) and its text are needed")
    if with_qa_head is None:
        with_qa_head = not _untrained_head(model)
    check_bool(with_qa_head=with_qa_head)
    check_save_target(directory)
    with atomic_dir(directory, durable=True, replaced=replaced) as tmp:
        model.config.to_json(tmp / "config.json")
        sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()
              if with_qa_head or not k.startswith("qa_outputs.")}  # fmt: skip
        try:
            save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        except SafetensorError as e:  # a failed write (a full disk: "... I/O error: ... (os error 28)")
            code = re.search(r"\(os error (\d+)\)", str(e))
            name = Path(directory) / "model.safetensors"
            if code:
                raise OSError(int(code[1]), os.strerror(int(code[1])), str(name)) from None
            raise OSError(f"{name}: cannot write the weights ({first_line(e)})") from None
        if tokenizer is not None:
            tokenizer.save(tmp, model.config.max_position_embeddings)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return Path(directory)
