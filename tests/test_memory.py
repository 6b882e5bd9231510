"""The allocator setting every command makes first: on glibc, streaming passes return large
buffers, training keeps its step buffers."""

from __future__ import annotations

import platform
import sys

import pytest

from vitscope.support import memory

on_glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="mallopt is glibc's",
)


@on_glibc
def test_the_mmap_threshold_is_fixed_on_glibc():
    assert memory.return_large_buffers() is True


@on_glibc
def test_training_keeps_its_step_buffers_on_glibc():
    assert memory.keep_step_buffers() is True
    memory.return_large_buffers()  # the rest of the test session as every other command


@pytest.mark.parametrize(
    ("command", "kept"),
    [("train", True), ("sweep", True), ("analyze", False), ("cache", False), (None, False)],
)
def test_each_command_gets_its_allocator(monkeypatch, command, kept):
    chosen = []
    monkeypatch.setattr(memory, "keep_step_buffers", lambda: chosen.append("keep") or True)
    monkeypatch.setattr(memory, "return_large_buffers", lambda: chosen.append("return") or True)
    memory.set_allocator_for(command)
    assert chosen == ["keep" if kept else "return"]
