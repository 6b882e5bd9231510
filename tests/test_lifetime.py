"""Worker processes die with their parent: each worker-spawning command is killed by SIGKILL
(no cleanup runs) while its workers wait, and none of them may outlive it by more than a moment.

The workers are caught waiting where nothing would ever wake them: train's chunk readers on
their task queue, a cache's DataLoader worker opening a shard that is a named pipe nobody writes.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cache_config, cli_args
from vitscope.support.lifetime import die_with_parent

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")

GRACE_S = 5.0
"""How long the workers may take to die after their parent."""


def stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields from the state on (the command name may hold spaces); None once
    the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text.rpartition(")")[2].split()


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = stat_fields(int(entry.name))
            if fields is not None and int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    fields = stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def kill_and_find_survivors(args: list[str], workers: int, timeout: float = 120) -> list[int]:
    """Start `vitscope ARGS`, wait for its `workers` worker processes, SIGKILL it, and return
    the workers still alive GRACE_S later (killing those, so no test leaves them behind)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "vitscope", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + timeout
        while len(spawned := children(proc.pid)) < workers:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {workers} workers: {proc.communicate()[1].decode()}")
            time.sleep(0.05)
        time.sleep(0.5)  # let them reach the wait
    finally:
        proc.kill()
        proc.wait(timeout=30)
    deadline = time.monotonic() + GRACE_S
    while (survivors := [pid for pid in spawned if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    return survivors


def test_train_readers_die_with_a_killed_trainer(small_cache: Path, tmp_path: Path):
    args = ["train", "--cache", str(small_cache), "--layer", "3", "--out", str(tmp_path / "run")]
    args += ["--tokens", "100000000", "--batch-size", "128", "--n-latents", "64", "--k", "4"]
    args += ["--buffer-tokens", "500", "--readers", "2", "--device", "cpu"]
    assert kill_and_find_survivors(args, workers=2) == []


def test_cache_workers_die_with_a_killed_cache_run(shards_copy: Path, tmp_path: Path):
    first = shards_copy / "00000.tar"
    first.unlink()
    os.mkfifo(first)  # never written: the worker reading it waits in open() for ever
    config = cache_config(shards_copy, tmp_path / "cache", num_workers=2)
    assert kill_and_find_survivors(cli_args(config), workers=2) == []


def test_a_worker_whose_parent_died_before_it_asked_exits():
    """The race: the parent killed between the fork and the request to die with it, so the
    worker already has another parent and would never be signalled."""
    fork = multiprocessing.get_context("fork")
    worker = fork.Process(target=die_with_parent, args=(os.getpid() + 1,))
    worker.start()
    worker.join(timeout=30)
    assert worker.exitcode == 1
    alone = fork.Process(target=die_with_parent, args=(os.getpid(),))
    alone.start()
    alone.join(timeout=30)
    assert alone.exitcode == 0
