"""Ports for servers the tests start as child processes that cannot report a port of their
own choosing (etcd, kube-apiserver, the operator's webhook).

Binding port 0, closing and handing the number to a child races: until the child binds it,
the kernel may give the same port to any outgoing connection as its local port. Ports below
the kernel's ephemeral range are never handed out that way, so one found free there stays free
for the child unless another test takes it, and the suite starts its servers one at a time.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_random = random.SystemRandom()  # pytest-randomly reseeds the module-level generator per test


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(low: int = 20000) -> int:
    """A port on 127.0.0.1 that is free now and below the ephemeral range."""
    high = max(low + 1000, _ephemeral_start())
    for _ in range(200):
        port = random.randrange(low, high)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port on 127.0.0.1 between {low} and {high}")
