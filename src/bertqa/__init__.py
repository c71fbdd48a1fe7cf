"""bertqa: fine-tune BERT for SQuAD question answering on any PyTorch device."""

import os

__version__ = "0.1.0"

# oneDNN, and PyTorch's ideep layer above it, each keep up to 1,024 compiled CPU kernels, one per GEMM shape.
# Every batch of a new length adds a step's worth of them, so CPU training's resident memory grew by about
# 10 MB a step (6.9 GB by the end of a 376-step run) for no speed: a step reuses its own shapes across layers,
# rarely the last step's. 64 holds a step's shapes. Read at first use, so setting them here is early enough;
# values already in the environment win.
for _cache in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    os.environ.setdefault(_cache, "64")

# Resolved on first use, so that `import bertqa.squad` (pure Python + numpy) does not import torch.
_EXPORTS = {
    "load_model": "checkpoint",
    "save_pretrained": "checkpoint",
    "CheckpointError": "checkpoint",
    "load_tokenizer": "tokenizer",
    "BertConfig": "config",
    "BertForQuestionAnswering": "model",
    "BertModel": "model",
    "QuestionAnswerer": "qa",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'bertqa' has no attribute {name!r}")
