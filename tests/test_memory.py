"""The allocator setting every command makes first: on glibc, large buffers become mmaps."""

from __future__ import annotations

import platform
import sys

import pytest

from vitscope.support.memory import return_large_buffers


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="mallopt is glibc's",
)
def test_the_mmap_threshold_is_fixed_on_glibc():
    assert return_large_buffers() is True
