"""Large buffers in their own mappings, so memory freed goes back to the system.

glibc's malloc serves a request of 128 KiB or more with its own ``mmap`` (returned to the
system when freed) — until such a block is freed, when it raises that threshold to the
block's size, up to 32 MiB, so later large buffers come from the heap. A proxy makes large
short-lived buffers all the time (TLS records, a window's worth of HTTP/2 frames, a body in
hand) between small long-lived objects, and a heap cut into pieces is rarely given back: under
the HTTP/2 soak the sidecar's RSS climbed from 72 to 100 MiB in three minutes, all of it
freed memory the process kept (tracemalloc saw 0.1 MiB more live objects). Setting the
threshold once fixes it where it starts, and the soak stays flat (``docs/performance.md``).
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # mallopt's parameter (malloc.h); setting it turns off the adjusting
MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value


def keep_large_buffers_off_the_heap() -> bool:
    """Fix glibc's mmap threshold at 128 KiB; False where there is no glibc ``mallopt``
    (macOS, musl), which keeps its own allocator's behaviour."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
