"""Download the official SQuAD files: sha256-verified, resumable, atomic.

A file is written as `NAME.part`, resumed from there with an HTTP Range request after an interruption,
verified, and only then renamed to `NAME`: a file under its final name is always complete and correct.
Only `urllib` is used, so there is nothing to install.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)

SQUAD_URL = "https://rajpurkar.github.io/SQuAD-explorer/dataset/"

# The published files' sha256 (sizes 30,288,272 / 4,854,279 / 42,123,633 / 4,370,528 bytes), the same
# pins as other public loaders of these URLs (e.g. ParlAI's SQuAD and SQuAD2 build scripts).
SQUAD_SHA256 = {
    "train-v1.1.json": "3527663986b8295af4f7fcdff1ba1ff3f72d07d61a20f487cb238a6ef92fd955",
    "dev-v1.1.json": "95aa6a52d5d6a735563366753ca50492a658031da74f301ac5238b03966972c9",
    "train-v2.0.json": "68dcfbb971bd3e96d5b46c7177b16c1a4e7d4bdef19fb204502738552dede002",
    "dev-v2.0.json": "80a5225e94905956a6446d296ca1093975c4d3b3260f1d6c8f68bc2ab77182d8",
}
SQUAD_FILES = {"1.1": ["train-v1.1.json", "dev-v1.1.json"], "2.0": ["train-v2.0.json", "dev-v2.0.json"]}

CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def download_file(url: str, dest: str | os.PathLike, sha256: str, timeout: float = 60.0) -> Path:
    """Fetch `url` into `dest` unless `dest` already holds the right bytes; resume a leftover `.part`."""
    dest = Path(dest)
    if dest.is_file() and sha256_file(dest) == sha256:
        return dest
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            # 206 continues the .part; a 200 means the server ignored Range and sends the whole file.
            content_range = response.headers.get("Content-Range", "")
            resumed = response.status == 206 and content_range.startswith(f"bytes {have}-")
            mode = "ab" if have and resumed else "wb"
            if have:
                log.info("%s: resuming at byte %d", dest.name, have if mode == "ab" else 0)
            expected = response.headers.get("Content-Length")
            received = 0
            with open(part, mode) as f:
                while block := response.read(CHUNK):
                    f.write(block)
                    received += len(block)
            # http.client returns a short body without complaint when the connection drops.
            if expected is not None and received < int(expected):
                raise ConnectionError(f"connection closed after {received} of {expected} bytes")
    except urllib.error.HTTPError as e:
        # 416: the .part is already whole (an interruption after the last byte); verify it below.
        if not (e.code == 416 and have):
            raise OSError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = getattr(e, "reason", e)
        raise OSError(f"{url}: download interrupted ({reason}); run again to resume from {part}") from None
    got = sha256_file(part)
    if got != sha256:
        part.unlink()  # a bad prefix would poison every later resume
        raise ValueError(f"{url}: sha256 mismatch (expected {sha256}, got {got}); nothing was kept")
    os.replace(part, dest)
    return dest


def download_squad(
    version: str, directory: str | os.PathLike, base_url: str | None = None, checksums: dict | None = None
) -> list[Path]:
    """Download the official train and dev files of SQuAD `version` ("1.1" or "2.0") into `directory`.

    `base_url` replaces the official location (a mirror, or a local server in tests); `checksums` maps
    file names to sha256 and overrides the published sums in SQUAD_SHA256.
    """
    version = str(version).lstrip("v")
    if version not in SQUAD_FILES:
        raise ValueError(f"unknown SQuAD version {version!r} (choose 1.1 or 2.0)")
    base = (base_url or SQUAD_URL).rstrip("/") + "/"
    sums = {**SQUAD_SHA256, **(checksums or {})}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return [download_file(base + name, directory / name, sums[name]) for name in SQUAD_FILES[version]]
