"""Atomic writes: a file or folder appears under its final name complete, or not at all.

Everything bertqa writes (predictions, summaries, feature caches, checkpoints, model folders, plots, ONNX
graphs) goes through here. No torch, so the pure-Python SQuAD code uses it too.
"""

from __future__ import annotations

import errno
import glob
import io
import json
import logging
import math
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
import unicodedata
from contextlib import ExitStack, contextmanager, nullcontext, suppress
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX (Windows): no locks are taken (_NoLocks)
    fcntl = None
try:  # (imported here, not where a limit is read: out of file descriptors, an import fails)
    import resource
except ImportError:  # not POSIX (Windows): no limits (soft_limit)
    resource = None

LFS_POINTER = b"version https://git-lfs.github.com/spec/"  # how a Git LFS pointer file starts (one in weights' place)


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_log = logging.getLogger("bertqa")

# Read once: changing the umask to read it is process-wide, and another thread may be creating files.
_UMASK = _read_umask()


NAME_MAX = 255  # bytes in one file name (Linux and macOS file systems)


def _fit(name: str, decoration: int) -> str:
    """`name`, cut short (whole characters) if need be, so that a temporary name made of it and `decoration`
    more bytes (dots, a random part, `.tmp`) still fits NAME_MAX: an output whose own name is legal can be
    written."""
    while len(os.fsencode(name)) + decoration > NAME_MAX:
        name = name[:-1]
    return name


def _target(path: str | os.PathLike) -> Path:
    """Where to write `path`: a symlink's target, as a shell's `>` writes it (replacing the link itself with a
    file would leave what it points to stale)."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def files_beside(path: str | os.PathLike, suffixes) -> list[Path]:
    """The files written beside the output `path`, its name with each of `suffixes` instead: beside where it lands
    (a symlink's target), not beside the link, so that they land together, as one set."""
    return [_target(path).with_suffix(s) for s in suffixes]


def remove_output(path: str | os.PathLike) -> None:
    """Remove an earlier run's output file, if any. Through a symlink the target goes and the link stays, so that
    the next write of `path` lands where the link points again, as the writes here do (the link replaced by a
    plain file would leave its target stale)."""
    target = _target(path)
    _even_read_only(lambda: target.unlink(missing_ok=True), target)


def _tmp_file_prefix(path: Path) -> str:
    # mkstemp adds 8 random characters; ".", ".", ".tmp" and the suffix come with them
    return f".{_fit(path.stem, 14 + len(os.fsencode(path.suffix)))}."


def _tmp_dir_prefix(path: Path, kind: str) -> str:
    return f".{_fit(path.name, 14)}.{kind}-"  # kind: "tmp" or "old"; mkdtemp adds 8 random characters


def _temporary(make, path: Path, made=(), **kwargs):
    """make(**kwargs): tempfile's mkstemp or mkdtemp, for a write to `path`. Where it fails (a folder one may not
    write in) the error names `path`, not the temporary name, and the folders made for the write (_make_folder's
    `made`) are removed again."""
    try:
        return make(**kwargs)
    except OSError as e:
        _remove_empty(made)
        raise named(e, path) from e


def _even_read_only(call, name) -> None:
    """call(), a deletion of `name` or a rename onto it; where that is refused and `name` is a read-only file,
    again once it is made writable (Windows deletes or replaces no read-only file; POSIX asks the folder, not the
    file), its mode put back should that fail too."""
    try:
        call()
    except PermissionError as refused:
        try:
            mode = os.lstat(name).st_mode
        except OSError:
            mode = None
        if mode is None or stat.S_ISLNK(mode) or mode & stat.S_IWRITE:
            raise
        try:
            os.chmod(name, stat.S_IMODE(mode) | stat.S_IWRITE)
        except OSError:  # (another user's file: the refusal itself is what to tell)
            raise refused from None
        try:
            call()
        except BaseException:
            os.chmod(name, stat.S_IMODE(mode))
            raise


def open_to_append(path: str | os.PathLike):
    """`path` opened to append, unbuffered; a read-only file of this user's made writable for the open alone (its
    mode then put back: the open file stays writable)."""
    try:
        return open(path, "ab", buffering=0)
    except PermissionError as refused:
        mode = os.stat(path).st_mode
        if mode & stat.S_IWUSR or not stat.S_ISREG(mode):
            raise
        try:
            os.chmod(path, stat.S_IMODE(mode) | stat.S_IWUSR)
        except OSError:  # (another user's file)
            raise refused from None
        try:
            return open(path, "ab", buffering=0)
        finally:
            os.chmod(path, stat.S_IMODE(mode))


def remove_tree(path: str | os.PathLike, ignore_errors: bool = True) -> None:
    """shutil.rmtree, read-only files included where the system refuses to delete them (Windows)."""

    def again(func, name, error):
        try:
            if func not in (os.unlink, os.remove, os.rmdir):
                raise error
            _even_read_only(lambda: func(name), name)
        except OSError:
            if not ignore_errors:
                raise

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=again)
    else:
        shutil.rmtree(path, onerror=lambda func, name, exc_info: again(func, name, exc_info[1]))


def set_mode(path: str | os.PathLike, mode: int) -> None:
    """os.chmod of a file or folder this process made, where the file system keeps modes: one that keeps none may
    refuse the change (a FUSE-mounted FAT image says ENOSYS, network mounts EPERM or ENOTSUP), and what was written
    is kept all the same, with the mode that file system gives every file."""
    try:
        os.chmod(path, mode)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise


@contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = False, within: Path | None = None):
    """Yield a temporary path beside `path` to write to; on success it is renamed onto `path` (atomic on one
    file system), on any exception it is removed and `path` keeps what it had. `durable`: the file and then
    the rename are flushed to disk (fsync), so that a power loss, not only a killed process, leaves either the
    old file or the new one (for checkpoints; it costs the time the disk takes). `within`: a folder on the
    same file system (a `scratch_dir` for `path`) to make the temporary file in instead. The temporary file is
    locked while in use: write into it, not a new file renamed onto its name (which no lock would hold)."""
    path = _target(path)
    made = _make_folder(path.parent)
    prefix, suffix = _tmp_file_prefix(path), f".tmp{path.suffix}"
    if within is None:  # (a scratch folder's own killed contents go with it)
        clear_killed_files(path.parent, prefix, suffix)
    # The suffix is kept, so libraries that infer the format from the name (savefig, np.savez) still can.
    tmp, fd = _locked_temp_file(path, made, dir=within or path.parent, prefix=prefix, suffix=suffix)
    try:
        yield Path(tmp)
        # mkstemp makes it 0600: give it the mode of the file it replaces, else the one a plain open() would.
        set_mode(tmp, stat.S_IMODE(path.stat().st_mode) if path.is_file() else 0o666 & ~_UMASK)
        if durable:
            fsync_path(tmp)
        _even_read_only(lambda: os.replace(tmp, path), path)
    except BaseException as e:
        _even_read_only(lambda: Path(tmp).unlink(missing_ok=True), tmp)
        _remove_empty(made)  # the folders made for it: nothing was written there
        if isinstance(e, OSError) and e.strerror and (e.filename is None or os.fspath(e.filename) == tmp):
            # A write's or an fsync's error (a full disk) names no file, or names the temporary one: name the file.
            raise named(e, path) from e
        raise
    finally:
        if fd is not None:
            os.close(fd)
    if durable:
        fsync_path(path.parent)


def utf8_name(path: str | os.PathLike) -> bool:
    """Whether `path` is UTF-8 (a byte of a name that is not is held as a surrogate escape): libraries that take
    a path as a UTF-8 string (tokenizers, safetensors, onnxruntime, TensorBoard) refuse one that is not."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# Where str.splitlines ends a line: a name holding one would end an error line or a note part-way.
_LINE_BREAK = re.compile("[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]")
_names_with_breaks: list[str] = []


def show_names_of(argv) -> None:
    """Have one_line() escape the line breaks in the names of files and folders `argv` gives (a command's
    arguments: "a\\nb.json"), wherever a message or a note names them, whole or in a path made of them."""
    parts = {part for arg in argv for part in re.split(r"[/\\=]", str(arg)) if _LINE_BREAK.search(part)}
    _names_with_breaks[:] = sorted(parts, key=len, reverse=True)


def one_line(text: str) -> str:
    """`text` with the line breaks of the names show_names_of() was given escaped (as "\\n")."""
    for name in _names_with_breaks:
        text = text.replace(name, _LINE_BREAK.sub(lambda m: ascii(m[0])[1:-1], name))
    return text


def note(line: str) -> None:
    """`line` on stdout: a note of what a command does or did (not its result, which must come out exact or fail),
    with what stdout's encoding cannot hold escaped (`\\xe9`), as stderr writes it: a note naming a file, written
    after that file, never fails the command."""
    if sys.stdout is None:
        return
    line = one_line(line)
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    try:
        line.encode(encoding)
    except UnicodeEncodeError:
        line = line.encode(encoding, "backslashreplace").decode(encoding)
    except LookupError:  # (a stream naming an encoding Python does not know: written as it is)
        pass
    # A progress bar being drawn where the note goes (a terminal, a `>log 2>&1`): the note was written at the end of
    # the bar's line. On a terminal (or a notebook) the bar is cleared first; in a file or a pipe, where clearing is
    # more text on that line, the line is ended first. Either way it is drawn again after, so that the next note
    # finds it so; all under tqdm's lock, which its monitor thread takes to draw. (Asked only where tqdm is in use:
    # its lock is a process's.)
    tqdm = sys.modules.get("tqdm")
    bars = list(getattr(tqdm.tqdm, "_instances", None) or []) if tqdm is not None else []
    if not bars:
        print(line, flush=True)
        return
    out, files = _log_file(sys.stdout), [_log_file(bar.fp) for bar in bars]
    in_file = [bar for bar, file in zip(bars, files) if out and file and os.path.samestat(file, out)]
    if not in_file:  # (a bar in a log of its own, `2>err.log`, is left alone: clearing it there is text too)
        in_place = None in files
        with tqdm.tqdm.external_write_mode(file=sys.stdout) if in_place else nullcontext():
            print(line, flush=True)
        return
    with tqdm.tqdm.get_lock():
        for bar in in_file:
            with suppress(OSError, ValueError):
                bar.fp.write("\n")
                bar.fp.flush()
        print(line, flush=True)
        for bar in in_file:
            with suppress(OSError, ValueError):
                bar.refresh(nolock=True)


def _log_file(stream) -> os.stat_result | None:
    """The file or pipe that `stream` writes to, where it is the OS's (a text file, seen through tqdm's and the
    command line's wrappers) and no terminal; None for a terminal, a notebook's stream, a StringIO."""
    for _ in range(3):  # (tqdm's DisableOnWriteError holds it as _wrapped, cli._Stdout as stream)
        if isinstance(stream, io.TextIOWrapper):
            break
        stream = getattr(stream, "_wrapped", None) or getattr(stream, "stream", None)
    if not isinstance(stream, io.TextIOWrapper):
        return None
    try:
        if stream.closed:
            return None
        fd = stream.fileno()
        return None if os.isatty(fd) else os.fstat(fd)
    except (OSError, ValueError):  # (a wrapper whose buffer was detached, a stream of no file)
        return None


def bar_options() -> dict:
    """tqdm's options for a progress bar on stderr: its defaults, but in a file or a pipe (a log, where every update
    stays as text on one line) one update every 30 s at most (tqdm's monitor thread draws after its maxinterval
    too). A notebook's stream, which redraws the bar in place, is no file."""
    return {"mininterval": 30.0, "maxinterval": 30.0} if _log_file(sys.stderr) is not None else {}


