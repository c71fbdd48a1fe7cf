"""torchrun environment, process-group set-up and tear-down, and rank-0 helpers.

One process per device; `torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK. Without them this is a world of one
and nothing here touches `torch.distributed`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from .cli import error_line
from .files import first_line


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def default_device() -> str:
    """The accelerator if one is present, else the CPU."""
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def api_device(device, flag: str = "device") -> torch.device:
    """The Python API's `device`, checked before any work: None (the default device), a name ('cpu', 'cuda:1'), a
    torch.device, or, as in HF's pipeline, an integer: the CPU where negative, else that accelerator's index. An
    accelerator named without an index is this process's under torchrun (cuda:LOCAL_RANK, as the CLI reads it),
    else, as torch reads it, the current one (torch.cuda.set_device's). `flag`: how errors name the setting."""
    if isinstance(device, torch.device):
        device = str(device)
    elif isinstance(device, int | np.integer) and not isinstance(device, bool | np.bool_):  # ("0": a name, refused)
        accelerator = default_device()
        device = "cpu" if device < 0 else f"{'cuda' if accelerator == 'cpu' else accelerator}:{int(device)}"
    elif device is not None and not isinstance(device, str):
        raise TypeError(f"device must be a name ('cpu', 'cuda:0'), a torch.device or an integer, not "
                        f"{type(device).__name__}")  # fmt: skip
    if "LOCAL_RANK" in os.environ:
        return resolve_device(device, _env_int("LOCAL_RANK", 0, 0), flag=flag)
    if device is not None and device.strip() == "cuda" and torch.cuda.is_available():
        device = f"cuda:{torch.cuda.current_device()}"
    return resolve_device(device, flag=flag)


def resolve_device(name: str | None, local_rank: int = 0, flag: str = "--device") -> torch.device:
    """Any torch device string works (out-of-tree backends included); under torchrun a bare accelerator
    type is given the local rank as its index. `flag`: how errors name the setting."""
    if name is not None and not name.strip():
        raise ValueError(f"{flag} {name!r}: empty; name a device (cpu, cuda, cuda:1, ...) or leave the flag out")
    what = f"{flag} {name}" if name else f"the default device ({default_device()})"
    name = name or default_device()
    index = name.rpartition(":")[2] if ":" in name else ""
    if index.isdecimal() and int(index) > MAX_DEVICE_INDEX:  # (torch.device keeps 8 bits of it: cuda:256 is cuda:0)
        raise ValueError(f"{flag} {name}: device index above {MAX_DEVICE_INDEX}, the highest torch can hold")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"{flag} {name!r}: {e}") from None
    if device.type == "meta":
        raise ValueError(f"{flag} {name}: holds no data (tensors of shapes only); name a device that computes")
    if device.type != "cpu" and device.index is None:
        # One visible GPU per process (CUDA_VISIBLE_DEVICES set per rank, Slurm's --gpus-per-task=1): its own is 0.
        alone = device.type == "cuda" and torch.cuda.device_count() == 1
        if not alone and local_rank > MAX_DEVICE_INDEX:
            raise ValueError(f"environment variable LOCAL_RANK={local_rank}: above {MAX_DEVICE_INDEX}, the highest "
                             f"{device.type} device index torch can hold; give each process one device, or --device cpu")  # fmt: skip
        device = torch.device(device.type, 0 if alone else local_rank)
        if local_rank:
            what += f" as {device} (LOCAL_RANK {local_rank}{', its one visible GPU' if alone else ''})"
    try:
        torch.zeros(1, device=device)  # a kernel runs: a GPU this build has no kernels for fails here
    except (RuntimeError, AssertionError, AttributeError, ImportError, NotImplementedError) as e:
        # (a backend whose plugin is not installed: torch.hpu, say, is then a module it cannot import)
        raise ValueError(f"{what}: not usable here ({first_line(e)})") from None
    return device


def _env_int(name: str, default: int, least: int) -> int:
    """A torchrun variable as an integer from least to 2^31 - 1, or a one-line error naming it (torch keeps sizes
    and ranks in C ints)."""
    most = 2**31 - 1
    raw = os.environ.get(name, "").strip() or str(default)
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < least:
        raise ValueError(f"environment variable {name}={raw!r}: expected an integer >= {least}")
    if value > most:
        raise ValueError(f"environment variable {name}={raw!r}: expected an integer from {least} to {most}")
    return value


MAX_DEVICE_INDEX = 127  # torch.device keeps its index in 8 bits: cuda:256 is cuda:0


def is_rank_zero() -> bool:
    """Whether this process is rank 0 (or alone), read from torchrun's environment before any process group."""
    return _env_int("RANK", 0, 0) == 0


