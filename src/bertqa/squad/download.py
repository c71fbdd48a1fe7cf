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

from ..files import (
    _even_read_only,
    _flock_named,
    _NoLocks,
    _target,
    check_no_dangling_link,
    folder_for,
    fsync_path,
    locks_exist,
    set_mode,
)

log = logging.getLogger(__name__)

SQUAD_URL = "https://rajpurkar.github.io/SQuAD-explorer/dataset/"

# The published files' sha256, the same pins as other public loaders of these URLs (e.g. ParlAI's SQuAD and
# SQuAD2 build scripts), and their sizes: a body cut short with no Content-Length is then told from a whole one.
SQUAD_SHA256 = {
    "train-v1.1.json": "3527663986b8295af4f7fcdff1ba1ff3f72d07d61a20f487cb238a6ef92fd955",
    "dev-v1.1.json": "95aa6a52d5d6a735563366753ca50492a658031da74f301ac5238b03966972c9",
    "train-v2.0.json": "68dcfbb971bd3e96d5b46c7177b16c1a4e7d4bdef19fb204502738552dede002",
    "dev-v2.0.json": "80a5225e94905956a6446d296ca1093975c4d3b3260f1d6c8f68bc2ab77182d8",
}
SQUAD_SIZES = {"train-v1.1.json": 30288272, "dev-v1.1.json": 4854279, "train-v2.0.json": 42123633,
               "dev-v2.0.json": 4370528}  # fmt: skip
SQUAD_FILES = {"1.1": ["train-v1.1.json", "dev-v1.1.json"], "2.0": ["train-v2.0.json", "dev-v2.0.json"]}

CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _sha256(value, what) -> str:
    """A sha256 as hexdigest() writes it (tools print either case), or a one-line error naming `what`."""
    if not (isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdefABCDEF" for c in value)):
        raise ValueError(f"{what}: {value!r} is not a sha256 (64 hexadecimal digits); nothing was fetched")
    return value.lower()


def download_file(url: str, dest: str | os.PathLike, sha256: str, timeout: float = 60.0, size: int | None = None
                  ) -> Path:  # fmt: skip
    """Fetch `url` into `dest` unless `dest` already holds the right bytes; resume a leftover `.part`. A `dest` that
    is a symbolic link is written through to its target, as a shell's `>` writes, and a replaced file keeps its
    permissions. `size`, where known, tells a body cut short (with no Content-Length) from a whole one."""
    sha256 = _sha256(sha256, url)
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
            _fetch(url, f, part, timeout, size)
        except BaseException:
            if part.is_file() and part.stat().st_size == 0:  # nothing came: no empty .part left behind
                _let_go(f)
                part.unlink()
            raise
        got = sha256_file(part)
        _let_go(f)
        if got != sha256:
            part.unlink()  # a bad prefix would poison every later resume
            raise ValueError(f"{url}: sha256 mismatch (expected {sha256}, got {got}); nothing was kept")
        if dest.is_file():
            log.warning("%s: replacing it (its sha256 is not the published file's)", dest)
            set_mode(part, stat.S_IMODE(dest.stat().st_mode))
        fsync_path(part)  # on disk before it is named complete: a power loss then leaves the .part or the whole file
        _even_read_only(lambda: os.replace(part, dest), dest)  # (a read-only one, which Windows would keep)
        fsync_path(dest.parent)
    return dest


def _let_go(f) -> None:
    """Close the .part where no lock is held on it (Windows: no fcntl), before it is deleted or renamed: Windows does
    neither to a file a process holds open. Elsewhere it stays open, and locked, until it is named complete."""
    if not locks_exist():
        f.close()


def _held(f, part: Path) -> bool:
    """Whether this process now holds the lock of `part`, open as `f`, and it is still the file named so (another
    download may have finished it, and named it complete, between the open and the lock). True where locks
    cannot be taken."""
    try:
        return _flock_named(f.fileno(), part)
    except _NoLocks:
        return True


def _fetch(url: str, f, part: Path, timeout: float, size: int | None) -> None:
    """The body of `url` into the .part open for appending as `f`, resumed from its end with a Range request. A
    reply that is not the rest of the file leaves the .part as it was: a good partial download is not lost to a
    proxy's error page or a broken server."""
    have = f.tell()
    received = 0  # bytes of the body read
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            content_range = response.headers.get("Content-Range", "")
            if have and response.status == 206:
                # The rest, from the .part's end to the file's: a part that ends before it is no whole file.
                unit, _, spec = content_range.partition(" ")
                first, _, last = spec.partition("/")[0].partition("-") if unit.lower() == "bytes" else ("", "", "")
                total = _number(content_range.rpartition("/")[2].strip())
                if _number(first) != have or _number(last) is None or total not in (None, _number(last) + 1):
                    raise _NotTheRest(f"the server sent {content_range or 'a part with no Content-Range'} for a "
                                      f"request from byte {have}")  # fmt: skip
                size = size if size is not None else total
                log.info("%s: resuming at byte %d", part.name, have)
            expected = response.headers.get("Content-Length", "").strip()
            length = _number(expected)
            start = have if response.status == 206 else 0  # where the body is in the file
            kind = response.headers.get("Content-Type") or "no Content-Type"
            if None not in (size, length) and start + length != size:  # (a proxy's page, say: not the file)
                raise _NotTheRest(f"the server sent {length} bytes from byte {start} ({kind}) of a {size}-byte file")
            if have and response.status != 206:  # the server ignored Range and sends the whole file
                if size is not None and have > size:  # a .part longer than the file is none of it
                    f.truncate(0)
                    have = 0
                else:  # which starts with the .part
                    received = _match_start(response, part, have, length, kind)
            while block := response.read(CHUNK):
                _write(f, block)
                received += len(block)
            # http.client returns a short body without complaint when the connection drops.
            if length is not None and received < length:
                raise ConnectionError(f"connection closed after {received} of {expected} bytes")
            if length is None and size is not None and f.tell() < size:
                if response.chunked:  # ended by its last chunk (a cut one raises IncompleteRead): whole, not the file
                    f.truncate(have)
                    raise _NotTheRest(
                        f"the server sent {received} bytes from byte {start} ({kind}) of a {size}-byte file"
                    )
                raise ConnectionError(f"connection closed after {f.tell()} of {size} bytes")  # (where the body ends)
    except urllib.error.HTTPError as e:
        # 416: the .part is already whole (an interruption after the last byte); it is verified next. Unless the
        # server's file is longer: then it refuses a range it has, and the .part is kept for a server that works.
        total = _number(e.headers.get("Content-Range", "").rpartition("/")[2].strip() if e.headers else "")
        total = size if total is None else total
        if not (e.code == 416 and have):
            raise OSError(f"{url}: HTTP {e.code} {e.reason}") from None
        if total is not None and have < total:
            raise OSError(f"{url}: HTTP 416 for bytes {have}- of a {total}-byte file; {part} kept, to resume from "
                          "once the server answers, or delete it to start over") from None  # fmt: skip
    except _NotTheRest as e:
        if not have:
            raise OSError(f"{url}: {e.args[0]}; nothing was kept") from None
        raise OSError(f"{url}: {e.args[0]}; {part} kept, to resume from once the server answers with the file, or "
                      "delete it to start over") from None  # fmt: skip
    except _Unwritable as e:
        raise OSError(f"{part}: cannot write ({e.args[0]})") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = getattr(e, "reason", e)
        if not have + received:  # nothing kept (the caller removes the empty .part): no resume to offer
            raise OSError(f"{url}: download failed ({reason})") from None
        raise OSError(f"{url}: download interrupted ({reason}); run again to resume from {part}") from None


def _match_start(response, part: Path, have: int, length: int | None, kind: str) -> int:
    """Read the first `have` bytes of a whole file's body (`length` bytes, where said; `kind`, its Content-Type),
    which must be those of the .part; returns `have`."""
    if length is not None and length < have:
        raise _NotTheRest(f"the server answered a request from byte {have} with a whole file of {length} bytes "
                          f"({kind})")  # fmt: skip
    with open(part, "rb") as held:
        done = 0
        while done < have:
            block = response.read(min(CHUNK, have - done))
            if not block:
                raise ConnectionError(f"connection closed after {done} bytes, before the {have} the .part holds")
            if block != held.read(len(block)):
                raise _NotTheRest(f"the server answered a request from byte {have} with a whole file whose first "
                                  f"{have} bytes are not the .part's ({kind})")  # fmt: skip
            done += len(block)
    return have


def _number(text: str) -> int | None:
    """A header's byte count, None where it is not one."""
    return int(text) if text.isascii() and text.isdigit() else None  # ("²" is a digit too)


class _NotTheRest(Exception):
    """The server's reply does not continue the .part."""


def _check_place(dest: Path) -> Path:
    """`dest`'s .part, once neither is a folder (found before anything is fetched, not after)."""
    part = dest.with_name(dest.name + ".part")
    for path in (dest, part):
        if path.exists() and not path.is_file():
            kind = "a folder" if path.is_dir() else "not a regular file (a pipe, socket or device)"
            raise ValueError(f"{path}: is {kind}, not a file to download into; move it away or choose another --dir")
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
    sums = {name: _sha256(sums[name], f"checksums[{name!r}]") for name in SQUAD_FILES[version]}  # before any fetch
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
        # The published sizes go with the published sums only (a mirror's own file has its own).
        return [download_file(base + name, directory / name, sums[name], size=SQUAD_SIZES.get(name)
                              if sums[name] == SQUAD_SHA256[name] else None) for name in SQUAD_FILES[version]]  # fmt: skip
