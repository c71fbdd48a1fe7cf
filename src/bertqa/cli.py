"""The `bertqa` command (also `python -m bertqa`, hence `torchrun -m bertqa`)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import traceback
from pathlib import Path

from .config import ATTENTION_CHOICES, ATTENTION_DROPOUT, PRECISIONS
from .files import one_line, show_names_of, soft_limit


def usable_cpus() -> int:
    """The CPUs this process may run on: under taskset, a container's cpuset or a batch scheduler's allocation,
    fewer than the machine's (os.cpu_count()); more threads than these only wait for each other."""
    if hasattr(os, "process_cpu_count"):  # (Python 3.13)
        return os.process_cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


class UsageError(ValueError):
    """A bad command-line value, reported as one line."""


def cmd_convert(args):
    from .checkpoint import check_save_target, load_model, print_load_notes, save_pretrained
    from .files import check_no_link_loop, check_not_claimed, holds_current_folder, note, read_one_version, real_path
    from .tokenizer import load_tokenizer

    if not args.src:  # Path("") is the current folder
        raise UsageError("SRC '': empty; name the checkpoint file or folder")
    if not args.dst:
        raise UsageError("DST '': empty; name the folder to write the model in")
    src, dst = Path(args.src), Path(args.dst)
    check_no_link_loop(dst, f"DST {args.dst}")
    if holds_current_folder(dst):  # ('.' and '..' too: said so, since naming them otherwise is refused here too)
        raise UsageError(f"DST {args.dst}: it holds the current folder, which replacing it would delete; name a new "
                         "folder or run from another")  # fmt: skip
    if dst.name in ("", ".."):  # rename() refuses these (EBUSY, EINVAL); "x/." is read as "x"
        raise UsageError(f"DST {args.dst}: a folder named '.' or '..' cannot be replaced; name the folder itself")
    check_not_claimed(dst, f"DST {args.dst}")  # (a train's model/: it replaces the folder at its end)
    # The output folder is replaced whole: never one that is or holds an input (the checkpoint, the folder a
    # checkpoint file's config and tokenizer are read from, even where the file is a link to elsewhere, as in an HF
    # cache, --config, --vocab), nor a folder that is not a model's.
    config = None if args.config in ("base", "large") else args.config  # a preset reads no file (load_model's rule)
    inputs = {str(src): src, f"--config {args.config}": config, f"--vocab {args.vocab}": args.vocab}
    if src.exists() and not src.is_dir():
        inputs[f"the config and tokenizer read beside {src}"] = src.absolute().parent
    # The files read from a folder (weights, config, tokenizer) may be links to elsewhere (an HF cache's snapshot, a
    # folder of links). (glob finds nothing in a folder that may be opened but not listed: its files are read by name.)
    read_from = [
        Path(p) for p in (src if src.is_dir() else src.absolute().parent, args.vocab) if p and Path(p).is_dir()
    ]
    read = [f for d in read_from for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.json", "*.txt")
            for f in d.glob(pattern)]  # fmt: skip
    for link in sorted({f for f in read if f.is_symlink() and f.is_file()}):
        inputs[f"{os.path.realpath(link)}, read through {link}"] = link
    for what, given in inputs.items():
        real = real_path(given) if given and Path(given).exists() else None
        if real is not None and real_path(dst) in (real, *real.parents):
            raise UsageError(f"{dst}: it holds {what}, and converting replaces the whole folder; name a new folder")
    check_save_target(dst)  # before the model takes seconds to load
    if args.vocab is not None and not args.vocab.strip():
        raise UsageError("--vocab '': empty; name the vocabulary file or tokenizer folder, or leave the flag out")
    if args.vocab and not Path(args.vocab).exists():  # before the model takes seconds to load
        raise UsageError(f"--vocab {args.vocab}: no such file or folder")
    tok_source = args.vocab or src

    def load():
        model = load_model(src, config=args.config, trust_pickle=args.trust_pickle, verbose=False)
        try:
            return model, load_tokenizer(tok_source, do_lower_case=args.lower_case, config=model.config)
        except FileNotFoundError as e:
            if args.vocab:
                raise UsageError(f"--vocab {e}") from None
            raise UsageError(f"{tok_source}: no tokenizer.json or vocab.txt; pass --vocab PATH") from None

    model, tokenizer = read_one_version(src, load)
    print_load_notes(model)
    # A pretrained encoder's fresh QA head is random: saved, it would pass for a fine-tuned one.
    out = save_pretrained(model, tokenizer, dst, with_qa_head=not model.fresh_qa_head)
    head = "" if not model.fresh_qa_head else "; no QA head: fine-tune it (bertqa train) before asking it questions"
    written = sum(p.numel() for name, p in model.named_parameters()
                  if not (model.fresh_qa_head and name.startswith("qa_outputs.")))  # fmt: skip
    note(f"bertqa: wrote {out} ({written:,} parameters in float32{head})")