# A gloo worker thread may still hold the last collective's work, which it drops only after this rank has seen the
# result. Dropping it releases tensors that Python made (all_gather_object's), which takes the GIL; a thread that asks
# for the GIL once the interpreter is shutting down ends the whole process ("terminate called without an active
# exception", SIGABRT), after a run that went well. With torch 2.13 this happened only after DDP had run (DDP seems to
# keep the group's threads alive past destroy_process_group): in 9 of 30 two-rank runs of DDP and one gather, and 5
# of 12 four-rank ones (the script in tests/test_distributed.py). A pause without the GIL after leaving the group
# lets the thread finish first: none in 60 two-rank runs and 12 four-rank ones with it (1 ms was enough in 50 runs).
EXIT_PAUSE_S = 0.1


def _wait_for_master_addr(rank: int, timeout_s: float):
    """Wait, as torch's store would, until MASTER_ADDR resolves (launchers may start ranks before rank 0's name is
    published), but say so at once rather than after the timeout's silence, and name it if the wait runs out. A name
    that resolves late then starts init_process_group's own timeout, so meeting may take up to twice timeout_s:
    giving it only what is left would shorten every collective's timeout too."""
    addr, start, said = os.environ.get("MASTER_ADDR", ""), time.monotonic(), False
    while addr:
        try:
            socket.getaddrinfo(os.fsencode(addr), None)  # bytes, as torch passes them (a str would be IDNA-encoded)
            return
        except socket.gaierror as e:
            waited = time.monotonic() - start
            if waited >= timeout_s:
                raise ValueError(
                    f"environment variable MASTER_ADDR={addr!r}: no such host ({e.strerror}, for {waited:.0f} s); set "
                    "it to rank 0's host name or address"
                ) from None
            if not said:  # (an error, not a warning: ranks other than 0 log errors only)
                logging.getLogger("bertqa").error(
                    f"rank {rank}: MASTER_ADDR={addr!r} does not resolve ({e.strerror}); waiting for it, as torch "
                    f"would, up to {timeout_s:.0f} s"
                )
                said = True
            time.sleep(min(1.0, timeout_s - waited))


def checked(check) -> Exception | None:
    """Run `check`, a command's checks of its files before any work (its flags' values, alike on every rank, are
    checked before: what fails here may fail on one machine only). Alone, its error is raised at once. Among
    several ranks, a bad-input error (ValueError, OSError) is returned, for distributed() to raise on every rank
    once they have met: a file missing on one machine ended that rank alone, before the process group, and the
    ranks on other machines (which their own torchrun does not stop) waited for it at the rendezvous for the whole
    timeout, 30 minutes, then blamed the rendezvous endpoint."""
    try:
        check()
    except (ValueError, OSError) as e:
        if os.environ.get("WORLD_SIZE", "").strip() in ("", "1"):  # (a bad WORLD_SIZE is distributed()'s to name)
            raise
        return e
    return None


FAILED_NOTICE_S = 10  # how long a rank whose checks failed waits for the others before it says why it waits


@contextmanager
def distributed(device_name: str | None = None, timeout_s: float = 1800, failure: Exception | None = None):
    """Yield a `Dist` for this process; the process group, if any, is destroyed on every exit path. `failure`: this
    rank's of `checked`, raised on every rank (as "rank R: ..." of the lowest rank that failed) once they have met,
    or here alone where they cannot meet. The "bertqa" logger, quiet on ranks other than 0, is as it was after."""
    logger = logging.getLogger("bertqa")
    level = logger.level
    try:
        with _distributed(device_name, timeout_s, failure) as d:
            yield d
    finally:
        logger.setLevel(level)


