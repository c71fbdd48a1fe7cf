"""The `evaluate` and `predict` commands: a SQuAD file -> windows -> logits (sharded over ranks) -> n-best
predictions, scored with the official metrics (`evaluate`) or not (`predict`, for files without answers).

Training calls into this module for its final evaluation; nothing here imports the training code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checkpoint import load_model, print_load_notes
from .config import check_seq_len, plain_copy
from .distributed import Dist, all_gather_objects, barrier, checked, distributed, fail_together, is_rank_zero
from .files import (
    check_not_claimed,
    check_output,
    check_output_dir,
    exclusive,
    files_beside,
    not_a_file,
    note,
    path_key,
    read_one_version,
    write_json,
)
from .inference import default_batch_size, predict_logits, shard
from .model import auto_attention_in_words
from .runtime import Precision
from .squad.data import is_squad_v2, load_json, parse_squad
from .squad.features import check_finite, check_positive, check_window_params, load_features
from .squad.metrics import evaluate_v1, evaluate_v2
from .squad.postprocess import PREDICTION_FILES, postprocess, write_prediction_files, write_predictions
from .tokenizer import check_vocabulary, load_tokenizer


def default_cache_dir() -> str | None:
    """$XDG_CACHE_HOME/bertqa/features, else ~/.cache/bertqa/features; None (no cache) without a home folder."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # unset, empty or relative: the XDG spec's default (not the current folder)
        base = "" if os.environ.get("HOME") == "" else os.path.expanduser("~/.cache")  # ("" would be /.cache)
    if not os.path.isabs(base):  # HOME unset for a user with no passwd entry (`docker run --user N`), empty or
        return None  # relative: a folder named "~" in the current one, the root's, or wherever the command runs
    return os.path.join(base, "bertqa", "features")


@dataclass(kw_only=True)
class EvalConfig:
    model: str  # anything load_model reads
    predict_file: str  # SQuAD JSON to evaluate on
    output_dir: str  # predictions, summary.json
    batch_size: int | None = None  # per device, for inference; None: inference.default_batch_size
    precision: str = "auto"  # auto | fp32 | tf32 | bf16 | fp16
    device: str | None = None  # default: the accelerator if present, else cpu
    max_seq_length: int = 384  # NVIDIA/Google SQuAD defaults
    doc_stride: int = 128
    max_query_length: int = 64
    n_best_size: int = 20
    max_answer_length: int = 30
    version_2_with_negative: bool | None = None  # None: detect from the data
    null_score_diff_threshold: float = 0.0
    cache_dir: str | None = dataclasses.field(default_factory=default_cache_dir)  # features cache; None = off
    attention: str = "auto"  # auto | sdpa | eager | blocked (model.auto_attention)
    config: str | None = None  # config.json for weights without one beside them, or a preset (base, large)
    lower_case: bool | None = None  # None: as the tokenizer files (or config, or vocabulary) say
    trust_pickle: bool = False  # allow full unpickling of a checkpoint (can run code)
    progress: bool = True  # progress bars on rank 0

    # Fields whose command-line flag is not their name with dashes.
    FLAGS = {}
    POSITIVE = ("batch_size", "n_best_size", "max_answer_length")
    WRITES = ("summary.json", *PREDICTION_FILES)  # the files a run writes in output_dir (or removes there)
    OUTPUT_DIR = True  # output_dir is used (predict writes --output instead)

    def flag(self, name: str) -> str:
        return self.FLAGS.get(name, "--" + name.replace("_", "-"))

    def validate(self) -> None:
        """One-line errors for bad values and files, before anything is loaded or written."""
        self.check_values()
        self.check_files()

    def check_values(self) -> None:
        """The checks of the values alone: alike on every rank of a run (check_files' may fail on one machine)."""
        self.check_types()
        if not os.fspath(self.model).strip():  # Path("") is the current folder: a model there would load unasked
            raise ValueError("--model '': empty; name the checkpoint file or folder")
        # (Path("") is the current folder; the CLI refuses it first, with a usage error's exit status 2)
        if self.cache_dir is not None and not os.fspath(self.cache_dir).strip():
            raise ValueError("--cache-dir '': empty; name a folder, or None for no features cache")
        for name in self.POSITIVE:
            value = getattr(self, name)
            if value is None and name in ("batch_size", "max_steps", "max_train_examples"):
                continue
            check_positive(**{self.flag(name): value})
        check_window_params(self.max_seq_length, self.doc_stride, self.max_query_length, flags=True)
        check_finite(**{self.flag("null_score_diff_threshold"): self.null_score_diff_threshold})

    def check_files(self) -> None:
        """The checks of the files and folders a run reads and writes (what one machine sees)."""
        for name in ("train_file", "predict_file"):
            path = getattr(self, name, None)
            if path is not None and not Path(path).is_file():  # "" too: a flag given nothing, not the current folder
                raise not_a_file(f"{self.flag(name)} {path or repr(path)}", path)
        if not Path(self.model).exists():
            raise FileNotFoundError(f"--model {self.model}: no such file or folder")
        # Only rank 0 writes there (torchrun ranks on other machines may have no such folder); predict writes
        # --output instead.
        if self.OUTPUT_DIR and is_rank_zero():
            check_output_dir(self.output_dir, writes=self.WRITES, inputs=self.inputs())
            self.check_cache_outside([Path(self.output_dir) / name for name in self.WRITES])

    def check_types(self) -> None:
        """Each field of the type it is declared with (the Python API takes anything): "no" would be a true flag,
        "3" a seed that fails deep inside torch, 1.5 a checkpoint interval. Paths may be os.PathLike, floats ints,
        and numpy scalars pass (a run works on config.plain_copy's copy)."""
        for field in dataclasses.fields(self):
            value, kinds = getattr(self, field.name), field.type.replace(" ", "").split("|")
            if value is None and "None" in kinds:
                continue
            number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
                value, (bool, np.bool_)
            )
            fits = {"str": isinstance(value, (str, os.PathLike)), "bool": isinstance(value, (bool, np.bool_)),
                    "int": number and isinstance(value, (int, np.integer)), "float": number}  # fmt: skip
            if not any(fits.get(kind, False) for kind in kinds):
                names = {"str": ["a string"], "bool": ["True", "False"], "int": ["an integer"], "float": ["a number"]}
                words = [word for kind in kinds for word in names.get(kind, [kind])]
                expected = " or ".join([", ".join(words[:-1]), words[-1]] if len(words) > 1 else words)
                raise ValueError(f"{self.flag(field.name)} must be {expected}, got {value!r}")

    def check_cache_outside(self, outputs) -> None:
        """The features cached inside what the run writes (train's model/, predict's output file) would stop its
        write, after the work."""
        cache = self.cache_dir and path_key(self.cache_dir)  # (neither may exist yet)
        for output in outputs if cache else ():
            if path_key(output) in (cache, *cache.parents):
                raise ValueError(f"--cache-dir {self.cache_dir}: lies in {output}, which this run writes; name another "
                                 "folder")  # fmt: skip

    def inputs(self) -> dict:
        """The run's input files, by flag: what it must not write over."""
        files = {self.flag(name): getattr(self, name, None) for name in ("model", "train_file", "predict_file")}
        if self.config and Path(self.config).is_file():  # (else a preset's name)
            files[self.flag("config")] = self.config
        return files