def cmd_score(args):
    from .squad.metrics import score_files

    for flag, path in (
        ("DATA", args.data_file),
        ("PREDICTIONS", args.pred_file),
        ("--na-prob-file", args.na_prob_file),
    ):
        if path is not None and not path.strip():
            raise UsageError(f"{flag} '': empty; name the JSON file")
    if not math.isfinite(args.na_prob_thresh):
        raise UsageError(f"--na-prob-thresh must be a finite number, got {args.na_prob_thresh}")
    result = score_files(args.data_file, args.pred_file, args.na_prob_file, args.version_2_with_negative,
                         args.na_prob_thresh)  # fmt: skip
    # As the official scripts print it: v1.1's on one line, v2.0's (which has "total") indented.
    print(json.dumps(result, indent=2 if "total" in result else None))


def cmd_download(args):
    from .files import note
    from .squad.data import download_squad

    for path in download_squad(args.version, args.dir):
        note(f"bertqa: {path}")


def _config(cls, args, renames=None):
    """A config dataclass from the parsed flags; a flag left unset keeps the dataclass default."""
    import dataclasses

    renames = renames or {}
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {renames.get(k, k): v for k, v in vars(args).items()}
    values = {k: v for k, v in values.items() if k in fields and v is not None}
    if values.get("cache_dir") == "none":
        values["cache_dir"] = None
    elif values.get("cache_dir", "x").strip() == "":  # Path("") would be the current folder
        raise UsageError("--cache-dir '': empty; name a folder, or none for no features cache")
    return cls(**values)


def cmd_train(args):
    from .train import TrainConfig, train

    train(_config(TrainConfig, args, {"batch_size": "train_batch_size", "eval_batch_size": "batch_size"}))


def cmd_evaluate(args):
    from .evaluate import EvalConfig, evaluate

    evaluate(_config(EvalConfig, args))


def cmd_predict(args):
    from .evaluate import PredictConfig, predict

    predict(_config(PredictConfig, args, {"input": "predict_file"}))


def cmd_bench(args):
    from .bench import BenchConfig, bench

    bench(_config(BenchConfig, args))


def _check_model_flag(args) -> None:
    """--model '' named as the flag it is, before anything loads (serve binds its port first)."""
    if not args.model:
        raise UsageError("--model '': empty; name the checkpoint file or folder")


def cmd_export(args):
    from .export import export_onnx

    _check_model_flag(args)

    export_onnx(args.model, args.output, int8=args.int8, check_file=args.check_file,
                max_seq_length=args.max_seq_length, doc_stride=args.doc_stride, max_query_length=args.max_query_length,
                opset=args.opset, trust_pickle=args.trust_pickle, config=args.config)  # fmt: skip


def cmd_serve(args):
    _check_model_flag(args)
    if not 0 <= args.port <= 65535:  # before the imports, which take seconds
        raise UsageError(f"--port {args.port}: must be between 0 and 65535")
    if not args.host.strip():
        raise UsageError(f"--host {args.host!r}: empty; name an address (127.0.0.1, or 0.0.0.0 for every interface)")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be a positive integer, got {args.threads}")
    if args.threads is not None and args.threads > usable_cpus():  # (torch's own error named no flag)
        raise UsageError(f"--threads {args.threads}: more than the CPUs this process may use ({usable_cpus()})")
    try:
        import uvicorn.protocols.http.auto  # noqa: F401  (serve() imports it, and h11, after loading: missing, said now)

        from .serve import serve
    except ModuleNotFoundError as e:  # (another module's failure, a broken torch say, is its own)
        if not _from_serve_extra(e):
            raise
        raise UsageError(f"serve needs starlette and uvicorn: pip install 'bertqa[serve]' ({e})") from None

    logging.getLogger("bertqa.squad").setLevel(logging.WARNING)  # no featurisation note per request
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    serve(args.model, host=args.host, port=args.port, max_batch_size=args.max_batch_size,
          max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, timeout_s=args.timeout,
          max_body_bytes=args.max_body_bytes, max_context_chars=args.max_context_chars,
          device=args.device, precision=args.precision, config=args.config,
          trust_pickle=args.trust_pickle)  # fmt: skip


# What ends a line or a column for str.splitlines and a tab-separated reader; and the line ends json.dumps leaves.
_LINE_ENDS_JSON_KEEPS = re.compile("[\x85\u2028\u2029]")
_LINE_OR_COLUMN_BREAKS = re.compile(r"[\t\n\v\f\r\x1c-\x1e\x85\u2028\u2029]+")


