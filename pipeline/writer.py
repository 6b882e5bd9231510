"""Turn one shard's stream of activations into whole chunks, written in the background, then commit.

Memory stays bounded: at most C - 1 rows per layer wait for their chunk, and `WriteQueue` blocks the
forward loop once `max_pending` chunks are queued for compression and writing. A finished shard's
commit waits for its chunks in `CommitQueue`'s thread, not in the forward loop.
"""

from __future__ import annotations

import errno
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import torch

from vitscope.cache_spec.layout import ROWS_SCHEMA
from vitscope.cache_spec.store import Cache, ShardCommit, utc_now, writer_id
from vitscope.pipeline.shards import SampleRecord
from vitscope.support.errors import UserError


class CacheWriteError(UserError):
    """Writing failed (a full disk, say): the shard in hand stays uncommitted, the rest is kept."""


class ShardTooLargeError(Exception):
    """A shard holds more images than the rows the cache reserves per shard."""


class WriteQueue:
    """A thread pool with a cap on queued work, so the model never runs far ahead of the disk."""

    def __init__(self, threads: int, max_pending: int) -> None:
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="chunk-writer")
        self._pending: deque[Future] = deque()
        self._max_pending = max_pending

    def submit(self, fn: Callable[[], object]) -> Future:
        while len(self._pending) >= self._max_pending:
            self._pending.popleft().result()
        future = self._pool.submit(fn)
        self._pending.append(future)
        return future

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class CommitQueue:
    """Shard commits wait for their shard's chunks in a thread of their own, so the forward loop
    runs on into the next shard; at most `max_pending` shards wait, and their errors surface in
    order, from `submit` or `finished`."""

    def __init__(self, max_pending: int = 2) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="shard-committer")
        self._pending: deque[tuple[ShardWriter, Future]] = deque()
        self._max_pending = max_pending

    def submit(
        self, writer: ShardWriter, source_bytes: int
    ) -> list[tuple[ShardWriter, ShardCommit]]:
        """Queue the shard's commit (its tail chunk is queued here, on the caller's thread);
        returns the commits finished meanwhile."""
        writer.flush()
        self._pending.append((writer, self._pool.submit(writer.commit, source_bytes)))
        return self.finished(keep=self._max_pending)

    def finished(self, keep: int = 0) -> list[tuple[ShardWriter, ShardCommit]]:
        """The commits done so far, waiting for the oldest until at most `keep` are pending."""
        done = []
        while self._pending and (len(self._pending) > keep or self._pending[0][1].done()):
            writer, future = self._pending.popleft()
            done.append((writer, future.result()))
        return done

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _to_host(t: torch.Tensor | None) -> torch.Tensor | None:
    """A host copy of a device tensor, in page-locked memory so that the copy is asynchronous."""
    if t is None or t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)