@dataclass(kw_only=True)
class PredictConfig(EvalConfig):
    """`bertqa predict`: the evaluation path without scoring, for files that may carry no answers."""

    predict_file: str  # the SQuAD JSON to answer (--input)
    output_dir: str = ""  # unused
    output: str  # predictions JSON; n-best and null odds beside it
    FLAGS = {"predict_file": "--input"}
    OUTPUT_DIR = False


def load_examples_and_features(path, tokenizer, cfg, is_training: bool, d: Dist, limit=None,
                               require_answers: bool = True):  # fmt: skip
    """Read and featurise a SQuAD file; rank 0 builds the cache first, the other ranks then read it.
    Returns (parsed JSON, examples, features). A failure on any rank is raised on every rank as `rank R: ...`"""
    params = dict(max_seq_length=cfg.max_seq_length, doc_stride=cfg.doc_stride,
                  max_query_length=cfg.max_query_length, is_training=is_training)  # fmt: skip
    features = None
    # Each fail_together ends in a gather that is also the barrier: the cache is written before it is read.
    with fail_together(d):
        doc = load_json(path)
        examples = parse_squad(doc, path, is_training=is_training, require_answers=require_answers,
                               v2=cfg.version_2_with_negative is True)  # fmt: skip
        if limit:
            examples = examples[:limit]
        if not examples:
            raise ValueError(f"{path}: no usable questions")
        if d.is_main:
            features = load_features(examples, tokenizer, cfg.cache_dir, **params)
    with fail_together(d):
        if not d.is_main:
            features = load_features(examples, tokenizer, cfg.cache_dir, **params)
    return doc, examples, features


def score(doc: dict, preds: dict, null_odds: dict | None, v2: bool = False) -> dict:
    """Official EM/F1 of the predictions as written; on v2.0 data (or with `v2`, whatever the file says) also
    the HasAns/NoAns breakdown and, from the null odds, the best thresholds (`best_*`), as the official script
    reports them."""
    if not (v2 or is_squad_v2(doc)):
        return evaluate_v1(doc["data"], preds)
    scores = dict(evaluate_v2(doc["data"], preds))
    if null_odds is not None:
        best = evaluate_v2(doc["data"], preds, null_odds)
        scores.update({k: v for k, v in best.items() if k.startswith("best_")})
    return {"exact_match": scores["exact"], **scores}