def _format_answers(result, as_json: bool) -> str:
    """One line a question: the answers separated by tabs, each with every line break or tab in it (a span across
    a wrapped line), and the whitespace around it, shown as one space (none at either end); the rest of the text
    as it is. JSON keeps the exact text and its offsets."""
    if as_json:  # U+0085, U+2028, U+2029 escaped too: JSON allows them raw, but str.splitlines ends a line there
        return _LINE_ENDS_JSON_KEEPS.sub(lambda m: f"\\u{ord(m[0]):04x}", json.dumps(result, ensure_ascii=False))
    answers = result if isinstance(result, list) else [result]
    return "\t".join(_one_line(a["answer"]) for a in answers)


def _one_line(text: str) -> str:
    pieces = (piece.strip() for piece in _LINE_OR_COLUMN_BREAKS.split(text))
    return " ".join(piece for piece in pieces if piece)


def _from_serve_extra(e: ModuleNotFoundError) -> bool:
    """Whether starlette or uvicorn is missing, or a module they import (anyio, say: the extra's reinstall mends it)."""
    names, tb = {e.name or ""}, e.__traceback__
    while tb is not None:
        names.add(tb.tb_frame.f_globals.get("__name__", ""))
        tb = tb.tb_next
    return any(name.partition(".")[0] in ("starlette", "uvicorn") for name in names)


# The API's window parameters, in window_settings' order, and ask's (args name, flag) for each: evaluate's flags.
ASK_WINDOW_FLAGS = {"max_seq_len": ("max_seq_length", "--max-seq-length"), "doc_stride": ("doc_stride", "--doc-stride"),
                    "max_question_len": ("max_query_length", "--max-query-length")}  # fmt: skip


def cmd_ask(args):
    from .qa import QuestionAnswerer, window_settings
    from .squad.data import blank, unpaired_surrogate

    _check_model_flag(args)
    if (args.context is None) == (args.context_file is None):
        raise UsageError("give the text with exactly one of --context or --context-file")
    for flag, value in (("--top-k", args.top_k), ("--max-answer-length", args.max_answer_length),
                        *((flag, getattr(args, name)) for name, flag in ASK_WINDOW_FLAGS.values())):  # fmt: skip
        if value is not None and value < 1:  # checked before the model takes seconds to load
            raise UsageError(f"{flag} must be a positive integer, got {value}")
    if args.context_file is not None:  # "" too: named below as no such file, not taken as no file given
        try:
            with open(args.context_file, encoding="utf-8", newline="") as f:  # "\r\n" kept: offsets index the file
                args.context = f.read()
        except UnicodeDecodeError as e:
            raise UsageError(f"--context-file {args.context_file}: not UTF-8 text (byte {e.start})") from None
        except OSError as e:
            raise UsageError(f"--context-file {args.context_file}: {e.strerror}") from None
    # Blank text, named by where it came from, before the model takes seconds to load.
    given = {
        "--question": args.question,
        "--context": args.context if args.context_file is None else None,
        f"--context-file {args.context_file}": args.context if args.context_file is not None else None,
    }
    for flag, text in given.items():
        # (a question of invisible characters alone asks nothing; such a context is answered: with nothing)
        if text is not None and (blank(text) if flag == "--question" else not text.strip()):
            raise UsageError(f"{flag}: empty" + (" (only white space or invisible characters)" if text else ""))
        if text is not None and (at := unpaired_surrogate(text)) is not None:  # a byte the locale could not decode
            raise UsageError(f"{flag}: not UTF-8 text (character {at + 1})")
    if args.question is None and sys.stdin is None:  # started with stdin closed (`<&-`)
        raise UsageError("no --question and no stdin to read questions from (one question per line)")
    logging.getLogger("bertqa.squad").setLevel(logging.WARNING)  # no featurisation notes between answers
    from .distributed import api_device

    device = api_device(args.device, flag="--device")  # (as from_pretrained reads it, named as the flag it is)
    qa = QuestionAnswerer.from_pretrained(args.model, device=device, precision=args.precision,
                                          config=args.config, trust_pickle=args.trust_pickle)  # fmt: skip
    params = dict(top_k=args.top_k, handle_impossible_answer=args.handle_impossible_answer,
                  max_answer_len=args.max_answer_length, align_to_words=args.align_to_words)  # fmt: skip
    try:  # the API's defaults and checks (against the model's positions), its names the flags'
        window = window_settings(*(getattr(args, name) for name, _ in ASK_WINDOW_FLAGS.values()),
                                 qa.config.max_position_embeddings)  # fmt: skip
    except ValueError as e:
        message = str(e)
        for parameter, (_, flag) in ASK_WINDOW_FLAGS.items():
            message = re.sub(rf"\b{parameter}\b", flag, message)
        raise UsageError(message) from None
    params.update(zip(ASK_WINDOW_FLAGS, window))
    if args.question is not None:
        print(_format_answers(qa(args.question, args.context, **params), args.json), flush=True)
        return
    stdin = _utf8_stdin()
    if sys.stdin.isatty():  # typed questions: answer each as it comes
        n = 0
        try:
            for n, line in enumerate(stdin, 1):
                line = line.decode("utf-8", "surrogateescape") if isinstance(line, bytes) else line
                if unpaired_surrogate(line) is not None:
                    raise UsageError(f"stdin line {n}: not UTF-8 text")
                if not blank(line):
                    print(_format_answers(qa(line.strip(), args.context, **params), args.json), flush=True)
        except UnicodeDecodeError:  # (a terminal gives a line at a time: the line after the last one read)
            raise UsageError(f"stdin line {n + 1}: not UTF-8 text") from None
        return
    try:
        text = stdin.read()
        text = text.decode("utf-8", "surrogateescape") if isinstance(text, bytes) else text
    except UnicodeDecodeError:
        raise UsageError("stdin: not UTF-8 text") from None
    # Lines end at "\n", "\r\n" or "\r" (stdin is read untranslated), not at the other characters
    # str.splitlines breaks at (U+2028, form feed, ...): those would add answer lines.
    questions = [line.strip() for line in re.split(r"\r\n|\r|\n", text)]
    while questions and not questions[-1]:  # blank lines at the end (an editor's) ask nothing
        questions.pop()
    for n, q in enumerate(questions, 1):
        if not q:
            raise UsageError(f"stdin line {n}: empty question (one question per line, one answer line each)")
        if unpaired_surrogate(q) is not None:  # what undecodable bytes become under Python's surrogateescape
            raise UsageError(f"stdin line {n}: not UTF-8 text")
        if blank(q):
            raise UsageError(f"stdin line {n}: empty question (only invisible characters)")
    if not questions:
        raise UsageError("no --question and nothing on stdin (one question per line)")
    # One batch: the context is tokenised once and the windows of all questions share forward passes.
    for result in qa(questions, args.context, **params):
        print(_format_answers(result, args.json))