class NoBar:
    """A progress bar that is off. A disabled tqdm bar would still start tqdm's monitor thread, which stays for the
    rest of the process: an API call with its bar off leaves no thread behind."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def soft_limit(name: str) -> float | None:
    """The process's soft limit `name` (a resource.RLIMIT_* name: what `ulimit` sets), math.inf where unlimited,
    None where the system has no such limit (Windows)."""
    which = getattr(resource, name, None)
    if which is None:
        return None
    soft = resource.getrlimit(which)[0]
    return math.inf if soft == resource.RLIM_INFINITY else soft


def first_line(e: BaseException) -> str:
    """An exception's message, its first line, for a one-line error; its type's name if it has none."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def named(e: OSError, path) -> OSError:
    """`e` naming `path`: a write's or an fsync's OSError (a full disk, an I/O error) names no file."""
    return OSError(e.errno, e.strerror, str(path))


# fsync errors by which some file systems say they cannot flush a folder's entries (a file's are errors all the same)
_CANNOT_FSYNC = {errno.EINVAL, getattr(errno, "ENOTSUP", None), getattr(errno, "EOPNOTSUPP", None)}


def fsync_path(path) -> None:
    """Flush a file, or a folder's entries, to disk. Windows flushes only a file opened for writing and cannot open
    a folder so; a file system that cannot flush a folder says EINVAL: those are skipped."""
    try:
        fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)
    except (IsADirectoryError, PermissionError):
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _CANNOT_FSYNC or not stat.S_ISDIR(os.fstat(fd).st_mode):  # a file's data must reach the disk
            raise named(e, path) from e
    finally:
        os.close(fd)


def check_output(output: str | os.PathLike, suffix: str, beside: tuple[str, ...] = (), inputs: dict | None = None
                 ) -> Path:  # fmt: skip
    """`--output` checked before any work is done: it ends in `suffix`, neither it nor the files written beside
    it (its name with each suffix of `beside` instead) is a folder or one of the run's `inputs` ({flag: path}),
    and the folder it goes in can be written."""
    path = Path(output)
    if path.suffix != suffix:  # (".json" alone has no suffix: a hidden file's name)
        why = f"name the file before the {suffix}" if path.name == suffix else f"must end in {suffix}"
        raise ValueError(f"--output {output}: {why}")
    others = files_beside(path, beside)
    for other in [path, *others]:  # (in a folder still to be made, a name too long failed after the work)
        if len(os.fsencode(other.name)) > NAME_MAX:
            what = "the file" if other == path else f"{other.name[-40:]!r}, written beside it,"
            raise ValueError(f"--output {output}: the name of {what} is longer than {NAME_MAX} bytes; name a "
                             "shorter file")  # fmt: skip
    if path.is_dir():
        raise ValueError(f"--output {output}: is a folder; name the {suffix} file to write")
    for other in others:
        if other.is_dir():
            raise ValueError(f"--output {output}: {other}, written beside it, is a folder")
        check_no_link_loop(other, f"--output {output}")
    check_no_link_loop(path, f"--output {output}")
    check_no_dangling_link(path.parent, f"--output {output}: its folder")
    check_not_inputs([path, *others], inputs, f"--output {output}")
    _check_writable(_target(path).absolute().parents, f"--output {output}")  # (where a link to a file leads)
    return path


# The files of a model folder: those bertqa writes (save_pretrained, and a training run's own record), and the
# other config, weight and tokenizer files of HF's and NVIDIA's folders, matched whatever their case (some file
# systems ignore it).
MODEL_FILE = re.compile(
    r"(bert_|run_)?config\.json|(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?|"
    r"tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|added_tokens\.json|vocab\.txt",
    re.IGNORECASE,
)


def not_a_model_folder(path: Path) -> str | None:
    """Why the existing `path` may not be replaced whole by a model folder, or None: it may be an empty folder or
    a model folder (a config.json, and only a model's files)."""
    if not path.is_dir():
        return "a file"
    names = sorted(p.name for p in path.iterdir())
    other = next((name for name in names if not MODEL_FILE.fullmatch(name)), None)
    if other is not None:
        return f"it holds {other}, not a model's file"
    if names and "config.json" not in names:
        return "no config.json"
    return None


def check_not_inputs(outputs, inputs: dict | None, what: str) -> None:
    """Refuse, before any work, a run that would write over one of its own inputs ({flag: path}; an unset
    flag's None is skipped): an output (a file, or a folder replaced whole) that is the input or holds it, where
    symbolic links lead (files are written through them), or that is a model file (MODEL_FILE) of an input folder,
    or of the folder of a --model file (its config and tokenizer are read beside the weights)."""
    for flag, given in (inputs or {}).items():
        if not given:
            continue
        real = real_path(given)
        # (the folder the loader reads: a --model file's own, not that of the file its link leads to)
        folder = real if real.is_dir() else real_path(Path(given).absolute().parent) if flag == "--model" else None
        for out in outputs:
            resolved = real_path(out)
            if resolved in (real, *real.parents) or (folder is not None and resolved in (folder, *folder.parents)):
                raise ValueError(f"{what}: this run would write {out} over {flag} {given}, its own input")
            if folder is not None and _model_file_of(Path(out), folder):
                raise ValueError(f"{what}: this run would write {out} over a file it reads from {flag} {given}")


