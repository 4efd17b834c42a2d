"""Running a test server (an aiohttp application) in a thread of its own, on 127.0.0.1 (or on
a listening socket the caller made, e.g. inside the test node's network namespace)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import trustme
from aiohttp import web


class ThreadedApp:
    """Serves ``make_app()`` on 127.0.0.1:``port`` (0: a free one), over TLS with ``cert``."""

    def __init__(self, make_app: Callable[[], web.Application], cert: trustme.LeafCert | None,
                 port: int = 0, sock: socket.socket | None = None, **server_kwargs):
        self._make_app, self._cert, self._port, self._sock = make_app, cert, port, sock
        self._server_kwargs = server_kwargs  # aiohttp's request handler's (auto_decompress…)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    def start(self) -> int:
        """Start serving; return the port."""
        self._thread.start()
        return asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)

    async def _start(self) -> int:
        context = None
        if self._cert is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._cert.configure_cert(context)
        self._runner = web.AppRunner(self._make_app(), access_log=None, **self._server_kwargs)
        await self._runner.setup()
        if self._sock is not None:
            await web.SockSite(self._runner, self._sock, ssl_context=context).start()
        else:
            await web.TCPSite(self._runner, "127.0.0.1", self._port, ssl_context=context,
                              reuse_address=True).start()
        return self._runner.addresses[0][1]

    async def _abort_leftovers(self) -> None:
        """Connections still open when the server stops would outlive the loop and be found by
        the garbage collector in some later test: those in TLS shutdown (a peer that never
        answers close_notify, like a pod whose network namespace is gone) and those closing
        but still flushing to a peer that stopped reading. ``abort`` closes both (and is a
        no-op on a transport already closed); the next turn of the loop closes the sockets."""
        for transport in list(getattr(self._loop, "_transports", {}).values()):
            if transport is not None:
                transport.abort()
        await asyncio.sleep(0)

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
            asyncio.run_coroutine_threadsafe(self._abort_leftovers(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


@contextlib.contextmanager
def serving_process(command: list[str], cert: trustme.LeafCert, folder: Path,
                    env: dict[str, str] | None = None) -> Iterator[int]:
    """A server program (Go, Node, Python) given its certificate and key files as its last two
    arguments, which prints the port it listens on first; killed at the end."""
    cert.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    cert.private_key_pem.write_to_path(str(folder / "key.pem"))
    process = subprocess.Popen([*command, str(folder / "cert.pem"), str(folder / "key.pem")],
                               stdout=subprocess.PIPE, text=True, env=env)
    try:
        yield int(process.stdout.readline())
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
