"""Running a test's own asyncio client code to the very end."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], *, settle: float = 10.0) -> T:
    """``asyncio.run``, then wait until every transport of the loop has closed its socket.

    A client's TLS connection can still be in its close_notify exchange when the coroutine
    returns (aiohttp's WebSocket client closes without waiting for it). ``asyncio.run`` would
    close the loop under it, and the garbage collector would find the open transport in some
    later test. Here the exchange finishes; one that has not within ``settle`` seconds is
    aborted and the test fails, naming it.
    """
    async def main() -> T:
        try:
            return await coro
        finally:
            await _transports_closed(settle)

    return asyncio.run(main())


def _open_transports(loop: asyncio.AbstractEventLoop) -> list[asyncio.BaseTransport]:
    # The selector loop's registry of its socket transports (asyncio keeps no public one).
    transports = getattr(loop, "_transports", {})
    return [t for t in list(transports.values())
            if t is not None and t.get_extra_info("socket").fileno() != -1]


async def _transports_closed(timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while left := _open_transports(loop):
        if loop.time() > deadline:
            for transport in left:
                transport.abort()
            await asyncio.sleep(0)
            raise AssertionError(f"{len(left)} connection(s) still open {timeout}s after the "
                                 f"client finished: {left}")
        await asyncio.sleep(0.01)
