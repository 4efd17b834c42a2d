"""Raw sockets, for the requests no well-behaved client would send."""

from __future__ import annotations

import socket
import ssl
import time


def read_all(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Read until the peer closes (or ``timeout`` passes with nothing new)."""
    sock.settimeout(timeout)
    chunks = []
    while True:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            break
        except (ConnectionResetError, ssl.SSLError):
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def read_response_head(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(1)
        if not piece:
            break
        data += piece
    return data


def exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` to the proxy port; return everything it answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_all(sock, timeout)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/") else 0


def open_tunnel(port: int, authority: str, ca_file: str, server_hostname: str | None = None,
                timeout: float = 5.0, alpn: list[str] | None = None) -> ssl.SSLSocket:
    """CONNECT through the proxy and start TLS, trusting ``ca_file`` (offering ``alpn``)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        head = read_response_head(sock, timeout)
        assert status_of(head) == 200, head
        context = ssl.create_default_context(cafile=ca_file)
        if alpn:
            context.set_alpn_protocols(alpn)
        hostname = server_hostname or authority.rsplit(":", 1)[0]
        return context.wrap_socket(sock, server_hostname=hostname)
    except BaseException:
        sock.close()  # a refused CONNECT or a failed handshake must not leave the socket to the GC
        raise


def wait_closed(sock: socket.socket, timeout: float) -> float:
    """Seconds until the peer closed the connection (raises if it stays open)."""
    start = time.monotonic()
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        raise AssertionError(f"connection still open after {timeout}s") from None
    except (ConnectionResetError, ssl.SSLError):
        pass
    return time.monotonic() - start
