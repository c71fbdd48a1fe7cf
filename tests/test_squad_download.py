"""SQuAD download against a local HTTP server on 127.0.0.1 (no test touches the network)."""

import hashlib
import http.server
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bertqa.squad.download import SQUAD_FILES, SQUAD_SHA256, download_squad

FILES = {
    "train-v1.1.json": b'{"version": "1.1", "data": []}' + b" " * 5000,
    "dev-v1.1.json": b'{"version": "1.1", "data": [{"paragraphs": []}]}',
}
SUMS = {name: hashlib.sha256(data).hexdigest() for name, data in FILES.items()}


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves FILES with Range support; `cut_after` sends only that many bytes and drops the connection;
    `ignore_range` answers 200 with the whole file, as servers without Range support do; `length`: the
    Content-Length sent (False: none); `unit`: Content-Range's; `resume`: how a Range request is answered wrongly ("page": a proxy's error
    page with 200, "offset": 206 from byte 100, "short": 206 of 1000 bytes only, "416": refused; "portal": every request gets the page, "chunked
    portal": with no length, in chunks)."""

    log, cut_after, ignore_range, length, resume, unit = [], None, False, None, None, "bytes"

    def do_GET(self):
        name = self.path.rsplit("/", 1)[-1]
        type(self).log.append((name, self.headers.get("Range")))
        if name not in FILES:
            self.send_error(404)
            return
        data = FILES[name]
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if m and self.resume == "page" or self.resume in ("portal", "chunked portal"):
            data, m = b"<html><body>Service temporarily unavailable</body></html>", None
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            if self.resume == "chunked portal":  # (a page made as it is sent)
                self.send_header("Transfer-Encoding", "chunked")
                data = b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)
            else:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        start = int(m.group(1)) if m and not self.ignore_range else 0
        start = 100 if m and self.resume == "offset" else start
        if m and (start >= len(data) or self.resume == "416"):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.end_headers()
            return
        end = start + 1000 if m and self.resume == "short" else len(data)
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"{self.unit} {start}-{end - 1}/{len(data)}")
        if self.length is not False:
            self.send_header("Content-Length", self.length or str(end - start))
        self.end_headers()
        if self.length is not None:  # the body's end is the connection's
            self.close_connection = True
        body = data[start:end]
        if self.cut_after is not None:
            body = body[: self.cut_after]
            self.close_connection = True
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    Handler.log, Handler.cut_after, Handler.ignore_range, Handler.length, Handler.resume = [], None, False, None, None
    Handler.unit = "bytes"
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/dataset/"
    httpd.shutdown()
    httpd.server_close()


def test_published_checksums_are_pinned():
    assert set(SQUAD_SHA256) == {n for names in SQUAD_FILES.values() for n in names}
    assert all(re.fullmatch(r"[0-9a-f]{64}", s) for s in SQUAD_SHA256.values())


def test_download_verifies_and_skips_when_present(server, tmp_path):
    paths = download_squad("1.1", tmp_path, base_url=server, checksums=SUMS)
    assert [p.name for p in paths] == ["train-v1.1.json", "dev-v1.1.json"]
    assert all(p.read_bytes() == FILES[p.name] for p in paths)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dev-v1.1.json", "train-v1.1.json"]
    Handler.log.clear()
    download_squad("v1.1", tmp_path, base_url=server, checksums=SUMS)
    assert Handler.log == []  # already there and verified: nothing fetched
    # (review) Sums in upper case, as some tools print them: the same sums (the files were fetched, then deleted as
    # mismatched); one that is no sha256, even the second file's, is refused before anything is fetched.
    download_squad("1.1", tmp_path, base_url=server, checksums={k: v.upper() for k, v in SUMS.items()})
    assert Handler.log == []
    md5 = "d41d8cd98f00b204e9800998ecf8427e"
    with pytest.raises(ValueError, match=rf"^checksums\['dev-v1.1.json'\]: '{md5}' is not a sha256 \(64 hexadecimal"):
        download_squad("1.1", tmp_path / "md5", base_url=server, checksums={**SUMS, "dev-v1.1.json": md5})
    assert Handler.log == [] and not (tmp_path / "md5").exists()


