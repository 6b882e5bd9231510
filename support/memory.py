"""glibc's allocator, set per command: streaming passes hand large buffers back to the OS, so
they keep a flat footprint; training keeps its step's buffers, so each step reuses the last's."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""mallopt's parameter numbers (glibc's malloc.h)."""
LARGE_BUFFER = 1 << 20
STEP_BUFFER = 32 << 20
"""glibc's ceiling for the mmap threshold on 64-bit machines."""
KEPT_HEAP = 1 << 30
TRAINING_COMMANDS = ("train", "sweep")


def _mallopt(*settings: tuple[int, int]) -> bool:
    """Apply mallopt settings; True where every one was taken (glibc), False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    return all([bool(mallopt(param, value)) for param, value in settings])


def return_large_buffers() -> bool:
    """Fix glibc's mmap threshold at 1 MiB; True where it was set (glibc), False elsewhere.

    glibc raises the threshold each time a large block is freed (up to 32 MiB), after which
    chunk-sized tensors (17 MB for 16 ViT-L images) are carved from the heap, whose freed pieces
    stay resident: a pass over a cache then grows with the cache (measured: 0.58 -> 1.01 GB over
    24 chunks of read-ahead, flat at 0.39 GB with the threshold fixed). A fixed threshold keeps
    every buffer over 1 MiB an mmap of its own, unmapped when freed.
    """
    return _mallopt((M_MMAP_THRESHOLD, LARGE_BUFFER))


def keep_step_buffers() -> bool:
    """For training: buffers up to 32 MiB from a heap that is not trimmed below 1 GiB, so that
    every step reuses the memory of the step before; True where set (glibc).

    With the 1 MiB threshold each step's tensors were fresh mmaps, zeroed page by page by the
    kernel on first touch: at d 128 and 2,048 latents that cost TopK 30% of its tokens/s and
    Matryoshka 36% (BENCHMARKS.md, issue 23). A step's buffers are the same sizes every
    step, so the heap stays near one step's working set (measured: 909, 937, 960 MB peak over
    0.26, 1 and 4 M tokens, against 836-845 MB returning them); the chunks are decoded in reader
    processes, which return their buffers (train/readers.py).
    """
    return _mallopt((M_MMAP_THRESHOLD, STEP_BUFFER), (M_TRIM_THRESHOLD, KEPT_HEAP))


def set_allocator_for(command: str | None) -> bool:
    """What every `vitscope` command does first: keep step buffers to train, else return large
    buffers."""
    return keep_step_buffers() if command in TRAINING_COMMANDS else return_large_buffers()
