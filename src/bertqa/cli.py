"""The `bertqa` command (also `python -m bertqa`, hence `torchrun -m bertqa`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


class UsageError(ValueError):
    """A bad command-line value, reported as one line."""


def cmd_convert(args):
    from .checkpoint import load_model, save_pretrained
    from .tokenizer import load_tokenizer

    src = Path(args.src)
    tok_source = args.vocab or (src if src.is_dir() else src.parent)
    model = load_model(src, config=args.config, trust_pickle=args.trust_pickle)
    try:
        tokenizer = load_tokenizer(tok_source, do_lower_case=args.lower_case)
    except FileNotFoundError:
        raise UsageError(f"{tok_source}: no tokenizer.json or vocab.txt; pass --vocab PATH") from None
    out = save_pretrained(model, tokenizer, args.dst)
    print(f"bertqa: wrote {out} ({sum(p.numel() for p in model.parameters()):,} parameters)")


def cmd_score(args):
    from .squad.metrics import score_files

    print(json.dumps(score_files(args.data_file, args.pred_file, args.na_prob_file)))


def cmd_download(args):
    from .squad.data import download_squad

    for path in download_squad(args.version, args.dir):
        print(f"bertqa: {path}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bertqa", description="Fine-tune and evaluate BERT on SQuAD.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert any recognised checkpoint into an HF folder")
    c.add_argument("src", help="HF folder, .safetensors/.bin file, or NVIDIA DeepLearningExamples .pt")
    c.add_argument("dst", help="output folder (config.json, model.safetensors, tokenizer files)")
    c.add_argument("--config", help="config.json / bert_config.json, or a preset (base, large)")
    c.add_argument("--vocab", help="vocab.txt or tokenizer.json (default: beside the checkpoint)")
    c.add_argument(
        "--lower-case",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="lower-case input (vocab.txt only; default: from its config or name)",
    )
    c.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow full unpickling (can run code: only for checkpoints you trust)",
    )
    c.set_defaults(func=cmd_convert)

    s = sub.add_parser("score", help="official SQuAD v1.1 / v2.0 EM and F1 of a predictions file")
    s.add_argument("data_file")
    s.add_argument("pred_file")
    s.add_argument("--na-prob-file", help="v2.0: no-answer probabilities (null_odds.json)")
    s.set_defaults(func=cmd_score)

    d = sub.add_parser("download", help="download a dataset with checksum verification")
    d.add_argument("dataset", choices=["squad"])
    d.add_argument("--version", choices=["1.1", "2.0"], default="1.1")
    d.add_argument("--dir", default="data/squad")
    d.set_defaults(func=cmd_download)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        # Our errors (CheckpointError, SquadFormatError, UsageError) are ValueErrors with a complete message.
        print(f"bertqa: error: {e}", file=sys.stderr)
        return 1
    return 0
