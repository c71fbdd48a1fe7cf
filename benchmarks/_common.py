"""What the benchmark scripts share: argument types, and bad input told in one line (scripts run as
`python benchmarks/NAME.py`, so this folder is on their import path)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bertqa.cli import usable_cpus


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def cpu_threads(text: str) -> int:
    """A positive number of threads, at most the CPUs this process may use (torch's own error for a huge one names
    no flag)."""
    value = positive(text)
    if value > usable_cpus():
        raise argparse.ArgumentTypeError(f"{value}: more than the CPUs this process may use ({usable_cpus()})")
    return value


def seconds(text: str) -> float:
    """A positive, finite number of seconds."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def positives(text: str) -> list[int]:
    """A comma-separated list of positive integers."""
    values = [positive(s) for s in text.split(",") if s.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"no number in {text!r}")
    return values


def run(main) -> None:
    """Exit with main()'s status; a bad argument or file that bertqa refuses (its ValueErrors, and OSErrors, one
    line each) as one line 'NAME: error: ...' and status 1, not a traceback."""
    try:
        status = main()
    except (ValueError, OSError) as e:
        sys.exit(f"{Path(sys.argv[0]).stem}: error: {e}")
    sys.exit(status or 0)
