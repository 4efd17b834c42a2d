"""Network namespaces for tests (the test node, transparent capture), made with iproute2.

Processes enter one with ``nsenter --net`` (not ``ip netns exec``, which also gives them a
mount namespace of their own: the kubelet's volume mounts would then be invisible to
containerd). A thread of the test process can enter one for a moment to open a listening
socket there (:func:`entered`), so a test server lives on the node, not on the host.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

NETNS_DIR = Path("/run/netns")
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def path(name: str) -> Path:
    return NETNS_DIR / name


def wrap(name: str) -> list[str]:
    """The command prefix that runs a program in namespace ``name``."""
    return ["nsenter", f"--net={path(name)}", "--"]


def ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    command = ["ip", *(["-n", netns] if netns else []), *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip()}")
    return done


def exists(name: str) -> bool:
    return path(name).exists()


def delete(name: str) -> None:
    if exists(name):
        ip("netns", "delete", name, check=False)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


@contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the body with this thread in namespace ``name``; sockets made there stay there."""
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(path(name), os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(original)
    finally:
        os.close(target)
        os.close(original)