def _utf8_stdin():
    """stdin's bytes where its text is UTF-8 (decoded by the caller, undecodable bytes kept as surrogates, so that
    the line holding one is named: a strict decoder fails on a whole block of lines), else its text."""
    import codecs

    buffer = getattr(sys.stdin, "buffer", None)
    encoding = getattr(sys.stdin, "encoding", None)
    if buffer is not None and encoding and codecs.lookup(encoding).name == "utf-8":
        return buffer
    return sys.stdin


def _add_common(p, batch_help, output_dir: bool = True):
    p.add_argument("--model", required=True, help="HF folder, .safetensors/.bin, or NVIDIA .pt checkpoint")
    _add_checkpoint_options(p)
    if output_dir:
        p.add_argument("--output-dir", required=True)
    p.add_argument("--batch-size", type=int, help=batch_help)
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto (bf16 where the device has native bf16, else tf32 on NVIDIA GPUs, else fp32), fp32, tf32 (TF32 "
        "matmuls), bf16 or fp16 (autocast; fp16 with a gradient scaler)",
    )
    p.add_argument("--device", help="any torch device (cuda, cuda:1, cpu, xpu, mps, ...); default: the accelerator")
    p.add_argument("--max-seq-length", type=int, default=384)
    p.add_argument("--doc-stride", type=int, default=128)
    p.add_argument("--max-query-length", type=int, default=64)
    p.add_argument("--n-best-size", type=int, default=20)
    p.add_argument("--max-answer-length", type=int, default=30)
    p.add_argument(
        "--version-2-with-negative",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="SQuAD v2.0 null answers (default: detected from the data)",
    )
    p.add_argument("--null-score-diff-threshold", type=float, default=0.0)
    p.add_argument("--cache-dir", help="features cache (default $XDG_CACHE_HOME/bertqa/features, else "
                   "~/.cache/bertqa/features; 'none' disables it)")  # fmt: skip
    p.add_argument(
        "--attention",
        choices=ATTENTION_CHOICES,
        default="auto",
        help="auto: blocked (written out, a few heads at a time) on a CPU, except sdpa for fp32 inference, for bf16 "
        "inference on a CPU with AMX and for training under --compile; sdpa (fused kernels) on other devices",
    )
    _add_lower_case(p)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _add_checkpoint_options(p):
    p.add_argument("--config", help="config.json (or bert_config.json) for weights that have none beside them, or a "
                   "preset (base, large)")  # fmt: skip
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow full unpickling of the checkpoint (can run code: only for checkpoints you "
                   "trust)")  # fmt: skip


def _add_lower_case(p):
    p.add_argument(
        "--lower-case",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="lower-case the input (default: as the tokenizer files or config say, else cased if the vocabulary "
        "has capitals)",
    )