def _model_file_of(path: Path, folder: Path) -> bool:
    """Whether `path` is, or would be written as, a model file of `folder`: a model file's name in it, or (links
    followed, as an HF cache's snapshot links each file to a blob) where one of its model files leads. (A hard
    link is no such file: the output replaces its name, not the file.)"""
    if MODEL_FILE.fullmatch(path.name) and real_path(path.absolute().parent) == folder:
        return True
    if not path.is_symlink() and not any(p.is_symlink() for p in path.absolute().parents):
        return False
    target = real_path(path)
    return any(MODEL_FILE.fullmatch(name) and real_path(folder / name) == target for name in _listed(folder) or ())


def real_path(path: str | os.PathLike) -> Path:
    """Where `path` leads, links followed, each name spelled as its folder lists it, so that two paths to one file
    compare equal: a file system that ignores case or Unicode normalisation (macOS's and FAT drives' by default)
    finds data/dev.json as Data/DEV.json too, and writing either replaces the one file. A link loop is left as it
    is (Path.resolve() raises RuntimeError on one in Python 3.11, which read as an internal error)."""
    real = Path(os.path.realpath(path))
    spelled = Path(real.anchor)
    for name in real.parts[1:]:
        spelled /= _as_listed(spelled, name)
    return spelled


def _as_listed(folder: Path, name: str) -> str:
    """`name` as `folder` lists it: itself where listed or missing, else the one listed name the same but for case
    and Unicode normalisation (only where the file system found it by a name it does not list)."""
    names = _listed(folder) or []
    if name in names or not os.path.lexists(folder / name):  # (listed, or missing: or a folder that may not be listed)
        return name
    same = [listed for listed in names if _folded(listed) == _folded(name)]
    return same[0] if len(same) == 1 else name


def _folded(name: str) -> str:
    return unicodedata.normalize("NFD", name).casefold()


def path_key(path: str | os.PathLike) -> Path:
    """real_path(path), folded where its file system ignores case: to compare paths part of which does not exist yet
    (real_path leaves such names as given, and there out/Summary.json and out/summary.json are one file once made;
    where case counts, two)."""
    real = real_path(path)
    return Path(_folded(os.fspath(real))) if ignores_case(real) else real


def ignores_case(path: Path) -> bool:
    """Whether the file system at `path` (its nearest existing folder) finds a name whatever its case (macOS's and
    FAT drives' by default; never Linux's own): the first ASCII name with a letter, of those in that folder (else
    the folder's own, or a folder's above it on the same drive), found with its case swapped though not listed so.
    True where no name on that drive tells (an empty drive): two names are then taken for one, at worst a refusal
    where none was needed, never a write into another's."""
    folder = next(p for p in (path, *path.parents) if os.path.isdir(p))
    pairs = [(folder, name) for name in _listed(folder) or ()]
    device = _device(folder)
    for level in (folder, *folder.parents):
        if not level.name or _device(level.parent) != device:  # (a drive's root: its name is on the drive above)
            break
        pairs.append((level.parent, level.name))
    for place, name in pairs:
        swapped = name.swapcase()
        if not name.isascii() or swapped == name:  # (Linux's vfat ignores the case of ASCII letters only)
            continue
        listed = _listed(place)
        if listed is not None:  # (a folder that cannot be listed tells nothing)
            return swapped not in listed and os.path.lexists(place / swapped)
    return True


def _device(path: Path) -> int | None:
    try:
        return os.stat(path).st_dev
    except OSError:
        return None


def _listed(folder: Path) -> list[str] | None:
    """The names in `folder`; None where it cannot be listed (missing, or not readable)."""
    try:
        return os.listdir(folder)
    except OSError:
        return None


