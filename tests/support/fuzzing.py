"""What the relay fuzzers (HTTP/1.1 and HTTP/2) share: their settings, the sidecar they fuzz
(one routed host, the secret injected), and what they do to bytes: overwrite parts, cut them."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

from tests.support.config import SECRETS, injection, ref
from tests.support.sidecar import Sidecar, start_sidecar


def fuzz_settings(examples: int) -> settings:
    """``examples`` in CI; KEYHOLE_FUZZ_EXAMPLES=N for a long run."""
    return settings(max_examples=int(os.environ.get("KEYHOLE_FUZZ_EXAMPLES", examples)),
                    deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


def start_fuzz_sidecar(workdir, host: str, port: int, upstream_ca: str, *args: str) -> Sidecar:
    """A sidecar routing ``host:port`` (resolved to 127.0.0.1), the Authorization header
    injected, and a 2 s upstream timeout so that a silent answer ends an example quickly."""
    return start_sidecar(
        workdir, [injection("fuzz", hosts=[f"{host}:{port}"],
                            headers=[{"name": "Authorization",
                                      "valueFrom": ref("api-credentials", "token")}])],
        SECRETS, upstream_ca=upstream_ca, resolve=[f"{host}:{port}:127.0.0.1"],
        args=["--upstream-timeout", "2", *args])


def mutate(data: bytes, edits: list[tuple[int, bytes]]) -> bytes:
    """Overwrite ``data`` with each edit's bytes at its position (modulo the length)."""
    for position, insert in edits:
        at = position % (len(data) + 1)
        data = data[:at] + insert + data[at + len(insert):]
    return data


def pieces(data: bytes, sizes: list[int]) -> list[bytes]:
    """``data`` cut into pieces of these sizes (the rest in one last piece)."""
    out, at = [], 0
    for size in sizes:
        if at >= len(data):
            break
        out.append(data[at:at + size])
        at += size
    if at < len(data):
        out.append(data[at:])
    return out
