"""A torchrun worker for test_distributed.py: the `bertqa` command line with a fault injected on rank 1.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_fault_worker.py FAULT ARG...

FAULT is `none`, `raise` (rank 1 raises a ValueError after step 2) or `kill` (rank 1 SIGKILLs itself after
step 2). `{rank}` in an ARG becomes this process's rank, so that ranks can be given different files.
"""

import functools
import os
import signal
import sys

import bertqa.train
from bertqa.cli import main


def fault(kind, step, loss):
    if os.environ["RANK"] != "1" or step != 2:
        return
    if kind == "raise":
        raise ValueError("injected fault on rank 1 at step 2")
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    kind, *args = sys.argv[1:]
    if kind != "none":
        # The CLI looks `train` up in bertqa.train when it runs, so this puts our on_step under the real CLI.
        bertqa.train.train = functools.partial(bertqa.train.train, on_step=functools.partial(fault, kind))
    sys.exit(main([a.replace("{rank}", os.environ["RANK"]) for a in args]))
