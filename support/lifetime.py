"""Worker processes that end with the process that started them, however it ends.

A parent killed by SIGKILL (the OOM killer, a scheduler's time limit, `kill -9`) runs no cleanup,
and a forked worker waiting on a queue whose other end its siblings still hold waits forever,
holding its memory until someone notices. Every spawner (train's chunk readers, the DataLoader
workers of `cache` and `monosemanticity`) calls `die_with_parent` first thing in each worker.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1
"""prctl(2) option: the signal this process gets when the thread that forked it ends."""

WATCH_INTERVAL_S = 0.5
"""Where there is no prctl: how often the watchdog thread checks that the parent is alive."""


def die_with_parent(parent_pid: int) -> None:
    """In a worker: be killed (SIGKILL) once process `parent_pid` ends. Linux delivers it the
    moment the forking thread ends, so the parent must spawn from a thread that lives as long
    as its workers; elsewhere a daemon thread polls. A parent that died before this call is
    caught by comparing the parent pid afterwards."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    else:
        threading.Thread(target=_watch, args=(parent_pid,), daemon=True).start()
    if os.getppid() != parent_pid:
        os._exit(1)


def _watch(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(WATCH_INTERVAL_S)
    os._exit(1)
