"""SQuAD v1.1 / v2.0: read and validate, featurise into windows, post-process logits, score officially.

Pure Python + numpy (no torch), so everything between a SQuAD file and EM/F1 is testable on its own.
"""

from bertqa.squad.data import Example, SquadFormatError, is_squad_v2, read_squad
from bertqa.squad.download import download_squad
from bertqa.squad.features import Features, featurize, load_features
from bertqa.squad.metrics import evaluate_v1, evaluate_v2, normalize_answer, score_files
from bertqa.squad.postprocess import postprocess, write_predictions

__all__ = [
    "Example",
    "Features",
    "SquadFormatError",
    "download_squad",
    "evaluate_v1",
    "evaluate_v2",
    "featurize",
    "is_squad_v2",
    "load_features",
    "normalize_answer",
    "postprocess",
    "read_squad",
    "score_files",
    "write_predictions",
]
