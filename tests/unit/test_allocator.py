"""The sidecar fixes glibc's mmap threshold at start (keyhole_sidecar/allocator.py); what that
does to RSS under load is bench.soak's figure (docs/performance.md)."""

from __future__ import annotations

import subprocess
import sys

from keyhole_sidecar import allocator


def test_glibc_takes_the_fixed_threshold():
    # In a process of its own: the setting holds for the process that makes it.
    done = subprocess.run([sys.executable, "-c", "from keyhole_sidecar.allocator import "
                           "keep_large_buffers_off_the_heap as k; print(k())"],
                          capture_output=True, text=True, timeout=30, check=True)
    assert done.stdout.strip() == "True"  # this machine (and the images) run glibc


def test_without_a_c_library_nothing_is_changed(monkeypatch):
    monkeypatch.setattr(allocator.ctypes.util, "find_library", lambda name: None)
    assert allocator.keep_large_buffers_off_the_heap() is False
