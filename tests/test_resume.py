"""A cache run killed by SIGKILL in the middle of a shard, then re-run, equals an uninterrupted run.

The third shard is a named pipe that the test fills half-way: the real `vitscope cache` process
writes that shard's first chunk and then waits for bytes that never come, so the kill lands
mid-shard every time, not by luck of timing.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.compute as pc
import torch

from conftest import TEST_LAYERS, cache_config, cli_args
from vitscope.cache_spec import open_cache
from vitscope.cache_spec.layout import layer_array_name
from vitscope.pipeline.config import CacheConfig
from vitscope.pipeline.run import cache


def wait_for(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(0.02)


def open_fifo_for_writing(path: Path, proc: subprocess.Popen) -> int:
    """Open the pipe once the cache process opens it for reading (O_NONBLOCK never hangs)."""
    fd = -1

    def opened() -> bool:
        nonlocal fd
        if proc.poll() is not None:
            raise RuntimeError(f"cache process ended early: {proc.communicate()}")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as err:
            if err.errno != errno.ENXIO:
                raise
            return False
        return True

    wait_for(opened, "the cache process to open the third shard")
    os.set_blocking(fd, True)
    return fd


def kill_mid_third_shard(
    config: CacheConfig, fraction: float, stored: Callable[[list[str]], bool]
) -> bytes:
    """Run `vitscope cache` with the third shard a named pipe fed `fraction` of its bytes and
    SIGKILL it once `stored(keys)` finds that shard's first chunk in every layer; returns the
    tar's bytes (the shard is left a pipe)."""
    third = Path(config.shards) / "00002.tar"
    tar_bytes = third.read_bytes()
    third.unlink()
    os.mkfifo(third)
    proc = subprocess.Popen(
        [sys.executable, "-m", "vitscope", *cli_args(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        fd = open_fifo_for_writing(third, proc)
        os.write(fd, tar_bytes[: int(len(tar_bytes) * fraction)])
        first_chunk = 2 * config.rows_per_shard // config.chunk_images
        keys = [f"{layer_array_name(layer)}/c/{first_chunk}/0/0" for layer in TEST_LAYERS]
        wait_for(lambda: stored(keys), "the third shard's first chunk")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        os.close(fd)
    finally:
        proc.kill()
    return tar_bytes


def rows_by_key(path: Path | str):
    table = open_cache(path).rows_table()
    return table.sort_by("key").select(["row", "shard", "key", "url", "caption", "status"])


def test_sigkill_mid_shard_then_rerun_gives_each_row_once(shards_copy: Path, tmp_path: Path):
    config = cache_config(shards_copy, tmp_path / "killed", batch_size=2)
    uninterrupted = cache(cache_config(shards_copy, tmp_path / "uninterrupted", batch_size=2))
    third = shards_copy / "00002.tar"
    tar_bytes = kill_mid_third_shard(
        config, 0.7, lambda keys: all((Path(config.out) / k).exists() for k in keys)
    )

    killed = open_cache(config.out)
    assert sorted(killed.committed) == [0, 1]
    assert killed.uncommitted_shards() == ["00002.tar"]
    assert all(ref.shard_index != 2 for ref in killed.chunks())
    assert pc.max(killed.rows_table()["row"]).as_py() < 2 * config.rows_per_shard

    third.unlink()
    third.write_bytes(tar_bytes)
    resumed = cache(config)
    assert (resumed.already_committed, resumed.committed) == (2, 1)
    assert resumed.rows + 16 == uninterrupted.rows == 23

    assert rows_by_key(config.out).equals(rows_by_key(uninterrupted.cache))
    done, reference = open_cache(config.out), open_cache(uninterrupted.cache)
    assert [c.n_rows for c in done.chunks()] == [c.n_rows for c in reference.chunks()]
    for layer in TEST_LAYERS:
        for ref in reference.chunks():
            assert torch.equal(done.read_chunk(layer, ref), reference.read_chunk(layer, ref))


def test_parallel_writers_fill_one_cache(shards: Path, reference_cache: Path, tmp_path: Path):
    """Writers started together race to create the cache, then write disjoint shards."""
    out, parts = tmp_path / "cache", 2
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vitscope",
                *cli_args(cache_config(shards, out, part=part, parts=parts)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for part in range(parts)
    ]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()  # type: ignore[union-attr]
    together, alone = open_cache(out), open_cache(reference_cache)
    assert sorted(together.committed) == [0, 1, 2]
    assert {c.written_by for c in together.committed.values()} != {together.committed[0].written_by}
    assert rows_by_key(out).equals(rows_by_key(reference_cache))
    for ref in alone.chunks():
        torch.testing.assert_close(together.read_chunk(2, ref), alone.read_chunk(2, ref))
