"""Reader processes: chunk files read, decompressed and checked outside the trainer's GIL.

numcodecs' zstd and blosc decoders hold the GIL (two threads decode zstd no faster than one), and
the trainer's own Python needs it too; so chunks are read by processes, into one buffer they share
with the trainer, allocated once: fresh shared memory per chunk would fault its pages in at
0.8 GB/s. The buffer is an anonymous shared mapping inherited by forking, as DataLoader's workers
are forked, so it needs no /dev/shm space and vanishes with the processes however they end. A
worker touches only files, numpy, numcodecs and single-threaded torch.
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor

import numpy as np
import torch
from torch import Tensor

from vitscope.cache_spec.chunk_files import ChunkFile, read_chunk_file
from vitscope.support.lifetime import die_with_parent
from vitscope.support.memory import return_large_buffers

TASKS_PER_READER = 2
"""Tasks a window's reads are split into, per reader: few, for little messaging; more than one,
so a reader that finishes early takes another."""

_NON_FINITE_BITS = {
    torch.float16: (np.int16, 0x7C00, np.uint16, 0xFC00),
    torch.float32: (np.int32, 0x7F800000, np.uint32, 0xFF800000),
}
"""Per float dtype: the signed view and the bits of +inf, the unsigned view and those of -inf."""


def all_finite(t: Tensor) -> bool:
    """No NaN or inf in `t`, from two passes of integer max over its bits, no temporary: as
    signed integers the positive NaN and inf are the values from +inf's bits up, and as unsigned
    integers the negative ones are those from -inf's bits up (BENCHMARKS.md: 18 GB/s per thread
    for float16, where `isfinite` gets 0.6 and an exponent mask 5)."""
    if t.dtype not in _NON_FINITE_BITS:
        return bool(torch.isfinite(t).all())
    if t.numel() == 0:
        return True
    signed, positive_inf, unsigned, negative_inf = _NON_FINITE_BITS[t.dtype]
    values = t.detach().cpu().contiguous().view(-1).numpy()
    return values.view(signed).max() < positive_inf and values.view(unsigned).max() < negative_inf


class ChunkReaders:
    """`processes` readers filling the slots of one shared buffer (slots x slot_numel values)."""

    def __init__(self, processes: int, slots: int, slot_numel: int, dtype: torch.dtype) -> None:
        self.processes = processes
        itemsize = torch.empty(0, dtype=dtype).element_size()
        self._mapping = mmap.mmap(-1, slots * slot_numel * itemsize)
        self.buffer = torch.frombuffer(self._mapping, dtype=dtype).view(slots, slot_numel)
        self._pool = ProcessPoolExecutor(
            processes,
            mp_context=multiprocessing.get_context("fork"),
            initializer=_start_reader,
            initargs=(self.buffer, os.getpid()),
        )

    def submit(self, first_slot: int, files: list[ChunkFile]) -> list[Future[list[bool]]]:
        """Read `files` into consecutive slots from `first_slot`, in a few tasks per reader (a
        task costs ~0.3 ms of messaging, a chunk ~1 ms of reading); each future says, per file,
        whether its values are finite."""
        per_task = max(1, -(-len(files) // (TASKS_PER_READER * self.processes)))
        return [
            self._pool.submit(_read_into_slots, first_slot + i, files[i : i + per_task])
            for i in range(0, len(files), per_task)
        ]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        del self.buffer
        self._mapping.close()

    def __enter__(self) -> ChunkReaders:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


_buffer: Tensor | None = None
"""In a reader process: the shared buffer it inherited."""


def _start_reader(buffer: Tensor, parent_pid: int) -> None:
    global _buffer
    die_with_parent(parent_pid)  # a reader outliving a killed trainer would wait for ever
    _buffer = buffer
    return_large_buffers()  # chunks of every size pass through here: hand them back
    torch.set_num_threads(1)  # no OpenMP pool in a forked child; the readers are the parallelism


def _read_into_slots(first_slot: int, files: list[ChunkFile]) -> list[bool]:
    assert _buffer is not None
    finite = []
    for slot, file in enumerate(files, first_slot):
        out = _buffer[slot, : file.numel]
        read_chunk_file(file, out)
        finite.append(all_finite(out))
    return finite