def test_a_linked_file_is_written_through_to_its_target_and_keeps_its_mode(server, tmp_path):
    """As a shell's `>` writes: the link stays, its target gets the bytes (the link was replaced by a file and its
    target left stale), and a file replaced keeps its permissions."""
    (tmp_path / "data").mkdir()
    target = tmp_path / "data" / "train-v1.1.json"
    target.write_text("stale")
    target.chmod(0o640)
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / "train-v1.1.json").symlink_to(target)
    download_squad("1.1", tmp_path / "dl", base_url=server, checksums=SUMS)
    assert (tmp_path / "dl" / "train-v1.1.json").is_symlink() and target.read_bytes() == FILES["train-v1.1.json"]
    assert target.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["train-v1.1.json"]  # no .part left


def test_a_linked_files_place_is_checked_at_its_target_before_anything_is_fetched(server, tmp_path):
    (tmp_path / "dl").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "dl" / "dev-v1.1.json").symlink_to(tmp_path / "nowhere" / "dev-v1.1.json")
    with pytest.raises(
        ValueError, match=r"dev-v1\.1\.json: a symbolic link to .*nowhere/dev-v1\.1\.json, whose folder"
    ):
        download_squad("1.1", tmp_path / "dl", base_url=server, checksums=SUMS)
    (tmp_path / "dl" / "dev-v1.1.json").unlink()
    (tmp_path / "dl" / "dev-v1.1.json").symlink_to(tmp_path / "data" / "dev-v1.1.json")
    (tmp_path / "data" / "dev-v1.1.json.part").mkdir()
    with pytest.raises(ValueError, match=r"data/dev-v1\.1\.json\.part: is a folder"):
        download_squad("1.1", tmp_path / "dl", base_url=server, checksums=SUMS)
    assert Handler.log == [] and sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["dev-v1.1.json"]


def test_a_file_reaches_the_disk_before_it_is_named_complete(server, tmp_path, monkeypatch):
    import bertqa.squad.download as download

    events = []
    monkeypatch.setattr(download, "fsync_path", lambda p: events.append(("fsync", Path(p).name)))
    real_replace = os.replace
    monkeypatch.setattr(
        download.os, "replace", lambda a, b: (events.append(("rename", Path(b).name)), real_replace(a, b))
    )
    download_squad("1.1", tmp_path, base_url=server, checksums=SUMS)
    assert events[:3] == [("fsync", "train-v1.1.json.part"), ("rename", "train-v1.1.json"), ("fsync", tmp_path.name)]
    assert events[3:] == [("fsync", "dev-v1.1.json.part"), ("rename", "dev-v1.1.json"), ("fsync", tmp_path.name)]


def test_checksum_mismatch_keeps_nothing(server, tmp_path):
    bad = {**SUMS, "dev-v1.1.json": "0" * 64}
    with pytest.raises(ValueError, match="dev-v1.1.json: sha256 mismatch") as err:
        download_squad("1.1", tmp_path, base_url=server, checksums=bad)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-v1.1.json"]  # no dev file, no .part


@pytest.mark.parametrize("unit", ["bytes", "Bytes"])  # (a range unit's name is case-insensitive: RFC 9110)
def test_interrupted_download_resumes_with_range(server, tmp_path, unit):
    Handler.cut_after, Handler.unit = 1000, unit
    with pytest.raises(OSError, match="run again to resume"):
        download_squad("1.1", tmp_path, base_url=server, checksums=SUMS)
    part = tmp_path / "train-v1.1.json.part"
    assert part.read_bytes() == FILES["train-v1.1.json"][:1000]
    assert not (tmp_path / "train-v1.1.json").exists()  # a half file never looks complete
    Handler.cut_after, Handler.log = None, []
    paths = download_squad("1.1", tmp_path, base_url=server, checksums=SUMS)
    assert Handler.log[0] == ("train-v1.1.json", "bytes=1000-")
    assert paths[0].read_bytes() == FILES["train-v1.1.json"] and not part.exists()


