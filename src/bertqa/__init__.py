"""bertqa: fine-tune BERT for SQuAD question answering on any PyTorch device."""

__version__ = "0.1.0"

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