def check_no_link_loop(path: Path, flag: str) -> None:
    """Refuse, before any work, an output that is (or lies in) a symbolic link loop: writing it fails, after the
    work, with "Too many levels of symbolic links"."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ValueError(f"{flag}: {path} is, or lies in, a symbolic link loop") from None


def first_present(folder: Path, names) -> Path | None:
    """The first of the files `names` in `folder` (None where none is): a link among them that leads to nothing (an
    HF cache whose blob was removed or never finished) is refused, not passed over as no file, which named no
    cause, or read the next file in its place."""
    for name in names:
        path = folder / name
        if path.is_file():
            return path
        if path.is_symlink() and not path.exists():
            raise FileNotFoundError(f"{path}: a symbolic link to {os.readlink(path)}, which does not exist (an "
                                    "unfinished download, or a cleaned cache?)")  # fmt: skip
    return None


def not_a_file(what: str, path) -> Exception:
    """The error for `path`, no regular file, given as the input file `what` names: missing ('' too, which Path
    reads as the current folder), a folder, or a pipe or device (<(...) say: not called missing)."""
    if os.fspath(path) and Path(path).is_dir():
        return ValueError(f"{what}: is a folder, not a file")
    if os.fspath(path) and Path(path).exists():
        return ValueError(f"{what}: is not a regular file (a pipe or a device); give a file")
    return FileNotFoundError(f"{what}: no such file")


def check_no_dangling_link(path: Path, flag: str) -> None:
    """Refuse a folder to make whose path, or a folder above it, is a symbolic link to nothing (mkdir says only
    "File exists")."""
    link = next((p for p in (path, *path.parents) if p.is_symlink() and not p.exists()), None)
    if link == path:
        raise ValueError(f"{flag} {path}: a symbolic link to nothing")
    if link is not None:
        raise ValueError(f"{flag} {path}: {link} is a symbolic link to nothing")


def check_output_dir(output_dir: str | os.PathLike, flag: str = "--output-dir", writes: tuple[str, ...] = (),
                     inputs: dict | None = None) -> Path:  # fmt: skip
    """An output folder checked before any work is done: not a file, none of the files the run `writes` there
    (names; a model folder's, which the run replaces whole, ends in "/") is a folder or one of its `inputs`
    ({flag: path}), no model folder it writes is there as anything but an empty or model folder (the user's own
    files would go with it), and it (or the folder it will be made in) can be written."""
    if not str(output_dir):  # Path("") would be the current folder
        raise ValueError(f"{flag} '': empty; name the folder to write in")
    path = Path(output_dir)
    check_no_link_loop(path, flag)
    check_no_dangling_link(path, flag)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {output_dir}: is a file, not a folder")
    for name in writes:
        if not name.endswith("/") and (path / name).is_dir():
            raise ValueError(f"{flag} {output_dir}: {path / name}, which this run writes, is a folder")
        check_no_link_loop(path / name, f"{flag} {output_dir}")
    check_not_inputs([path / name for name in writes], inputs, f"{flag} {output_dir}")
    for name in writes:
        why = name.endswith("/") and (path / name).exists() and not_a_model_folder(path / name)
        if why:
            raise ValueError(f"{flag} {output_dir}: {path / name} exists and is not a model folder ({why}), and this "
                             "run replaces it whole with its model; move it, or name another folder")  # fmt: skip
        if name.endswith("/") and (path / name).is_dir() and not os.access(path / name, os.W_OK | os.X_OK):
            # (a folder moved to another folder is written in: its ".." changes)
            raise ValueError(f"{flag} {output_dir}: {path / name} cannot be replaced: it is not writable here")
        if name.endswith("/") and holds_current_folder(path / name):
            raise ValueError(f"{flag} {output_dir}: {path / name} holds the current folder, which replacing it would "
                             "delete; run from another folder")  # fmt: skip
        if name.endswith("/"):  # (an evaluate's --output-dir there: it would write on into the new model folder)
            check_not_claimed(path / name, f"{flag} {output_dir}", above=False)
    _check_writable([path.absolute(), *path.absolute().parents], f"{flag} {output_dir}")
    check_not_claimed(path, f"{flag} {output_dir}", itself=False)  # (itself: exclusive() says so)
    return path


def holds_current_folder(folder: str | os.PathLike) -> bool:
    """Whether `folder` is the current folder or lies above it (a folder replaced whole would take it along)."""
    cwd = real_path(Path.cwd())
    return real_path(folder) in (cwd, *cwd.parents)


def _check_writable(candidates, what: str) -> None:
    """The first of `candidates` that exists must be a folder this process can write in."""
    folder = next((p for p in candidates if p.exists()), None)
    if folder is None or not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{what}: cannot write in {folder}")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="\n")  # (the same bytes on Windows)


def write_json(path: str | os.PathLike, obj, indent: int | None = 4) -> None:
    write_text(path, _json_text(obj, indent))


def write_json_files(files: dict, remove=(), indent: int | None = 4) -> None:
    """Write {path: obj} as one set. Each file goes to a temporary one first; only once all are written are the
    paths in `remove` deleted (an earlier set's files that would not belong with this one) and the files renamed
    into place, one after another in reverse order: the first path lands last. A failure while writing (a value
    JSON cannot hold, a full disk) leaves every file as it was; the renames are quick, but not one atomic step, so
    Ctrl-C and SIGTERM wait until they are done (deferred_signals)."""
    with ExitStack() as renames:
        for path, obj in files.items():
            tmp = renames.enter_context(atomic_path(path))
            tmp.write_text(_json_text(obj, indent), encoding="utf-8")
        with deferred_signals():
            for path in remove:
                remove_output(path)
            renames.close()


@contextmanager
def deferred_signals():
    """SIGINT and SIGTERM held back while the block runs, delivered when it ends (Ctrl-C then interrupts after the
    block, not in it). Python runs signal handlers in the main thread only: elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    # SIGINT's hold first and its handler back last: a Ctrl-C between two of these steps is held, or raises once
    # every other handler is back.
    signals = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not None]  # None: set from C
    handlers = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in signals}
    try:
        yield
    finally:
        for s in reversed(signals):
            signal.signal(s, handlers[s])
        _deliver(sorted(set(pending), key=signals.index, reverse=True))  # SIGTERM first


def _deliver(signals: list) -> None:
    """Raise each signal to the handler it was meant for, every one even when one raises (Ctrl-C:
    KeyboardInterrupt)."""
    if signals:
        try:
            signal.raise_signal(signals[0])
        finally:
            _deliver(signals[1:])


def _json_text(obj, indent: int | None) -> str:
    return json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False) + "\n"  # JSON has no NaN