def test_a_second_download_of_the_same_file_stops_instead_of_appending_to_it(server, tmp_path):
    """Both appended to one .part (the checksum then failed and the partial download was lost), or the second
    appended to the file the first had just named complete."""
    fcntl = pytest.importorskip("fcntl")
    part = tmp_path / "train-v1.1.json.part"
    part.write_bytes(FILES["train-v1.1.json"][:10])
    with open(part, "ab") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another download, writing it
        with pytest.raises(ValueError, match=r"train-v1.1.json.part: another download is writing it; wait for it"):
            download_squad("1.1", tmp_path, base_url=server, checksums=SUMS)
        assert part.read_bytes() == FILES["train-v1.1.json"][:10] and Handler.log == []
    paths = download_squad("1.1", tmp_path, base_url=server, checksums=SUMS)  # once it is done: resumed
    assert Handler.log[0] == ("train-v1.1.json", "bytes=10-") and paths[0].read_bytes() == FILES["train-v1.1.json"]


def test_a_failure_before_any_byte_offers_no_resume(server, tmp_path):
    """Nothing kept (a refused connection, a body cut before its first byte): the empty .part is removed, and the
    error does not send the user to resume from it."""
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/dataset/"
    Handler.cut_after = 0
    for url in (closed, server):
        with pytest.raises(OSError, match="download failed") as err:  # into folders made for it: removed again
            download_squad("1.1", tmp_path / "made" / "for it", base_url=url, checksums=SUMS)
        assert "resume" not in str(err.value) and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("ignore_range", [False, True])
def test_resume_from_part_file(server, tmp_path, ignore_range):
    Handler.ignore_range = ignore_range  # a 200 reply restarts the file instead of appending
    data = FILES["dev-v1.1.json"]
    (tmp_path / "dev-v1.1.json.part").write_bytes(data[:10])
    download_squad("1.1", tmp_path, base_url=server, checksums=SUMS)
    assert (tmp_path / "dev-v1.1.json").read_bytes() == data
    # A .part that is already whole gets 416 from the server and is just verified and renamed.
    (tmp_path / "dev-v1.1.json").unlink()
    (tmp_path / "dev-v1.1.json.part").write_bytes(data)
    download_squad("1.1", tmp_path, base_url=server, checksums=SUMS)
    assert (tmp_path / "dev-v1.1.json").read_bytes() == data


def test_errors(server, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown SQuAD version '3.0'"):
        download_squad("3.0", tmp_path)
    with pytest.raises(OSError, match="HTTP 404"):
        download_squad("2.0", tmp_path, base_url=server)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="--dir '': empty; name the folder to download into"):
        download_squad("1.1", "", base_url=server, checksums=SUMS)  # not into the current folder
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "notes.txt").write_text("mine")  # was "notes.txt: File exists"
    with pytest.raises(ValueError, match="^--dir notes.txt: is a file, not a folder; name the folder to download"):
        download_squad("1.1", "notes.txt", base_url=server, checksums=SUMS)
    assert list(tmp_path.iterdir()) == [tmp_path / "notes.txt"] and (tmp_path / "notes.txt").read_text() == "mine"
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere" / "dl")  # was "gone: File exists"
    with pytest.raises(ValueError, match="^--dir gone: a symbolic link to nothing$"):
        download_squad("1.1", "gone", base_url=server, checksums=SUMS)
    with pytest.raises(ValueError, match="^--dir gone/sub: gone is a symbolic link to nothing$"):  # above it too
        download_squad("1.1", "gone/sub", base_url=server, checksums=SUMS)
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("length", ["many", "\u00b2"])  # ("²" is a digit to str.isdigit, not to int())
def test_a_content_length_that_is_not_a_number_is_ignored(server, tmp_path, length):
    Handler.length = length
    paths = download_squad("1.1", tmp_path, base_url=server, checksums=SUMS)
    assert [p.read_bytes() for p in paths] == [FILES[p.name] for p in paths]