class Parser(argparse.ArgumentParser):
    """Usage errors as one line (the full usage stays in --help). Every command takes --debug, before or after
    its name."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # "-1e-3" is a value, not a flag (Python before 3.12 took only "-5", "-1.5" and "-.5" for numbers).
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
        # SUPPRESS: only a parser that sees --debug sets it; a subcommand's default would overwrite the top level's.
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="on an error, also print its traceback (or set BERTQA_DEBUG=1)")  # fmt: skip

    def error(self, message):  # "bertqa: error: ..." as every other error, then where the usage is
        self.exit(2, f"bertqa: error: {one_line(message)} (see {self.prog} --help)\n")

    def _print_message(self, message, file=None):
        # argparse drops a write that fails (--help to a full disk then exits 0): main() is told instead
        if message:
            try:
                (file or sys.stderr).write(message)
            except AttributeError:  # (no stderr either)
                pass


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="bertqa", description="Fine-tune and evaluate BERT on SQuAD.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    p.commands = sub.choices  # name -> its parser

    t = sub.add_parser("train", help="fine-tune on SQuAD (torchrun -m bertqa train ... for several devices)")
    _add_common(t, "training batch per device and micro-step (default 8)")
    t.add_argument("--train-file", required=True)
    t.add_argument("--predict-file", help="evaluate on this SQuAD file after training")
    t.add_argument("--max-train-examples", type=int, help="use only the first N training questions")
    t.add_argument("--epochs", type=float, default=2.0)
    t.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    t.add_argument(
        "--eval-batch-size", type=int, help="inference batch per device (default 128 on a CUDA GPU, else 32)"
    )
    t.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    t.add_argument("--lr", type=float, default=5e-5)
    t.add_argument("--warmup", type=float, default=0.1, help="proportion of steps warming up")
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--max-grad-norm", type=float, default=1.0)
    t.add_argument(
        "--group-by-length",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="batch windows of similar length together (default; less padding, same windows per epoch)",
    )
    t.add_argument(
        "--attention-dropout",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="apply the config's attention-probability dropout (default: %s)" % ("on" if ATTENTION_DROPOUT else "off"),
    )
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--save-every", type=int, default=0, help="steps between resumable checkpoints")
    t.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pt")
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--tensorboard", action="store_true", help="log scalars to OUTPUT_DIR/tensorboard")
    t.add_argument("--compile", action="store_true", help="torch.compile the training step (minutes to compile once)")
    t.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic kernels only, so that a GPU run repeats bit for bit (slower; CPU runs always do)",
    )
    t.add_argument(
        "--max-nonfinite-steps",
        type=int,
        default=20,
        help="stop after this many updates in a row skipped for a non-finite loss or gradients (default 20; with fp16 "
        "the loss scaler's own skips count too)",
    )
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="predict and score a SQuAD file")
    _add_common(e, "inference batch per device (default 128 on a CUDA GPU, else 32)")
    e.add_argument("--predict-file", required=True)
    e.set_defaults(func=cmd_evaluate)

    c = sub.add_parser("convert", help="convert any recognised checkpoint into an HF folder")
    c.add_argument("src", help="HF folder, .safetensors/.bin file, or NVIDIA DeepLearningExamples .pt")
    c.add_argument("dst", help="output folder (config.json, model.safetensors, tokenizer files)")
    _add_checkpoint_options(c)
    c.add_argument("--vocab", help="vocab.txt or tokenizer.json (default: beside the checkpoint)")
    _add_lower_case(c)
    c.set_defaults(func=cmd_convert)

    s = sub.add_parser("score", help="official SQuAD v1.1 / v2.0 EM and F1 of a predictions file")
    s.add_argument("data_file")
    s.add_argument("pred_file")
    s.add_argument("--na-prob-file", help="v2.0: no-answer probabilities (null_odds.json)")
    s.add_argument("--na-prob-thresh", type=float, default=1.0,
                   help="v2.0: a question whose no-answer probability is above it counts as unanswered (default "
                        "1.0; without --na-prob-file every probability is 0), as in the official script")  # fmt: skip
    s.add_argument("--version-2-with-negative", action="store_true",
                   help="score as SQuAD v2.0 (no answers: unanswerable) whatever the file says")  # fmt: skip
    s.set_defaults(func=cmd_score)

    pr = sub.add_parser("predict", help="predictions (n-best, null odds) for a SQuAD file, answers not needed")
    _add_common(pr, "inference batch per device (default 128 on a CUDA GPU, else 32)", output_dir=False)
    pr.add_argument("--input", required=True, help="SQuAD v1.1 / v2.0 JSON; answers may be absent")
    pr.add_argument(
        "--output", required=True, help="predictions JSON; PRED.nbest.json (and PRED.null_odds.json) beside"
    )
    pr.set_defaults(func=cmd_predict)

    a = sub.add_parser("ask", help="answer questions about a text with a fine-tuned model")
    a.add_argument("--model", required=True)
    _add_checkpoint_options(a)
    a.add_argument("--question", help="the question (default: read questions from stdin, one per line)")
    a.add_argument("--context", help="the text to find the answer in")
    a.add_argument("--context-file", help="read the text from this file instead")
    a.add_argument("--top-k", type=int, default=1, help="the K best distinct answers")
    a.add_argument("--max-answer-length", type=int, default=30, help="longest answer, in tokens")
    a.add_argument("--handle-impossible-answer", action="store_true", help="allow 'no answer' (SQuAD v2.0 models)")
    a.add_argument("--align-to-words", action=argparse.BooleanOptionalAction, default=True,
                   help="widen an answer that starts or ends inside a word to whole words (default, as the "
                   "API and the server do); --no-align-to-words: the spans predict and evaluate write")  # fmt: skip
    a.add_argument("--max-seq-length", type=int, help="window length in tokens (default: the model's, up to 384)")
    a.add_argument("--doc-stride", type=int, help="step between windows (default: half a window, up to 128)")
    a.add_argument("--max-query-length", type=int, help="question tokens kept (default 64, or half a short window)")
    a.add_argument("--device", help="default: the accelerator if present")
    a.add_argument("--precision", choices=PRECISIONS, default="auto")
    a.add_argument("--json", action="store_true", help="print each result as JSON: answer, score, start, end")
    a.set_defaults(func=cmd_ask)

    v = sub.add_parser("serve", help="an HTTP service (HF Inference API compatible) and a page to try the model")
    v.add_argument("--model", required=True, help="a fine-tuned checkpoint")
    _add_checkpoint_options(v)
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    v.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    v.add_argument(
        "--max-batch-size",
        type=int,
        default=16,
        help="questions of concurrent requests merged into one model call (a larger request runs alone)",
    )
    v.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a request waits for others to batch with")
    v.add_argument("--max-queue", type=int, default=256, help="questions waiting at most; beyond, 503 + Retry-After")
    v.add_argument("--timeout", type=float, default=30.0, help="seconds before a request gets 504")
    v.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    v.add_argument("--max-context-chars", type=int, default=100_000, help="longer contexts get 413")
    v.add_argument("--device", help="default: the accelerator if present")
    v.add_argument("--precision", choices=PRECISIONS, default="auto")
    v.add_argument("--threads", type=int, help="CPU threads for the model (default: torch's, one per core)")
    v.set_defaults(func=cmd_serve)

    b = sub.add_parser("bench", help="training / inference throughput, side by side with transformers")
    b.add_argument("--model", help="checkpoint to benchmark (HF folder, .safetensors/.bin, NVIDIA .pt)")
    _add_checkpoint_options(b)
    b.add_argument("--preset", help="or a randomly initialised BERT: base or large")
    b.add_argument("--mode", default="train", help="train (forward, backward, AdamW step) or infer")
    b.add_argument("--data", help="SQuAD JSON for real windows (default: random full-length windows)")
    b.add_argument("--tokenizer", help="tokenizer for --data (default: the one beside --model; needed with --preset)")
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--seq-len", type=int, default=384)
    b.add_argument("--precision", choices=PRECISIONS, default="auto")
    b.add_argument(
        "--steps", type=int, default=10, help="timed steps per segment (every segment times the same batches)"
    )
    b.add_argument(
        "--seconds", type=float, help="make each segment whole passes over those batches, this long at least"
    )
    b.add_argument("--segments", type=int, default=3, help="timed segments per row, taken in turns (figures: medians)")
    b.add_argument("--warmup", type=int, default=3,
                   help="untimed steps per row first (on a GPU, or with --compile: one pass over the timed batches "
                        "at least, as their first call at a new length builds kernels there)")  # fmt: skip
    b.add_argument("--compile", action="store_true", help="torch.compile bertqa's model")
    b.add_argument("--device", help="default: the accelerator if present")
    b.add_argument("--compare", help="hf: also time transformers as run_qa.py runs it and at its best")
    b.add_argument(
        "--attention-dropout",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train with the config's attention dropout (default: as bertqa train does)",
    )
    b.add_argument(
        "--hf-attention-dropout",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train the HF rows with the config's attention dropout, as transformers does (default: yes)",
    )
    b.set_defaults(func=cmd_bench)

    x = sub.add_parser("export", help="export a fine-tuned model for other runtimes")
    xs = x.add_subparsers(dest="format", required=True, parser_class=Parser)
    x.formats = xs.choices  # name -> its parser
    o = xs.add_parser("onnx", help="ONNX graph (dynamic batch and length), checked against PyTorch with onnxruntime")
    o.add_argument("--model", required=True, help="a fine-tuned checkpoint")
    o.add_argument("--output", required=True, help="FILE.onnx (written atomically)")
    o.add_argument("--int8", action="store_true", help="dynamically quantised int8 weights (smaller, faster on CPU)")
    o.add_argument("--check-file", help="SQuAD JSON whose windows the parity check runs on (default: built-in text)")
    o.add_argument("--max-seq-length", type=int, default=384)
    o.add_argument("--doc-stride", type=int, default=128)
    o.add_argument("--max-query-length", type=int, default=64)
    o.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    _add_checkpoint_options(o)
    o.set_defaults(func=cmd_export)

    d = sub.add_parser("download", help="download a dataset with checksum verification")
    d.add_argument("dataset", choices=["squad"])
    d.add_argument("--version", choices=["1.1", "2.0"], default="1.1")
    d.add_argument("--dir", default="data/squad")
    d.set_defaults(func=cmd_download)
    return p


def main(argv=None) -> int:
    """Run one command. A user's mistake is one line on stderr and exit 1 (a flag the parser rejects: exit 2);
    anything else is a bug: one line naming it, the traceback with --debug or BERTQA_DEBUG=1; Ctrl-C exits 130.
    Outputs are written atomically (bertqa.files), so none of these leaves a partial one behind."""
    real, real_err = sys.stdout, sys.stderr
    if real is None:  # started with stdout closed (`>&-`): Python has no sys.stdout, and print() drops everything
        _say("bertqa: error: stdout: closed; give it a file (/dev/null to discard what bertqa prints)")
        return 1
    sys.stdout = _Stdout(real)
    if real_err is None:  # stderr closed (`2>&-`, a daemon's): what it would say is lost, not the run (a progress
        sys.stderr = open(os.devnull, "w", encoding="utf-8")  # bar, writing to None, failed it; its exit code stays)
    try:
        return _main(argv)
    finally:
        sys.stdout = real
        if real_err is None:
            sys.stderr.close()
            sys.stderr = None


def _main(argv) -> int:
    show_names_of(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # said by the command's parser: its --help lists the flags it takes, the top level's does not
            command = parser.commands[args.command]
            if args.command == "export":  # `export onnx`: the format's own parser holds its flags
                command = command.formats[args.format]
            command.error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as e:  # --help (0) or a usage error (2): argparse's text is written while a failure can be told
        return _exit_writing_stdout(e.code if isinstance(e.code, int) else 2 if e.code else 0)
    except OSError as e:  # --help that could not be written (a usage error's line on stderr: nothing more to say)
        return _exit_writing_stdout(0, e) if e.filename == "stdout" else 2
    debug = getattr(args, "debug", False) or os.environ.get("BERTQA_DEBUG", "").lower() not in ("", "0", "false", "no")
    _setup_logging()
    try:
        args.func(args)
    except KeyboardInterrupt:
        _say("bertqa: interrupted")
        _stdout_error()
        return 130
    except BrokenPipeError:  # `bertqa ask ... | head -1`: the reader left; say nothing more
        _stdout_error()
        return 1
    except Exception as e:
        _stdout_error()  # (a print that failed leaves what it could not write held, to fail again at exit)
        if debug:
            traceback.print_exc()
        _say(f"bertqa: error: {error_line(e, debug)}")
        return 1
    return _exit_writing_stdout(0)


class _Stdout:
    """sys.stdout while a command runs: a write or flush that fails (a full disk, a reader gone) names stdout,
    however it is buffered (a write of 8 KB or more, or any with PYTHONUNBUFFERED, reaches the file at once)."""

    def __init__(self, stream):
        self.stream = stream

    def __getattr__(self, name):
        return getattr(self.stream, name)

    def write(self, text):
        try:
            return self.stream.write(text)
        except OSError as e:
            raise _named_stdout(e) from None
        except UnicodeEncodeError as e:  # an answer in a locale's encoding (Latin-1, a Windows code page, ASCII)
            # (PYTHONIOENCODING, where set, rules over PYTHONUTF8)
            way_out = "PYTHONIOENCODING=utf-8" + ("" if os.environ.get("PYTHONIOENCODING") else " (or PYTHONUTF8=1)")
            raise ValueError(f"stdout: its encoding, {e.encoding}, cannot hold {e.object[e.start : e.end]!a}; set "
                             f"{way_out}") from None  # fmt: skip

    def flush(self):
        try:
            self.stream.flush()
        except OSError as e:
            raise _named_stdout(e) from None


def _named_stdout(e: OSError) -> OSError:
    """The same error (BrokenPipeError stays one: the class follows errno), naming stdout."""
    return OSError(e.errno, e.strerror, "stdout") if e.strerror else e


def _stdout_error() -> OSError | None:
    """Write what stdout holds now, not at exit, where a failure (a reader gone, a full disk) is Python's noise on
    stderr and exit status 120. Where it cannot be written, stdout then points at /dev/null (what it holds goes
    there, quietly) and the error is returned."""
    try:
        sys.stdout.flush()
        return None
    except OSError as e:
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # (no descriptor: nothing is written at exit either)
            pass
        return e


def _exit_writing_stdout(code: int, failed: OSError | None = None) -> int:
    """`code`, once stdout is written; else 1, and a line saying why (not for a reader that left: `| head`)."""
    e = _stdout_error() or failed
    if e is None:
        return code
    if not isinstance(e, BrokenPipeError):
        _say(f"bertqa: error: {message_line(e)}")
    return max(code, 1)


def _say(line: str) -> None:
    """`line` on stderr in one write: print() writes the text and its newline apart, and under torchrun, where
    every rank stopped by a failure says so at once, two ranks' lines then ran together into one."""
    if sys.stderr is None:  # (started with stderr closed: nowhere to say it)
        return
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _first_line(e: Exception) -> str:
    """The first line of an exception's message, an OSError's as "FILE: what went wrong"; "" if it has none."""
    text = str(e).strip()
    if isinstance(e, OSError) and e.strerror:  # "[Errno 2] No such file or directory: 'x'" -> "x: No such ..."
        names = [str(n) for n in (e.filename, e.filename2) if n is not None]
        text = ": ".join(names + [e.strerror])
    return next(iter(one_line(text).splitlines()), "")