@contextmanager
def atomic_dir(path: str | os.PathLike, durable: bool = False, replaced=None):
    """Yield an empty temporary folder beside `path`; on success it replaces `path` whole (the old folder,
    if any, is moved aside first and deleted after), on failure it is deleted and `path` is untouched. Both
    folders are locked while in use, so that those of a write to `path` that was killed outright are cleared
    first (clear_killed), the previous version put back where the write was killed between its renames.
    `durable`: everything in the folder, then the folder, is flushed to disk before the renames, and the renames
    before the old folder is deleted, so that a power loss leaves the old folder or the new one (model folders:
    the old one is the user's previous model). `replaced()`, if given, runs once the new folder is in place, before
    a Ctrl-C or SIGTERM that came meanwhile is delivered (SIGTERM's default ends the process at once, running no
    `finally:`): what must change with the folder changes with it."""
    if replaced is not None and not callable(replaced):
        raise TypeError(f"replaced must be a function (or None), not {type(replaced).__name__}")
    # Absolute, as the kernel reads it: relative names would be looked up in a current folder moved aside, and ".."
    # after a link is the parent of where the link leads (the checks before the run saw that folder), not of the link.
    path = _target(path)
    path = Path(os.path.realpath(path.parent)) / path.name
    made = _make_folder(path.parent)
    clear_killed(path.parent, _tmp_dir_prefix(path, "old"), restore=path)
    clear_killed(path.parent, _tmp_dir_prefix(path, "tmp"))
    tmp, fd = _locked_temp_dir(path, _tmp_dir_prefix(path, "tmp"), made)
    old_fd = None
    done = False
    try:
        try:
            yield tmp
            # mkdtemp makes it 0700, and files a library wrote through its own temporary file are 0600
            # (safetensors): the modes of the folder and files replaced, as atomic_path keeps a file's, else those
            # a plain mkdir / open() would give, without the group and other permissions the old folder withheld.
            old_mode = stat.S_IMODE(path.stat().st_mode) if path.is_dir() else None
            set_mode(tmp, 0o777 & ~_UMASK if old_mode is None else old_mode)
            entries = sorted(tmp.rglob("*"), reverse=True)  # files and subfolders before their folder
            for inner in entries:
                if inner.is_file() and not inner.is_symlink():
                    mode = 0o666 & ~_UMASK & (0o777 if old_mode is None else old_mode | 0o700)
                    try:  # (the replaced file's own mode, a plain file's: not one a link leads to, if it leads)
                        was = os.lstat(path / inner.relative_to(tmp))
                        mode = stat.S_IMODE(was.st_mode) if stat.S_ISREG(was.st_mode) else mode
                    except OSError:
                        pass
                    set_mode(inner, mode)
            if durable:
                for inner in entries:
                    fsync_path(inner)
                fsync_path(tmp)
        except OSError as e:  # a write's or a flush's error names no file, or one in the temporary folder
            inner = None if e.filename is None else Path(os.fspath(e.filename))
            if e.strerror and (inner is None or inner.is_relative_to(tmp)):
                raise named(e, path if inner is None else path / inner.relative_to(tmp)) from e
            raise
        old = None
        with deferred_signals():  # no Ctrl-C between the renames (the folder would be missing) or before the old goes
            if path.exists():
                old, old_fd = _locked_temp_dir(path, _tmp_dir_prefix(path, "old"))
                try:
                    path.rename(old / path.name)
                except BaseException as e:
                    old.rmdir()  # (empty: the folder did not move)
                    if isinstance(e, OSError) and e.strerror:  # (a folder not writable: its own name, not the gone one)
                        raise named(e, path) from e
                    raise
                old = old / path.name
            try:
                tmp.rename(path)
            except BaseException:
                if old is not None:
                    old.rename(path)  # put the previous folder back
                    old.parent.rmdir()
                raise
            done = True
            try:
                if durable:
                    fsync_path(path.parent)
                if old is not None:
                    remove_tree(old.parent)
            finally:  # (the new folder is in place, whatever fails after)
                if replaced is not None:
                    replaced()
    finally:
        remove_tree(tmp)
        for held in (fd, old_fd):
            if held is not None:
                os.close(held)
        if not done:
            _remove_empty(made)


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete what `atomic_path(path)` or `atomic_dir(path)` leave beside `path` when their process is killed
    outright (SIGKILL, power loss) mid-write, a temporary file or folder, and return those; a folder killed between
    atomic_dir's two renames is missing, its previous version moved aside: that version is put back. What a live
    process is writing is locked, and left alone; where locks cannot be taken (Windows, some network file
    systems) nothing is deleted."""
    path = _target(path)
    return sorted([*clear_killed(path.parent, _tmp_dir_prefix(path, "old"), restore=path),
                   *clear_killed(path.parent, _tmp_dir_prefix(path, "tmp")),
                   *clear_killed_files(path.parent, _tmp_file_prefix(path), f".tmp{path.suffix}")])  # fmt: skip


class _NoLocks(Exception):
    """The file system takes no lock (some NFS and FUSE mounts, on a folder), or this is not POSIX."""


def locks_exist() -> bool:
    """Whether this system has file locks (flock): POSIX's fcntl, not Windows."""
    return fcntl is not None


def _flock(fd: int, shared: bool = False) -> bool:
    """Take the lock of an open file or folder without waiting (`shared`: one that others' shared ones do not
    exclude): False where another process holds it. _NoLocks where locks cannot be taken here at all."""
    if not locks_exist():
        raise _NoLocks
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        raise _NoLocks from None
    return True


def _lock(path: Path, folder: bool = True) -> int | None:
    """An open descriptor of `path` (a folder, or a file opened for writing: network file systems lock only
    those) holding its lock (flock: no file is left behind, and the system drops it when the process dies), or
    None where another process holds it or it went away. _NoLocks where locks cannot be taken here at all."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if folder else os.O_RDWR | getattr(os, "O_NOFOLLOW", 0)
    if not locks_exist():  # (before the open: Windows opens no folder, PermissionError)
        raise _NoLocks
    try:
        fd = os.open(path, flags)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        if _flock_named(fd, path):
            return fd
    except _NoLocks:
        os.close(fd)
        raise
    os.close(fd)
    return None


def _flock_named(fd: int, path: str | os.PathLike) -> bool:
    """_flock(fd), and `path` still names the file locked: it may have been deleted (and another made under its
    name), or renamed, between the open and the lock. Followed through a symlink, as an open is: a linked output
    folder is the folder it points to."""
    if not _flock(fd):
        return False
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def _made_by_tempfile(folder: Path, prefix: str, suffix: str = "") -> list[Path]:
    """What tempfile's mkstemp or mkdtemp made in `folder` with this prefix and suffix (8 random characters between),
    not the temporary files of another output whose name begins with this one's ("model.old-1" beside "model")."""
    name = re.compile(f"{re.escape(prefix)}[a-z0-9_]{{8}}{re.escape(suffix)}")
    return sorted(p for p in folder.glob(f"{glob.escape(prefix)}*") if name.fullmatch(p.name))