def test_a_disk_that_fills_mid_file_is_named_with_the_part_file(server, tmp_path):
    # The kernel refuses the bytes past a file size limit as a full disk refuses them. The last bytes of a block,
    # left in a write buffer, came back at close() with an error that named no file.
    script = ("import resource, signal, sys\nfrom bertqa.squad.download import download_file\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\nresource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))\n"
              "download_file(*sys.argv[1:])")  # fmt: skip
    dest = tmp_path / "train-v1.1.json"
    r = subprocess.run([sys.executable, "-c", script, f"{server}train-v1.1.json", dest, SUMS[dest.name]],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 1 and r.stderr.splitlines()[-1] == f"OSError: {dest}.part: cannot write (File too large)"
    assert (tmp_path / "train-v1.1.json.part").read_bytes() == FILES[dest.name][:3000]  # kept, to resume from


def test_local_trouble_is_not_called_a_network_interruption(server, tmp_path, monkeypatch):
    import errno

    import bertqa.squad.download as download

    (tmp_path / "dev-v1.1.json").mkdir()  # the second file's place
    with pytest.raises(ValueError, match=r"dev-v1.1.json: is a folder, not a file to download into"):
        download_squad("1.1", tmp_path, base_url=server, checksums=SUMS)
    assert Handler.log == []  # said before anything was fetched, the first file included
    (tmp_path / "dev-v1.1.json").rmdir()
    if hasattr(os, "mkfifo"):  # (reading it to check its sha256 would wait for a writer forever)
        os.mkfifo(tmp_path / "dev-v1.1.json")
        with pytest.raises(ValueError, match=r"dev-v1.1.json: is not a regular file \(a pipe, socket or device\), not"):
            download_squad("1.1", tmp_path, base_url=server, checksums=SUMS)
        assert Handler.log == []
        (tmp_path / "dev-v1.1.json").unlink()

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def __getattr__(self, name):
            return getattr(self.f, name)

        def write(self, block):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(download, "open", lambda path, mode, **kw: FullDisk(open(path, mode, **kw)), raising=False)
    with pytest.raises(OSError, match=r"train-v1.1.json.part: cannot write \(No space left on device\)$"):
        download_squad("1.1", tmp_path, base_url=server, checksums=SUMS)
    assert list(tmp_path.iterdir()) == []  # the empty .part is not left behind


@pytest.mark.parametrize("resume", ["page", "offset", "short", "416"])
def test_a_resume_answered_with_something_else_keeps_the_part(server, tmp_path, resume):
    """A proxy's error page with 200 truncated the good .part and failed the checksum (all of it lost); a 206 from
    another byte was written as the file's start (a .part no resume could mend), one that ends before the file
    did was taken for the rest of it (the checksum failed: the .part was lost); a 416 for a short .part failed
    the checksum and lost it."""
    data = FILES["train-v1.1.json"]
    part = tmp_path / "train-v1.1.json.part"
    part.write_bytes(data[:3000])
    Handler.resume = resume
    said = {"page": r"the server answered a request from byte 3000 with a whole file of 57 bytes \(text/html\)",
            "offset": rf"the server sent bytes 100-{len(data) - 1}/{len(data)} for a request from byte 3000",
            "short": rf"the server sent bytes 3000-3999/{len(data)} for a request from byte 3000",
            "416": rf"HTTP 416 for bytes 3000- of a {len(data)}-byte file"}[resume]  # fmt: skip
    with pytest.raises(OSError, match=rf"^{server}train-v1.1.json: {said}; {re.escape(str(part))} kept, to resume"):
        download_squad("1.1", tmp_path, base_url=server, checksums=SUMS)
    assert part.read_bytes() == data[:3000] and not (tmp_path / "train-v1.1.json").exists()
    Handler.resume, Handler.log = None, []
    paths = download_squad("1.1", tmp_path, base_url=server, checksums=SUMS)
    assert Handler.log[0] == ("train-v1.1.json", "bytes=3000-") and paths[0].read_bytes() == data


def test_a_whole_file_sent_for_a_resume_continues_the_part_or_replaces_one_it_cannot_be(server, tmp_path,
                                                                                        monkeypatch):  # fmt: skip
    from bertqa.squad import download

    Handler.ignore_range = True  # a server without Range support
    data = FILES["train-v1.1.json"]
    part = tmp_path / "train-v1.1.json.part"
    part.write_bytes(data[:3000])
    paths = download_squad("1.1", tmp_path, base_url=server, checksums=SUMS)
    assert paths[0].read_bytes() == data and not part.exists()
    paths[0].unlink()
    for held in (data[:2999] + b"?", data + b"tail of something else"):  # (a file of other bytes, or a longer one)
        part.write_bytes(held)
        with pytest.raises(OSError, match=rf"train-v1.1.json: the server answered a request from byte {len(held)} "
                                          rf"with a whole file .*; {re.escape(str(part))} kept, to resume from"):  # fmt: skip
            download_squad("1.1", tmp_path, base_url=server, checksums=SUMS)
        assert part.read_bytes() == held
    # Where the file's size is known (the published files'), a longer .part is none of it: replaced.
    monkeypatch.setitem(download.SQUAD_SHA256, "train-v1.1.json", SUMS["train-v1.1.json"])
    monkeypatch.setitem(download.SQUAD_SIZES, "train-v1.1.json", len(data))
    paths = download_squad("1.1", tmp_path, base_url=server, checksums={"dev-v1.1.json": SUMS["dev-v1.1.json"]})
    assert paths[0].read_bytes() == data and not part.exists()
    # (mutation review) One exactly as long is not longer: compared, and kept where it differs.
    paths[0].unlink()
    part.write_bytes(data[:-1] + b"?")
    with pytest.raises(OSError, match=rf"with a whole file whose first {len(data)} bytes are not the .part's .*kept"):
        download_squad("1.1", tmp_path, base_url=server, checksums={"dev-v1.1.json": SUMS["dev-v1.1.json"]})
    assert part.read_bytes() == data[:-1] + b"?"


def test_a_resumed_body_cut_short_without_a_content_length_is_kept_by_its_content_range(server, tmp_path):
    """(mutation review) The file's size unknown (a mirror's sums), a 206 without Content-Length tells it in its
    Content-Range: cut short, the download is interrupted and the .part kept, not checked whole and deleted."""
    data = FILES["train-v1.1.json"]
    part = tmp_path / "train-v1.1.json.part"
    part.write_bytes(data[:100])
    Handler.length, Handler.cut_after = False, 50
    with pytest.raises(OSError, match=rf"download interrupted \(connection closed after 150 of {len(data)} bytes\); "
                                      "run again to resume"):  # fmt: skip
        download_squad("1.1", tmp_path, base_url=server, checksums=SUMS)
    assert part.read_bytes() == data[:150]


def test_a_body_cut_short_without_a_content_length_is_resumed_where_the_size_is_known(server, tmp_path,
                                                                                      monkeypatch):  # fmt: skip
    """The connection's end was taken for the file's: the checksum failed, the partial download was dropped,
    and on a flaky link every try started again from byte 0."""
    from bertqa.squad import download

    data = FILES["train-v1.1.json"]
    monkeypatch.setitem(download.SQUAD_SHA256, "train-v1.1.json", SUMS["train-v1.1.json"])  # as if published
    monkeypatch.setitem(download.SQUAD_SIZES, "train-v1.1.json", len(data))
    Handler.length, Handler.cut_after = False, 1000
    with pytest.raises(OSError, match=rf"download interrupted \(connection closed after 1000 of {len(data)} bytes\); "
                                      "run again to resume"):  # fmt: skip
        download_squad("1.1", tmp_path, base_url=server, checksums={"dev-v1.1.json": SUMS["dev-v1.1.json"]})
    assert (tmp_path / "train-v1.1.json.part").read_bytes() == data[:1000]
    Handler.cut_after = None
    paths = download_squad("1.1", tmp_path, base_url=server, checksums={"dev-v1.1.json": SUMS["dev-v1.1.json"]})
    assert [p.read_bytes() for p in paths] == [data, FILES["dev-v1.1.json"]]
    # A mirror's own sums go without the published sizes (its files may be other bytes): the checksum decides.
    (tmp_path / "train-v1.1.json").unlink()
    Handler.cut_after = 1000
    with pytest.raises(ValueError, match="sha256 mismatch"):
        download_squad("1.1", tmp_path, base_url=server, checksums={**SUMS, "train-v1.1.json": SUMS["dev-v1.1.json"]})


@pytest.mark.parametrize("portal", ["portal", "chunked portal"])
def test_a_page_in_place_of_a_file_of_known_size_is_not_kept(server, tmp_path, monkeypatch, portal):
    """A captive portal's page (200, with its length or in chunks) was kept as the .part, reported as a dropped
    connection to resume from, which every run then repeated, and the real file was later appended to it."""
    from bertqa.squad import download

    data = FILES["train-v1.1.json"]
    monkeypatch.setitem(download.SQUAD_SHA256, "train-v1.1.json", SUMS["train-v1.1.json"])  # as if published
    monkeypatch.setitem(download.SQUAD_SIZES, "train-v1.1.json", len(data))
    Handler.resume = portal
    with pytest.raises(OSError, match=rf"^{server}train-v1.1.json: the server sent 57 bytes from byte 0 \(text/html\) "
                                      rf"of a {len(data)}-byte file; nothing was kept$"):  # fmt: skip
        download_squad("1.1", tmp_path, base_url=server, checksums={"dev-v1.1.json": SUMS["dev-v1.1.json"]})
    assert list(tmp_path.iterdir()) == []
    part = tmp_path / "train-v1.1.json.part"  # and sent for a resume: the .part stays as it was
    part.write_bytes(data[:3000])
    with pytest.raises(OSError, match=rf"train-v1.1.json: the server .*\(text/html\).*; {re.escape(str(part))} kept"):
        download_squad("1.1", tmp_path, base_url=server, checksums={"dev-v1.1.json": SUMS["dev-v1.1.json"]})
    assert part.read_bytes() == data[:3000]
    part.unlink()
    Handler.resume = None
    paths = download_squad("1.1", tmp_path, base_url=server, checksums={"dev-v1.1.json": SUMS["dev-v1.1.json"]})
    assert paths[0].read_bytes() == data


def test_where_chmod_is_refused_a_download_replaces_a_stale_file(server, tmp_path, chmod_refused):
    """The .part replacing a stale file was given that file's mode with a chmod some file systems refuse."""
    (tmp_path / "dev-v1.1.json").write_bytes(b"stale")
    paths = download_squad("1.1", tmp_path, base_url=server, checksums=SUMS)
    assert [p.read_bytes() for p in paths] == [FILES[p.name] for p in paths]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dev-v1.1.json", "train-v1.1.json"]


def test_on_windows_a_download_completes_and_a_bad_one_keeps_nothing(server, tmp_path, like_windows):
    """(review) The .part stayed open (and locked) while it was deleted or renamed, which Windows refuses for a file
    its process holds open: every download failed at its last rename, and again on every rerun; a checksum
    mismatch left the bad .part and was reported as 'Permission denied'."""
    paths = download_squad("1.1", tmp_path / "ok", base_url=server, checksums=SUMS)
    assert [p.read_bytes() for p in paths] == [FILES[p.name] for p in paths]
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == ["dev-v1.1.json", "train-v1.1.json"]
    with pytest.raises(ValueError, match="dev-v1.1.json: sha256 mismatch"):
        download_squad("1.1", tmp_path / "bad", base_url=server, checksums={**SUMS, "dev-v1.1.json": "0" * 64})
    assert sorted(p.name for p in (tmp_path / "bad").iterdir()) == ["train-v1.1.json"]
    # A stale read-only file in its place (Windows replaces none): replaced, keeping its mode; the .part was left.
    (tmp_path / "ok" / "dev-v1.1.json").write_bytes(b"stale")
    (tmp_path / "ok" / "dev-v1.1.json").chmod(0o444)
    paths = download_squad("1.1", tmp_path / "ok", base_url=server, checksums=SUMS)
    assert paths[1].read_bytes() == FILES["dev-v1.1.json"] and paths[1].stat().st_mode & 0o777 == 0o444
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == ["dev-v1.1.json", "train-v1.1.json"]
    Handler.cut_after = 0
    with pytest.raises(OSError, match="download failed") as err:  # nothing came: no empty .part kept
        download_squad("1.1", tmp_path / "none", base_url=server, checksums=SUMS)
    assert "resume" not in str(err.value) and list(tmp_path.glob("none/*")) == []