def _is_bad_input(e: Exception) -> bool:
    """Ours (CheckpointError, SquadFormatError, UsageError, the API's checks): ValueErrors and OSErrors whose
    message is complete."""
    return isinstance(e, (ValueError, OSError)) and bool(_first_line(e))


def message_line(e: Exception) -> str:
    """An exception as one line: the first line of its message, after its type's name unless it is bad input."""
    first = _first_line(e)
    if _is_bad_input(e):
        return first
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def is_out_of_memory(e: Exception) -> bool:
    """A device's (torch's OutOfMemoryError, by name: torch is not imported for every command; MPS's RuntimeError)
    or the host's (Python's MemoryError; torch's CPU allocator's RuntimeError). The message is kept: an absurd
    size from a bug shows in it."""
    if type(e).__name__ == "OutOfMemoryError" or isinstance(e, MemoryError):
        return True
    text = str(e)
    if isinstance(e, ImportError):  # (the loader could not map a library's code: under ulimit -v, say)
        # (glibc words a library on a noexec mount the same way: only where a memory limit is set is it memory)
        unmapped = ("failed to map segment from shared object", "cannot map zero-fill pages")  # (glibc's words)
        return "Cannot allocate memory" in text or (any(said in text for said in unmapped)
                                                    and _memory_limit() is not None)  # fmt: skip
    if isinstance(e, SystemError):  # (CPython's own failed allocation, importing under a memory limit)
        return "without exception set" in text and _memory_limit() is not None
    allocators = ("DefaultCPUAllocator: can't allocate memory", "MPS backend out of memory", "std::bad_alloc")
    return isinstance(e, RuntimeError) and any(said in text for said in allocators)  # (the last: C++'s, via torch)


