"""BertConfig: the architecture, read from and written to HuggingFace `config.json`."""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Precisions every command takes. Here, not in runtime.py, so that building the CLI never imports torch.
PRECISIONS = ("auto", "fp32", "tf32", "bf16", "fp16")
# --attention: auto, then the kernels of model.ATTENTION (kept here so that the CLI need not import torch)
ATTENTION_CHOICES = ("auto", "sdpa", "eager", "blocked")
# Whether fine-tuning applies the config's attention-probability dropout (hidden dropout always applies). Off:
# without it MiniLM trains 1.27x faster on a CPU (1.8x before the blocked attention applied the dropout itself) and
# scored F1 65.44 on dev-a.json against 64.35 with it, on the same machine (README, Accuracy).
ATTENTION_DROPOUT = False


# Source config.json keys not written back (see to_dict).
DROPPED_ON_SAVE = ("torch_dtype", "dtype", "id2label", "label2id", "num_labels", "_num_labels", "problem_type")


def plain(value):
    """A numpy scalar or a path as the command line would give it (an int, float, bool or str): what JSON takes."""
    if isinstance(value, np.generic):
        return value.item()
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def plain_copy(cfg):
    """A copy of the dataclass `cfg` with each field made plain: a run's config goes to JSON (run_config.json,
    checkpoints, bench's last line), its learning rate into torch's weights-only checkpoints, its flags through
    `is True`, none of which take numpy's; the caller's object stays as it was."""
    return dataclasses.replace(cfg, **{f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)})


@dataclass
class BertConfig:
    vocab_size: int = 30522  # uncased WordPiece vocabulary of Google's BERT release
    hidden_size: int = 768  # width of every token vector
    num_hidden_layers: int = 12  # transformer blocks
    num_attention_heads: int = 12  # heads per block; hidden_size must divide by it
    intermediate_size: int = 3072  # feed-forward width
    hidden_act: str = "gelu"  # erf form (HF, Google, NVIDIA's bias_gelu); "gelu_new", "gelu_pytorch_tanh": tanh
    hidden_dropout_prob: float = 0.1  # dropout after embeddings, attention output and feed-forward
    attention_probs_dropout_prob: float = 0.1  # dropout on attention probabilities
    max_position_embeddings: int = 512  # longest sequence the position table covers
    type_vocab_size: int = 2  # segment ids (question = 0, context = 1)
    layer_norm_eps: float = 1e-12  # as in Google's BERT
    initializer_range: float = 0.02  # std of the normal init of fresh weights (the QA head)
    pad_token_id: int = 0
    # Keys of the source config.json we do not model but write back unchanged.
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        for f in dataclasses.fields(self):  # a BertConfig made in Python is checked as one read from config.json
            if f.name != "extra":
                setattr(self, f.name, _check_value(f.name, getattr(self, f.name), f.default))
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        if self.pad_token_id is not None and self.pad_token_id >= self.vocab_size:
            raise ValueError(
                f"pad_token_id {self.pad_token_id} is not a token of the {self.vocab_size}-token vocabulary"
            )
        if self.type_vocab_size < 2:
            raise ValueError(f"'type_vocab_size' must be at least 2 (question and context segments), not "
                             f"{self.type_vocab_size}")  # fmt: skip
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; choose from {sorted(ACTIVATIONS)}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0 <= getattr(self, name) < 1:  # (NaN too)
                raise ValueError(f"'{name}' must be at least 0 and below 1, not {getattr(self, name)}")

    @classmethod
    def preset(cls, name: str) -> BertConfig:
        """`base` or `large`: the BERT paper's sizes, as in the seed recipe's table."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_dict(cls, d: dict) -> BertConfig:
        if _deeper_than(d, MAX_CONFIG_DEPTH):  # (writing it back, and serve's /model, recurse: Python's limit)
            raise ValueError(f"nested too deeply (more than {MAX_CONFIG_DEPTH} levels)")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        if extra.get("model_type", "bert") != "bert":  # NVIDIA's bert_config.json has none
            raise ValueError(f"model_type {extra['model_type']!r} is not BERT; bertqa runs BERT-architecture models")
        if extra.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"position_embedding_type {extra['position_embedding_type']!r} is not supported")
        for flag, what in (("is_decoder", "a causal decoder"), ("add_cross_attention", "cross-attention")):
            if extra.get(flag):  # transformers then masks future tokens / adds layers; bertqa's encoder has neither
                raise ValueError(
                    f"{flag} {json.dumps(extra[flag])} ({what}) is not supported: bertqa runs BERT encoders"
                )
        return cls(**known, extra=extra)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> BertConfig:
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:  # (ValueError: also an integer of more digits than Python reads)
            raise ValueError(f"{path}: not a JSON config ({str(e).splitlines()[0][:200]})") from None
        except RecursionError:
            raise ValueError(f"{path}: not a JSON config (nested too deeply)") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: a config must be a JSON object")
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def settings(self) -> dict:
        """The fields bertqa reads and checks, without config.json's other entries (`extra`)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}

    def to_dict(self) -> dict:
        d = self.settings()
        # The source's weight dtype is not carried: load_model makes every weight fp32, and transformers loads a model
        # in the dtype its config.json names ("auto", its default, reads it there first; else the weights' own).
        # Nor are its labels: transformers sizes qa_outputs by num_labels (len(id2label)), and bertqa's has 2.
        extra = {k: v for k, v in self.extra.items() if k not in DROPPED_ON_SAVE}
        return {**extra, **d, "model_type": "bert", "architectures": ["BertForQuestionAnswering"]}

    def to_json(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")


MAX_CONFIG_DEPTH = 100  # levels of objects and arrays in a config (transformers' own nest two or three)


def _deeper_than(value, limit: int) -> bool:
    todo = [(value, 1)]
    while todo:
        value, depth = todo.pop()
        if isinstance(value, (dict, list)):
            if depth > limit:
                return True
            todo.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return False


def check_seq_len(length: int, max_positions: int, name: str) -> None:
    """Refuse windows longer than the model's position table (`name`: the flag or parameter that set them)."""
    if length > max_positions:
        raise ValueError(f"{name} {length} exceeds the model's {max_positions} position embeddings")


def _check_value(name: str, value, default):
    """A config value of the kind its field takes (a typo in config.json is one line, not a crash in the model),
    returned as a Python int or float where it is another kind of number (numpy's, say: config.json takes no other)."""
    if isinstance(default, str):
        kind, ok = "a string", isinstance(value, str)
    elif isinstance(default, int):
        # pad_token_id may be 0 (or null: no padding row); every size is at least 1, and below 2^31 (torch takes no
        # larger size of a tensor's dimension than 2^63, and no model needs one near 2^31).
        kind = ("an integer >= 0" if name == "pad_token_id" else "a positive integer") + " below 2^31"
        ok = (value is None and name == "pad_token_id") or (
            isinstance(value, numbers.Integral)
            and not isinstance(value, bool)
            and (name != "pad_token_id") <= value < 2**31
        )
        value = int(value) if ok and value is not None else value
    else:
        kind = "a number >= 0"
        try:  # (an integer past float's range, 10**400, compares below inf: torch's conversion then overflowed)
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 <= float(value) < float("inf")
        except OverflowError:
            ok = False
        value = float(value) if ok and not isinstance(value, (int, float)) else value
    if not ok:
        raise ValueError(f"'{name}' must be {kind}, not {json.dumps(value, default=repr)[:40]}")
    return value


# The hidden_act names the model runs (model.ACTIVATIONS gives each its function): transformers' names, so that a
# saved config.json loads there too.
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")

PRESETS = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