@contextmanager
def _distributed(device_name: str | None, timeout_s: float, failure: Exception | None):
    world = _env_int("WORLD_SIZE", 1, 1)
    rank, local_rank = _env_int("RANK", 0, 0), _env_int("LOCAL_RANK", 0, 0)
    if rank >= world:
        raise ValueError(f"environment variable RANK={rank}: must be below WORLD_SIZE={world}")
    device = resolve_device(device_name, local_rank)
    if rank != 0:
        logging.getLogger("bertqa").setLevel(logging.ERROR)  # notes once, from rank 0
    if world == 1:
        if failure is not None:
            raise failure
        yield Dist(0, 1, 0, device)
        return
    # Collectives and the default stream on this rank's device (torch.accelerator came in torch 2.6).
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is None and device.type == "cuda":
        torch.cuda.set_device(device)
    elif accelerator is not None and getattr(accelerator.current_accelerator(), "type", None) == device.type != "cpu":
        accelerator.set_device_index(device)
    # NCCL on CUDA (gloo where torch has no NCCL: Windows), gloo elsewhere; an out-of-tree backend registers its own
    # name for its device type.
    backend = {"cuda": "nccl" if dist.is_nccl_available() else "gloo", "cpu": "gloo"}.get(device.type)
    if backend is None:
        backend = dist.Backend.default_device_backend_map.get(device.type, "gloo")
    port = os.environ.get("MASTER_PORT", "").strip()
    # torch's own error would not name it; port 0 (any free one) would leave the other ranks no way to reach rank 0
    if port and not (port.isdecimal() and 1 <= int(port) <= 65535):
        raise ValueError(f"environment variable MASTER_PORT={port!r}: expected a port number, 1 to 65535")
    notice = None
    if failure is not None:  # (said once the meeting takes a while: it ends, as a rule, with this one line again)
        line = f"rank {rank}: {error_line(failure, debug=None)}; waiting for the other ranks, to stop them too"
        notice = threading.Timer(FAILED_NOTICE_S, logging.getLogger("bertqa").error, (line,))
        notice.daemon = True
        notice.start()
    try:
        _wait_for_master_addr(rank, timeout_s)
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    except BaseException as e:
        if notice is not None:
            notice.cancel()
        if not isinstance(e, (ValueError, dist.DistError)):  # (Ctrl-C, a bug)
            raise
        # No rank 0 to reach, a port taken, ranks missing, a MASTER_ADDR that does not resolve: not a bug.
        if failure is not None:  # (this rank's own error is why it came: the one to tell)
            raise failure from None
        if isinstance(e, ValueError):  # (MASTER_ADDR, named)
            raise
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        why = " ".join(str(e).split())[:200] or type(e).__name__
        raise ValueError(
            f"rank {rank}: cannot meet the other ranks at MASTER_ADDR:MASTER_PORT {where} ({why}); start all "
            f"{world} with torchrun and the same rendezvous endpoint, on a port free on rank 0's machine"
        ) from None
    try:
        d = Dist(rank, world, local_rank, device)
        try:  # (the first collective: NCCL may connect only here, the other ranks arriving only now)
            with fail_together(d):
                if failure is not None:
                    raise failure
        finally:
            if notice is not None:
                notice.cancel()
        yield d
    except RuntimeError as e:
        if DUPLICATE_GPU in str(e):  # the same explicit --device on every rank, or ranks seeing one GPU, the same
            raise ValueError(
                f"rank {rank}: {device} is another rank's GPU too (NCCL: {DUPLICATE_GPU.lower()}); under torchrun "
                "pass --device cuda (each rank takes cuda:LOCAL_RANK), or give each process one visible GPU of its "
                "own (across machines: set NCCL_HOSTID, if their host names are alike)"
            ) from None
        why = _peer_lost(e)
        if why is None:
            raise
        # Not this rank's fault: the one that failed says why; this one says it stopped because of it.
        raise RankError(f"rank {rank}: another rank failed or was killed, so this one stops too ({why})") from e
    finally:
        try:
            dist.destroy_process_group()
        finally:
            time.sleep(EXIT_PAUSE_S)  # see EXIT_PAUSE_S


# How gloo / NCCL report a peer that went away (a crash, a kill, a timeout in a collective).
PEER_LOST = (
    "Connection closed by peer",
    "Connection reset by peer",
    "NCCL communicator was aborted",
    "Timed out waiting",  # a collective whose other ranks never came
)


# NCCL's words (its "last error", which torch appends to the exception) for two ranks on one GPU.
DUPLICATE_GPU = "Duplicate GPU detected"


def _peer_lost(e: RuntimeError) -> str | None:
    """What in `e` says a peer went away (gloo's / NCCL's words, or torch's network error type), or None."""
    found = next((s for s in PEER_LOST if s in str(e)), None)
    if found is None and isinstance(e, getattr(dist, "DistNetworkError", ())):
        found = type(e).__name__
    return found


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def all_gather_objects(d: Dist, obj) -> list:
    """Every rank's `obj`, in rank order (a list of one without a process group)."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


class RankError(ValueError):
    """A step failed on one rank; every rank raises this with that rank's message (a ValueError, so the CLI
    prints it as one line)."""


@contextmanager
def fail_together(d: Dist):
    """Run the body on every rank, then agree on how it went: if it raised on any rank, every rank raises
    `RankError("rank R: <message>")` of the lowest failing rank, rather than the others going on into a
    collective that the failed rank never joins. The agreement is one all_gather of None or a short string,
    and it is also a barrier: no rank leaves before every rank has run the body. A rank whose failure is not
    a ValueError/OSError (a bug) re-raises its own exception, traceback and all, and the others name it as the
    CLI would there ("internal error (...)", "out of memory (...)"), not as bad input. No-op without a group."""
    if not d.enabled:
        yield
        return
    failed = None
    try:
        yield
    except Exception as e:  # any failure must reach the gather, or the other ranks would wait on it
        failed = e
    errors = all_gather_objects(d, None if failed is None else error_line(failed, debug=None))
    if failed is not None and not isinstance(failed, (ValueError, OSError)):
        raise failed  # a bug rather than bad input: keep its traceback on the rank where it happened
    for rank, error in enumerate(errors):
        if error is not None:
            raise RankError(f"rank {rank}: {error}") from (failed if rank == d.rank else None)