def _unheld(folder: Path, prefix: str, suffix: str = "", folders: bool = True):
    """The temporary folders (or files) `prefix`XXXXXXXX`suffix` in `folder` that no live process holds locked,
    each yielded while this process holds its lock. Where locks cannot be taken (Windows, some network file
    systems) none."""
    for tmp in _made_by_tempfile(folder, prefix, suffix):
        if folders and (not tmp.is_dir() or tmp.is_symlink()):
            continue
        try:
            held = _lock(tmp, folder=folders)
        except _NoLocks:
            return
        except OSError:  # a link or a folder by a file's name, another user's: not ours to judge
            continue
        if held is None:
            continue
        try:
            yield tmp
        finally:
            os.close(held)


def clear_killed(folder: Path, prefix: str, restore: Path | None = None) -> list[Path]:
    """Delete the folders named `prefix`* in `folder` that no live process holds locked: left by a process killed
    outright (SIGKILL, power loss); return those. `restore`: the output of the atomic_dir whose previous version
    such a folder may hold (killed between its two renames): put back first where the output is missing. Where
    locks cannot be taken (Windows, some network file systems) nothing is cleared."""
    removed = []
    for old in _unheld(folder, prefix):
        try:
            names = [p.name for p in old.iterdir()]
        except OSError:  # removed meanwhile: the writer whose lock this took made it, and tries another
            continue
        if restore is not None and names not in ([], [restore.name]):
            continue  # another output's previous version, whose name begins as this one's (`_fit` cut both)
        if restore is not None and not restore.exists() and (old / restore.name).is_dir():
            (old / restore.name).rename(restore)
            _log.info("put back %s, which a run killed while replacing it had moved to %s", restore, old)
        remove_tree(old)
        if not old.exists():
            _log.info("removed %s, left by a run that was killed", old)
            removed.append(old)
    return removed


def clear_killed_files(folder: Path, prefix: str, suffix: str) -> list[Path]:
    """Delete atomic_path's temporary files named `prefix`XXXXXXXX`suffix` in `folder` that no live process holds
    locked (left by a process killed outright); return those. Where locks cannot be taken nothing is deleted."""
    removed = []
    for tmp in _unheld(folder, prefix, suffix, folders=False):
        try:
            tmp.unlink()
        except OSError:
            continue
        removed.append(tmp)
        _log.info("removed %s, left by a run that was killed", tmp)
    return removed


def _locked_temp_file(path: Path, made=(), **kwargs) -> tuple[str, int | None]:
    """mkstemp(**kwargs) for a write to `path` (see _temporary), and the descriptor holding the new file's lock, so
    that clear_killed_files leaves it alone while this process lives; None where locks cannot be taken."""
    for _ in range(10):  # a run clearing killed files can take a new one between mkstemp and its lock: retry
        fd, tmp = _temporary(tempfile.mkstemp, path, made, **kwargs)
        try:
            locked = _flock_named(fd, tmp)  # (False: deleted meanwhile)
        except _NoLocks:
            os.close(fd)
            return tmp, None
        if locked:
            return tmp, fd
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
    _remove_empty(made)
    raise OSError(f"{path.parent}: cannot make and lock a temporary file here")


def _locked_temp_dir(path: Path, prefix: str, made=()) -> tuple[Path, int | None]:
    """A new folder `prefix`XXXXXXXX beside `path` (for a write to `path`: see _temporary) and the descriptor
    holding its lock, so that clear_killed leaves it alone while this process lives; None where locks cannot be
    taken (it is used unlocked)."""
    for _ in range(10):  # a run clearing killed folders can take a new one between mkdtemp and its lock: retry
        tmp = Path(_temporary(tempfile.mkdtemp, path, made, dir=path.parent, prefix=prefix))
        try:
            fd = _lock(tmp)
        except _NoLocks:
            return tmp, None
        if fd is not None:
            return tmp, fd
        remove_tree(tmp)
    _remove_empty(made)
    raise OSError(f"{path.parent}: cannot make and lock a temporary folder here")


@contextmanager
def scratch_dir(path: str | os.PathLike, kind: str):
    """Yield a new, empty temporary folder beside `path` (its target, if a symlink), named `.KIND-XXXXXXXX`, and
    delete it after. It is locked while in use, so that folders of the same kind left behind by a process
    killed outright (SIGKILL, power loss), which nothing holds any more, are deleted first: they may be large
    (an ONNX export's graphs). Folders that another live process is using are left alone. Where locks cannot
    be taken (Windows, some network file systems) nothing is cleared. The folders made for it are removed again
    (those left empty) when the block fails: it wrote nothing."""
    folder = _target(path).parent
    made = _make_folder(folder)
    prefix = f".{kind}-"
    clear_killed(folder, prefix)
    tmp, fd = _locked_temp_dir(_target(path), prefix, made)
    done = False
    try:
        yield tmp
        done = True
    finally:
        remove_tree(tmp)
        if fd is not None:
            os.close(fd)
        if not done:
            _remove_empty(made)


@contextmanager
def folder_for(folder: str | os.PathLike):
    """mkdir -p `folder` for the block; the folders it made are removed again (those still empty) when the block
    fails."""
    made = _make_folder(Path(folder))
    try:
        yield
    except BaseException:
        _remove_empty(made)
        raise