def run_inference(model, data, cfg: EvalConfig, d: Dist, precision: Precision):
    """Logits of every window of `data` (from load_examples_and_features), sharded over the ranks; rank 0
    gathers and post-processes. Returns (predictions, nbest, null_odds, timing) on rank 0, None elsewhere."""
    doc, examples, features = data
    v2 = cfg.version_2_with_negative
    if v2 is None:
        v2 = is_squad_v2(doc)
    if not v2 and cfg.null_score_diff_threshold != 0 and d.is_main:  # (as `bertqa score` says of its threshold)
        why = ("--no-version-2-with-negative" if cfg.version_2_with_negative is False
               else "no 'version' 2.x, no is_impossible question; --version-2-with-negative reads it as v2.0")  # fmt: skip
        logging.getLogger("bertqa").warning("%s is read as SQuAD v1.1 (%s): --null-score-diff-threshold is not used",
                                            cfg.predict_file, why)  # fmt: skip
    mine = shard(len(features), d.rank, d.world_size)
    barrier(d)
    t0 = time.perf_counter()
    progress = cfg.progress and d.is_main
    with fail_together(d):  # NaN logits on one rank stop every rank (the agreement is also the barrier)
        batch_size = default_batch_size(d.device) if cfg.batch_size is None else cfg.batch_size
        start, end = predict_logits(model, features, mine, batch_size, d.device, precision.autocast(), progress)
    infer_time = time.perf_counter() - t0
    parts = all_gather_objects(d, (start, end))
    with fail_together(d):  # rank 0 post-processes while the others wait for it: a failure there stops them too
        if not d.is_main:
            return None
        start = np.concatenate([p[0] for p in parts])
        end = np.concatenate([p[1] for p in parts])
        preds, nbest, null_odds = postprocess(
            examples, features, start, end, cfg.n_best_size, cfg.max_answer_length, v2, cfg.null_score_diff_threshold
        )
    timing = {"e2e_inference_time": infer_time, "inference_sequences_per_second": len(features) / infer_time,
              "eval_features": len(features)}  # fmt: skip
    return preds, nbest, null_odds, timing


def run_evaluation(model, data, cfg: EvalConfig, d: Dist, precision: Precision, out_dir: Path | None) -> dict:
    """Predict and score `data`; rank 0 writes the predictions into `out_dir`. Returns the metrics on every
    rank."""
    result = {}
    out = run_inference(model, data, cfg, d, precision)
    with fail_together(d):  # rank 0 scores and writes while the others wait: a failure there stops them too
        if out is not None:
            preds, nbest, null_odds, timing = out
            if out_dir is not None:  # before scoring: a scoring error does not lose the inference's predictions
                # An earlier summary.json goes when the new predictions land (once they are written: a failure
                # before leaves the earlier set and its summary whole), and the new one is written last (by
                # `finish`): where it is, the predictions beside it are its run's.
                write_predictions(out_dir, preds, nbest, null_odds, remove=[out_dir / "summary.json"])
            result = {**timing, **score(data[0], preds, null_odds, cfg.version_2_with_negative is True)}
    return all_gather_objects(d, result)[0]


def load_tokenizer_and_model(cfg: EvalConfig, d: Dist, for_inference: bool = True):
    """Tokenizer and model, checked against the window length before anything is written. For inference the
    checkpoint must hold a fine-tuned QA head."""

    def load():
        tokenizer = load_tokenizer(cfg.model, do_lower_case=cfg.lower_case)  # first: it fails faster than the weights
        model = load_model(cfg.model, config=cfg.config, device=d.device, trust_pickle=cfg.trust_pickle,
                           attn_implementation=cfg.attention, verbose=False, require_qa_head=for_inference)  # fmt: skip
        return tokenizer, model

    tokenizer, model = read_one_version(cfg.model, load)
    if d.is_main:
        print_load_notes(model)
    check_vocabulary(tokenizer, model.config, cfg.model)
    check_seq_len(cfg.max_seq_length, model.config.max_position_embeddings, "--max-seq-length")
    return tokenizer, model


def startup_line(d: Dist, precision: Precision, attention: str, compiled: bool = False) -> str:
    described = {
        "sdpa": "sdpa (flash/memory-efficient kernels where the device has them)",
        "auto": f"auto ({auto_attention_in_words(d.device, compiled)})",
    }
    attention = described.get(attention, attention)
    return (
        f"bertqa: device {d.device}, precision {precision.describe()}, attention {attention}, world size {d.world_size}"
    )


