"""A blocking TLS server on 127.0.0.1 with a certificate from the test CA: a thread accepts,
a thread per connection runs the subclass's ``serve`` with whatever ``accepted`` hands it.
For upstreams that must answer exact bytes (scripted, fuzzing) rather than HTTP."""

from __future__ import annotations

import socket
import ssl
import threading


class BlockingTLSServer:
    def __init__(self, ca, hostname: str):
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(hostname).configure_cert(self.context)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self._active = 0
        self._idle = threading.Condition()
        threading.Thread(target=self._accept, daemon=True).start()

    def accepted(self) -> tuple:
        """Extra arguments for ``serve``, taken as the connection is accepted."""
        return ()

    def serve(self, raw: socket.socket, *args) -> None:
        raise NotImplementedError

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            with self._idle:
                self._active += 1
            threading.Thread(target=self._serve, args=(raw, *self.accepted()),
                             daemon=True).start()

    def _serve(self, raw: socket.socket, *args) -> None:
        try:
            self.serve(raw, *args)
        finally:
            with self._idle:
                self._active -= 1
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> None:
        """Wait until every accepted connection has been served to its end (what ``serve``
        records is then complete)."""
        with self._idle:
            if not self._idle.wait_for(lambda: self._active == 0, timeout):
                raise AssertionError(f"{self._active} upstream connection(s) still open "
                                     f"after {timeout}s")

    def close(self) -> None:
        self.listener.close()