def _make_folder(folder: Path) -> list[Path]:
    """mkdir -p; returns the folders it made, deepest first. Made level by level from the top, each one judged as
    the kernel sees it then: `new/../x` is the `x` that may be there already (not one made, whatever `new` is)."""
    made = []
    try:
        for level in (*reversed(folder.parents), folder):
            if level.is_dir():
                continue
            try:
                level.mkdir()
            except FileExistsError:
                if not level.is_dir():  # a file, or a link to nothing, in the way ("File exists", said the kernel)
                    what = "a file" if level.exists() else "a symbolic link to nothing"
                    raise NotADirectoryError(
                        errno.ENOTDIR, f"is {what}, where a folder is needed", str(level)
                    ) from None
                continue  # (made by another process meanwhile)
            made.insert(0, level)
    except BaseException:
        _remove_empty(made)
        raise
    return made


def _remove_empty(made: list[Path]) -> None:
    """Remove folders that _make_folder made, deepest first, as long as they are empty."""
    for parent in made:
        try:
            parent.rmdir()
        except OSError:  # not empty (another process wrote there meanwhile): kept, and the folders above it
            break


# The folders a run replaces whole in its --output-dir (a train's model/: TrainConfig.WRITES).
REPLACED_WHOLE = ("model",)


def check_not_claimed(folder: str | os.PathLike, what: str, itself: bool = True, above: bool = True) -> None:
    """Refuse to write into a folder another run holds (exclusive: a train's or an evaluate's --output-dir), or
    into a folder it replaces whole there, or below one (REPLACED_WHOLE: a train's model/, which it refused to
    replace once it held another's files, after all its steps), whose files it would mix with its own, or remove
    at its end. Only looked at (a shared lock, for a moment), not held: runs that write single files (predict
    --output, convert) may share a folder. (Not every folder above: a lock another program holds on one,
    `flock -n ~/proj cmd`'s, would read as a run's.) Not `itself` for a run about to hold the folder (exclusive),
    which says so in its own words; nor the folders `above` it for a train's own model/ (exclusive holds its
    parent)."""
    folder = real_path(Path(folder).absolute())
    # (a model/ still to be made is found as Model/ too where the file system ignores case)
    replaced = {_folded(name) for name in REPLACED_WHOLE}
    whole = [level.parent for level in (folder, *folder.parents) if above and (level.name in REPLACED_WHOLE or (
        _folded(level.name) in replaced and ignores_case(level)))]  # fmt: skip
    for level in ([folder] if itself else []) + whole:
        try:
            fd = os.open(level, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:  # none there (yet), or not a folder
            continue
        try:
            free = _flock(fd, shared=True)
        except _NoLocks:
            return
        finally:
            os.close(fd)
        if not free:
            raise ValueError(f"{what}: {level} is a folder another run is writing (its --output-dir); wait for it "
                             "or write elsewhere")  # fmt: skip


def file_id(path: str | os.PathLike) -> tuple[int, int] | None:
    """Which file or folder `path` is now (one replaced by a rename is another), None where there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _pinned_id(path: Path, stack: ExitStack) -> tuple[int, int] | None:
    """file_id of `path`, held open until `stack` closes: a folder replaced and deleted meanwhile cannot pass its
    inode number on (to the next version, whose identity would then look unchanged)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # (a FIFO's open would wait for a writer)
    except OSError:  # none there, or a folder where folders cannot be opened (Windows): not held
        return file_id(path)
    stack.callback(os.close, fd)
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def read_one_version(path: str | os.PathLike, read, tries: int = 3):
    """`read()`, which reads the model at `path` (a folder, or a file and the files beside it), run again where
    `path` or its folder was replaced while it ran (a `convert` or a train's save renames a whole new folder in:
    atomic_dir), or where it failed while that happened (between the renames there is no folder): the weights of
    one version with the tokenizer of the next would answer wrongly, and nothing would say so."""
    path = Path(path)
    watched = (path, path.absolute().parent)
    for attempt in range(1, tries + 1):
        with ExitStack() as pinned:
            before = [_pinned_id(p, pinned) for p in watched]
            try:
                result = read()
            except Exception:
                if attempt < tries and [file_id(p) for p in watched] != before:
                    continue
                raise
            if [file_id(p) for p in watched] == before:
                return result
    raise ValueError(f"{path}: replaced while it was being read, {tries} times in a row; load it once what "
                     "writes it has finished")  # fmt: skip


@contextmanager
def exclusive(folder: str | os.PathLike, clear=()):
    """Hold the lock on `folder` itself while the block runs, so that a second run started on the same folder
    stops at once rather than delete the first one's temporary files or mix its outputs in. Where locks cannot
    be taken (Windows, some network file systems) the block runs unguarded. A folder made for the block is
    removed again when the block fails having written nothing there. `clear`: the names of outputs in `folder`
    whose temporary files or folders, left by a run killed mid-write, are deleted once it is held
    (remove_stale_temps)."""
    folder = Path(folder)
    check_not_claimed(folder, str(folder), itself=False)  # (below a running train's model/: gone at its end)
    made = _make_folder(folder)
    # Tried again for a moment: another command's check_not_claimed holds a shared lock on it for microseconds, a
    # run its lock for the whole run.
    for wait in (0.01, 0.03, 0.1, None):
        try:
            fd = _lock(folder)
        except _NoLocks:
            fd = -1
        if fd is not None or wait is None:
            break
        time.sleep(wait)
    if fd is None:  # (another run's folder, even one it made a moment ago: not ours to remove)
        raise ValueError(f"{folder}: another run is writing here; wait for it or use another --output-dir")
    done = False
    try:
        for name in clear if fd >= 0 else ():  # unlocked, another run's live temporary files could not be told
            remove_stale_temps(folder / name)
        yield
        done = True
    finally:
        if not done:  # while still held: another run cannot have taken the folder meanwhile
            _remove_empty(made)
        if fd >= 0:
            os.close(fd)
