"""Start a benchmark child that stops when the benchmark process dies, even by SIGKILL.

``python -m bench._child PARENT_PID -m MODULE ARGS...`` runs MODULE as
``__main__``, and ``python -m bench._child PARENT_PID PROGRAM ARGS...``
execs PROGRAM (etcd). Before either, it sets ``PR_SET_PDEATHSIG``, which an exec
keeps, so that Linux sends this process SIGTERM when its parent dies. It
exits at once if PARENT_PID is no longer its parent, since the parent may
have died before the setting took effect. Without it, a benchmark killed by
SIGKILL would leave its servers serving on their ports with nothing to
stop them.

Linux sends the signal when the thread that started the child ends, so the
benchmark starts every child from its main thread.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys
from collections.abc import Sequence

PR_SET_PDEATHSIG = 1
"""The ``prctl`` option from ``<linux/prctl.h>``."""


def stop_with_parent(parent_pid: int) -> None:
    """Set SIGTERM to arrive when this process's parent dies, and exit if ``parent_pid`` has already gone."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(error)}")
    if os.getppid() != parent_pid:
        sys.exit(f"bench._child: the benchmark process {parent_pid} ended before this child started")


def main(argv: Sequence[str]) -> None:
    if len(argv) < 2 or (argv[1] == "-m" and len(argv) < 3):
        sys.exit("usage: python -m bench._child PARENT_PID (-m MODULE | PROGRAM) [ARGS...]")
    stop_with_parent(int(argv[0]))
    if argv[1] == "-m":
        sys.argv = [argv[2], *argv[3:]]
        runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
    else:
        os.execv(argv[1], list(argv[1:]))


if __name__ == "__main__":
    main(sys.argv[1:])
