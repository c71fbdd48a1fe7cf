"""bertqa: fine-tune BERT for SQuAD question answering on any PyTorch device."""

__version__ = "0.1.0"