def finish(summary: dict, out_dir: Path) -> dict:
    """Write summary.json; print a readable line, then the summary as stdout's last line."""
    write_json(out_dir / "summary.json", summary)
    parts = [f"{k} {summary[k]:.2f}" for k in ("exact_match", "f1") if k in summary]
    for key, name in (("training_sequences_per_second", "training"), ("inference_sequences_per_second", "inference")):
        if key in summary:
            parts.append(f"{name} {summary[key]:.1f} seq/s")
    if summary.get("final_loss") is not None:
        parts.append(f"final loss {summary['final_loss']:.4f}")
    note("bertqa: " + ", ".join(parts))
    print(json.dumps(summary), flush=True)
    return summary


@contextmanager
def _prepared(cfg: EvalConfig, require_answers: bool = True, claim: Path | None = None,
              failure: Exception | None = None):  # fmt: skip
    """Everything evaluate and predict share: the process group, the precision in force, the model and the
    windows of cfg.predict_file. Yields (dist, precision, model, data). With `claim`, rank 0 holds that output
    folder while the run writes there, so that a second run on it stops (every rank with it): at once where the
    folder is there already, else once the inputs are read (bad input must not leave a folder behind). `failure`:
    that of the checks before (`checked`), raised on every rank once they have met."""
    with distributed(cfg.device, failure=failure) as d, ExitStack() as held:
        early = claim is not None and claim.is_dir()  # (rank 0's view decides: only rank 0 holds it)
        if claim is not None:
            with fail_together(d):
                if early and d.is_main:
                    held.enter_context(exclusive(claim, clear=cfg.WRITES))
        precision = Precision.resolve(cfg.precision, d.device)
        with precision.scope():
            tokenizer, model = load_tokenizer_and_model(cfg, d)
            data = load_examples_and_features(cfg.predict_file, tokenizer, cfg, False, d,
                                              require_answers=require_answers)  # fmt: skip
            if claim is not None:
                with fail_together(d):
                    if not early and d.is_main:
                        held.enter_context(exclusive(claim, clear=cfg.WRITES))
            if d.is_main:
                note(startup_line(d, precision, cfg.attention))
            yield d, precision, model, data


def evaluate(cfg: EvalConfig) -> dict:
    cfg.check_values()  # (alike on every rank: at once)
    failure = checked(cfg.check_files)
    cfg = cfg if failure is not None else plain_copy(cfg)
    out_dir = Path(cfg.output_dir)
    with _prepared(cfg, claim=out_dir, failure=failure) as (d, precision, model, data):
        summary = run_evaluation(model, data, cfg, d, precision, out_dir if d.is_main else None)
        if d.is_main:
            finish(summary, out_dir)
        return summary


def _predict_checks(cfg: PredictConfig) -> tuple:
    """predict's checks of files before any work: (the plain config, the output, the folder it lands in, its
    files)."""
    cfg.check_files()
    cfg = plain_copy(cfg)
    # Only rank 0 writes it (torchrun ranks on other machines may have no such folder).
    beside = (".nbest.json", ".null_odds.json")
    output = check_output(cfg.output, ".json", beside=beside, inputs=cfg.inputs()) if is_rank_zero() else None
    # (where the files land: beside a link's target)
    folder = Path(os.path.realpath(output)).parent if output is not None else None
    paths = [output, *files_beside(output, beside)] if output else []
    if folder is not None:
        check_not_claimed(folder, f"--output {cfg.output}")
        cfg.check_cache_outside(paths)
    return cfg, output, folder, paths


def predict(cfg: PredictConfig) -> dict:
    """Write predictions (and n-best, and for v2.0 null odds) for every question of cfg.predict_file, scoring
    nothing. The n-best and null odds go beside the output: PRED.json -> PRED.nbest.json, PRED.null_odds.json."""
    cfg.check_values()  # (alike on every rank: at once)
    checks = []
    failure = checked(lambda: checks.append(_predict_checks(cfg)))
    cfg, output, folder, paths = checks[0] if checks else (cfg, None, None, [])
    with _prepared(cfg, require_answers=False, failure=failure) as (d, precision, model, data):
        out = run_inference(model, data, cfg, d, precision)
    if out is None:
        return {}
    preds, nbest, null_odds, timing = out
    if folder is not None:
        check_not_claimed(folder, f"--output {cfg.output}")  # (one may have started meanwhile)
    # One set, the file asked for landing last: an interrupted run never leaves it without its n-best beside it.
    write_prediction_files(paths, preds, nbest, null_odds)
    summary = {**timing, "questions": len(preds), "predictions": str(output)}
    note(f"bertqa: {len(preds)} predictions -> {output} ({timing['inference_sequences_per_second']:.1f} windows/s)")
    print(json.dumps(summary), flush=True)
    return summary
