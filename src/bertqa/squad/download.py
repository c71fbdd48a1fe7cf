"""Download the official SQuAD files: sha256-verified, resumable, atomic.

A file is written as `NAME.part`, resumed from there with an HTTP Range request after an interruption,
verified, flushed to disk, and only then renamed to `NAME`: a file under its final name is always complete and
correct.
Only `urllib` is used, so there is nothing to install.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import stat
import urllib.error
import urllib.request
from pathlib import Path

from ..files import _flock_named, _NoLocks, _target, check_no_dangling_link, folder_for, fsync_path

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
    """Fetch `url` into `dest` unless `dest` already holds the right bytes; resume a leftover `.part`. A `dest` that
    is a symbolic link is written through to its target, as a shell's `>` writes, and a replaced file keeps its
    permissions."""
    dest = _target(dest)
    part = _check_place(dest)
    if dest.is_file() and sha256_file(dest) == sha256:
        return dest
    try:
        # Unbuffered: every block is written by _write, where local trouble (a full disk) is told apart from the
        # network's; a buffer's last bytes would be written by close(), whose error names no file.
        f = open(part, "ab", buffering=0)
    except OSError as e:
        raise OSError(f"{part}: cannot write ({e.strerror})") from None
    with f:  # locked from here until it is named complete: a second download of it stops, not appends to it
        if not _held(f, part):
            if dest.is_file() and sha256_file(dest) == sha256:  # the other one finished it meanwhile
                return dest
            raise ValueError(f"{part}: another download is writing it; wait for it to finish")
        try:
            _fetch(url, f, part, timeout)
        except BaseException:
            if part.is_file() and part.stat().st_size == 0:  # nothing came: no empty .part left behind
                part.unlink()
            raise
        got = sha256_file(part)
        if got != sha256:
            part.unlink()  # a bad prefix would poison every later resume
            raise ValueError(f"{url}: sha256 mismatch (expected {sha256}, got {got}); nothing was kept")
        if dest.is_file():
            log.warning("%s: replacing it (its sha256 is not the published file's)", dest)
            os.chmod(part, stat.S_IMODE(dest.stat().st_mode))
        fsync_path(part)  # on disk before it is named complete: a power loss then leaves the .part or the whole file
        os.replace(part, dest)
        fsync_path(dest.parent)
    return dest


def _held(f, part: Path) -> bool:
    """Whether this process now holds the lock of `part`, open as `f`, and it is still the file named so (another
    download may have finished it, and named it complete, between the open and the lock). True where locks
    cannot be taken."""
    try:
        return _flock_named(f.fileno(), part)
    except _NoLocks:
        return True


def _fetch(url: str, f, part: Path, timeout: float) -> None:
    """The body of `url` into the .part open for appending as `f`, resumed from its end where the server
    honours a Range request."""
    have, received = f.tell(), 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            # 206 continues the .part; a 200 means the server ignored Range and sends the whole file.
            content_range = response.headers.get("Content-Range", "")
            if have and not (response.status == 206 and content_range.startswith(f"bytes {have}-")):
                have = 0
                f.truncate(0)
            if have:
                log.info("%s: resuming at byte %d", part.name, have)
            expected = response.headers.get("Content-Length", "").strip()
            while block := response.read(CHUNK):
                _write(f, block)
                received += len(block)
            # http.client returns a short body without complaint when the connection drops.
            if expected.isascii() and expected.isdigit() and received < int(expected):  # "²" is a digit too
                raise ConnectionError(f"connection closed after {received} of {expected} bytes")
    except urllib.error.HTTPError as e:
        # 416: the .part is already whole (an interruption after the last byte); it is verified next.
        if not (e.code == 416 and have):
            raise OSError(f"{url}: HTTP {e.code} {e.reason}") from None
    except _Unwritable as e:
        raise OSError(f"{part}: cannot write ({e.args[0]})") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = getattr(e, "reason", e)
        if not have + received:  # nothing kept (the caller removes the empty .part): no resume to offer
            raise OSError(f"{url}: download failed ({reason})") from None
        raise OSError(f"{url}: download interrupted ({reason}); run again to resume from {part}") from None


def _check_place(dest: Path) -> Path:
    """`dest`'s .part, once neither is a folder (found before anything is fetched, not after)."""
    part = dest.with_name(dest.name + ".part")
    for path in (dest, part):
        if path.exists() and not path.is_file():
            raise ValueError(f"{path}: is a folder, not a file to download into; move it away or choose another --dir")
    return part


class _Unwritable(Exception):
    """A write to the .part failed: the disk's fault, not the network's (running again will not help)."""


def _write(f, block: bytes) -> None:
    view = memoryview(block)
    try:
        while view:  # (an unbuffered write may take part of the block)
            view = view[f.write(view) :]
    except OSError as e:
        raise _Unwritable(e.strerror or str(e)) from None


def download_squad(
    version: str, directory: str | os.PathLike, base_url: str | None = None, checksums: dict | None = None
) -> list[Path]:
    """Download the official train and dev files of SQuAD `version` ("1.1" or "2.0") into `directory`.

    `base_url` replaces the official location (a mirror, or a local server in tests); `checksums` maps
    file names to sha256 and overrides the published sums in SQUAD_SHA256.
    """
    if not os.fspath(directory):  # Path("") is the current folder
        raise ValueError("--dir '': empty; name the folder to download into")
    version = str(version).lstrip("v")
    if version not in SQUAD_FILES:
        raise ValueError(f"unknown SQuAD version {version!r} (choose 1.1 or 2.0)")
    base = (base_url or SQUAD_URL).rstrip("/") + "/"
    sums = {**SQUAD_SHA256, **(checksums or {})}
    directory = Path(directory)
    check_no_dangling_link(directory, "--dir")
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"--dir {directory}: is a file, not a folder; name the folder to download into")
    with folder_for(directory):  # made for a download that fails before it writes anything: removed again
        for name in SQUAD_FILES[version]:  # every file's place (a link's: its target's), before the first is fetched
            target = _target(directory / name)
            if not target.parent.is_dir():
                raise ValueError(f"{directory / name}: a symbolic link to {target}, whose folder does not exist")
            _check_place(target)
        return [download_file(base + name, directory / name, sums[name]) for name in SQUAD_FILES[version]]
