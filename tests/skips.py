"""The one kind of skip CI accepts (tests/conftest.py fails every other skip under CI=true): a feature that
this CPU or torch build lacks, so no CI machine could run the test either."""

import pytest

PLATFORM = "platform: "  # the reason's prefix


def platform_skip(reason: str):
    pytest.skip(PLATFORM + reason)


def is_platform_skip(reason: str) -> bool:
    return reason.removeprefix("Skipped: ").startswith(PLATFORM)
