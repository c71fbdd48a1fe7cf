"""A torchrun worker for test_distributed.py: the `bertqa` command line with a fault injected on rank 1.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_fault_worker.py FAULT ARG...

FAULT is `none`, `raise` (rank 1 raises a ValueError after step 2), `kill` (rank 1 SIGKILLs itself after
step 2), `full` (rank 0's disk fills after step 2: writing metrics.jsonl fails) or `eio` (after step 2, flushing
metrics.jsonl to disk fails on rank 0, as before a checkpoint), or `inway=PATH` (a folder appears at PATH on rank 0
once the command's up-front checks, which refuse one there, have passed). `{rank}` in an ARG becomes this
process's rank, so that ranks can be given different files.
"""

import errno
import functools
import os
import signal
import sys

import bertqa.evaluate
import bertqa.train
from bertqa.cli import main


def fault(kind, step, loss):
    if os.environ["RANK"] != ("0" if kind in ("full", "eio") else "1") or step != 2:
        return
    if kind == "raise":
        raise ValueError("injected fault on rank 1 at step 2")
    if kind == "full":  # metrics.jsonl's file object now writes to /dev/full, which fails as a full disk does
        log = bertqa.train.MetricsLog.log

        def full_log(self, record):
            if self.file.name != "/dev/full":
                self.file.close()
                self.file = open("/dev/full", "wb", buffering=0)
            log(self, record)

        bertqa.train.MetricsLog.log = full_log
        return
    if kind == "eio":

        def fsync(fd):
            raise OSError(errno.EIO, os.strerror(errno.EIO))  # as the OS reports it: no file name

        os.fsync = fsync
        return
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    kind, *args = sys.argv[1:]
    if kind.startswith("inway="):
        check_files = bertqa.evaluate.EvalConfig.check_files  # (TrainConfig's calls it first)

        def then_in_the_way(self):
            check_files(self)
            if os.environ["RANK"] == "0":
                os.makedirs(kind.removeprefix("inway="), exist_ok=True)

        bertqa.evaluate.EvalConfig.check_files = then_in_the_way
    elif kind != "none":
        # The CLI looks `train` up in bertqa.train when it runs, so this puts our on_step under the real CLI.
        bertqa.train.train = functools.partial(bertqa.train.train, on_step=functools.partial(fault, kind))
    sys.exit(main([a.replace("{rank}", os.environ["RANK"]) for a in args]))