def _memory_limit() -> str | None:
    """The limits set on the process's memory, as the shell sets them ("ulimit -v": its address space; "ulimit -d":
    its data; "ulimit -v or ulimit -d"), or None."""
    flags = [
        flag
        for name, flag in (("RLIMIT_AS", "ulimit -v"), ("RLIMIT_DATA", "ulimit -d"))
        if soft_limit(name) not in (None, math.inf)
    ]
    return " or ".join(flags) or None


def error_line(e: Exception, debug: bool | None) -> str:
    """The error line for an exception: the message of a user's mistake, else (a bug) its type and where to look.
    `debug` None: the line is for other processes (torchrun ranks), whose own output has no traceback of it."""
    if _is_bad_input(e):
        return message_line(e)
    if is_out_of_memory(e):
        detail = " ".join(str(e).split())[:160]
        limit = _memory_limit()
        if isinstance(e, (ImportError, SystemError)):  # (starting: no batch has run)
            return f"out of memory loading a library ({detail})" + (f"; is {limit} too low?" if limit else "")
        return (f"out of memory{f' ({detail})' if detail else ''}; a smaller batch or window length may fit"
                + (f", or is {limit} too low?" if limit else ""))  # fmt: skip
    hint = {True: "the traceback is above", False: "rerun with --debug (or BERTQA_DEBUG=1) for the traceback",
            None: "that rank prints its traceback with --debug (or BERTQA_DEBUG=1)"}[debug]  # fmt: skip
    return f"internal error ({message_line(e)}); {hint}, and please report it"


class _OneLine(logging.Formatter):
    def format(self, record) -> str:
        return one_line(super().format(record))


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever sys.stderr is as it writes (as logging's last resort does), not the stream it
    was made with: a run started with stderr closed has /dev/null only while it runs (main). Unless given one of
    its own (setStream)."""

    def __init__(self):
        logging.Handler.__init__(self)  # (StreamHandler's would fix the stream)
        self._stream = None

    @property
    def stream(self):
        return sys.stderr if self._stream is None else self._stream

    @stream.setter
    def stream(self, stream):
        self._stream = stream


def _setup_logging() -> None:
    """Our modules' notes on stderr as `bertqa: ...`, without turning on every library's INFO logging."""
    logger = logging.getLogger("bertqa")
    if not logger.handlers:
        handler = _Stderr()
        handler.setFormatter(_OneLine("bertqa: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
