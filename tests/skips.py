"""The one kind of skip CI accepts (tests/conftest.py fails every other skip under CI=true): a feature that
this CPU or torch build lacks, so no CI machine could run the test either."""

import contextlib
import signal

import pytest

PLATFORM = "platform: "  # the reason's prefix


def platform_skip(reason: str):
    pytest.skip(PLATFORM + reason)


def is_platform_skip(reason: str) -> bool:
    return reason.removeprefix("Skipped: ").startswith(PLATFORM)


@contextlib.contextmanager
def file_size_limit(size: int):
    """Writes past `size` bytes of any file fail, as on a full disk, while inside (RLIMIT_FSIZE, with SIGXFSZ
    ignored: the write then fails with EFBIG instead of killing the process). Only where nothing else writes."""
    try:
        import resource
    except ImportError:
        platform_skip("no resource module to limit file sizes (not a POSIX system)")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