def _copy_event(device: torch.device) -> torch.cuda.Event | None:
    """An event after the copies just queued; a writer thread waits on it, not the main thread."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


class ShardWriter:
    """Rows of one shard go to its region in order: row i of the shard is row first_row + i."""

    def __init__(self, cache: Cache, shard_index: int, queue: WriteQueue, source: Path) -> None:
        self.cache = cache
        self.shard_index = shard_index
        self.shard = cache.attrs.shards[shard_index]
        self.source_folder = str(source.resolve().parent)
        """Where the shard's tar was read from: its commit record says so (spec 1.3)."""
        self.first_row, self.stop_row = cache.attrs.region(shard_index)
        self.queue = queue
        self.n_rows = 0
        self.records: list[tuple[int | None, SampleRecord]] = []
        self._waiting: dict[int, list[torch.Tensor]] = {layer: [] for layer in cache.attrs.layers}
        self._waiting_rows = 0
        self._written_rows = 0
        self._futures: list[Future] = []

    def add(self, acts: dict[int, torch.Tensor], records: list[SampleRecord]) -> None:
        """Append a batch: activations of the usable images and the records of all samples."""
        n_new = next(iter(acts.values())).shape[0] if acts else 0
        if self.n_rows + n_new > self.stop_row - self.first_row:
            raise ShardTooLargeError(
                f"{self.shard} holds more than rows_per_shard="
                f"{self.stop_row - self.first_row} images; cache it into a new --out with a "
                "larger --rows-per-shard"
            )
        for record in records:
            row = None if record.error else self.first_row + self.n_rows
            self.n_rows += record.error is None
            self.records.append((row, record))
        if n_new:
            for layer, tensor in acts.items():
                self._waiting[layer].append(tensor)
            self._waiting_rows += n_new
        while self._waiting_rows >= self.cache.attrs.chunk_images:
            self._write_chunk()

    def flush(self) -> None:
        """Queue the tail chunk (padded); call it from the thread that adds batches."""
        if self._waiting_rows:
            self._write_chunk()

    def commit(self, source_bytes: int) -> ShardCommit:
        """Write the tail chunk, wait for all of this shard's chunks, then commit the shard."""
        self.flush()
        try:
            for future in self._futures:
                future.result()
        except OSError as err:
            raise self._write_error(err) from None
        commit = ShardCommit(
            shard=self.shard,
            index=self.shard_index,
            first_row=self.first_row,
            n_rows=self.n_rows,
            n_skipped=sum(record.error is not None for _, record in self.records),
            source_bytes=source_bytes,
            written_by=writer_id(),
            committed_at=utc_now(),
            source_folder=self.source_folder,
        )
        try:
            self.cache.commit(commit, self._rows_table())
        except OSError as err:
            raise self._write_error(err) from None
        return commit

    def _write_chunk(self) -> None:
        """Take up to C waiting rows per layer, pad them to a whole chunk, queue the write."""
        per_chunk = self.cache.attrs.chunk_images
        chunk_index = (self.first_row + self._written_rows) // per_chunk
        for layer, parts in self._waiting.items():
            rows = torch.cat(parts) if len(parts) > 1 else parts[0]
            chunk, rest = rows[:per_chunk], rows[per_chunk:]
            self._waiting[layer] = [rest] if len(rest) else []
            if len(chunk) < per_chunk:
                padding = chunk.new_zeros((per_chunk - len(chunk), *chunk.shape[1:]))
                chunk = torch.cat([chunk, padding])
            self._futures.append(self._submit(layer, chunk_index, chunk))
        taken = min(per_chunk, self._waiting_rows)
        self._waiting_rows -= taken
        self._written_rows += taken

    def _submit(self, layer: int, chunk_index: int, chunk: torch.Tensor) -> Future:
        """Encode where the activations are, start the copy to the host without waiting for the
        device, and leave the check, compression and write to a thread: on a GPU the main
        thread never stalls behind the forward pass."""
        encoding = self.cache.encoding
        stored, scale_D, peak = (_to_host(t) for t in encoding.encode_on_device(chunk))
        copied = _copy_event(chunk.device)

        def write() -> int:
            if copied is not None:
                copied.synchronize()
            encoding.check_peak(float(peak))
            scales = None if scale_D is None else scale_D.numpy()
            return self.cache.write_encoded(layer, chunk_index, stored.numpy(), scales)

        try:
            return self.queue.submit(write)
        except OSError as err:
            raise self._write_error(err) from None

    def _rows_table(self) -> pa.Table:
        return pa.table(
            {
                "row": pa.array([row for row, _ in self.records], pa.int64()),
                "shard": pa.array([self.shard] * len(self.records), pa.string()),
                "key": pa.array([r.key for _, r in self.records], pa.string()),
                "url": pa.array([r.url for _, r in self.records], pa.string()),
                "caption": pa.array([r.caption for _, r in self.records], pa.string()),
                "status": pa.array(["skipped" if r.error else "ok" for _, r in self.records]),
                "error": pa.array([r.error for _, r in self.records], pa.string()),
            },
            schema=ROWS_SCHEMA,
        )

    def _write_error(self, err: OSError) -> CacheWriteError:
        what = "disk full" if err.errno == errno.ENOSPC else f"write failed ({err})"
        return CacheWriteError(
            f"{self.cache.path}: {what} while writing shard {self.shard}, which stays uncommitted "
            "(committed shards are kept); free space and re-run the same command to resume"
        )
