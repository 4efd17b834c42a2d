"""One exchange as the policy sees it, whatever the wire: a parsed request and the answer.

The wire adapters (HTTP/1.1 on llhttp, HTTP/2 on ``h2``) build a :class:`Request` from what
their parser accepted and give it a reply that frames what the policy writes; an upstream
connection of either protocol hands back an :class:`Answer`. Nothing here knows of heads,
chunks, frames or streams.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

Headers = CIMultiDict[str] | CIMultiDictProxy[str]
Trailers = Sequence[tuple[str, str]]

# Headers that describe one connection, not the message: never carried from one hop (or one
# protocol) to the next (RFC 9110 §7.6.1, RFC 9113 §8.2.2).
CONNECTION_SPECIFIC = frozenset({"connection", "keep-alive", "proxy-connection",
                                 "transfer-encoding", "upgrade"})


class UpstreamClosed(ConnectionError):
    """The upstream closed the connection (or reset the stream) before or while answering."""

    def __init__(self, answered: bool):
        super().__init__("the upstream closed the connection" +
                         (" mid-response" if answered else " before answering"))
        self.answered = answered


class BodyReader(Protocol):
    """A body arriving in pieces, with back-pressure: what is not read is not acknowledged
    (HTTP/1.1: the socket pauses; HTTP/2: no WINDOW_UPDATE)."""

    async def readany(self) -> bytes: ...
    async def read(self) -> bytes: ...
    def read_nowait(self, n: int = -1) -> bytes: ...
    def is_eof(self) -> bool: ...
    def exception(self) -> BaseException | None: ...


class Reply(Protocol):
    """Writes one response; the adapter chooses its framing."""

    started: bool
    close: bool  # HTTP/1.1: close the connection after this answer (HTTP/2: ignored)

    def interim(self, status_line: bytes) -> None: ...
    def start(self, status: int, reason: str, headers: list[tuple[str, str]], *,
              length: int | None = None) -> None: ...
    async def write(self, data: bytes) -> None: ...
    async def end(self, trailers: Trailers = ()) -> None: ...
    async def send(self, status: int, reason: str, headers: list[tuple[str, str]],
                   body: bytes, trailers: Trailers = ()) -> None: ...
    def abort(self) -> None: ...


class Request:
    """One parsed request: what the client asked for and the reply that answers it.

    ``length_known`` is False when the body's end is only known when it comes (HTTP/1.1
    chunked, HTTP/2 without content-length); ``protocol`` is ``"http/1.1"`` or ``"h2"``.
    """

    __slots__ = ("body", "can_read_body", "headers", "length_known", "method", "protocol",
                 "reply", "url", "version")

    def __init__(self, method: str, url: URL, headers: Headers, body: BodyReader,
                 can_read_body: bool, length_known: bool, reply: Reply,
                 version: tuple[int, int], protocol: str):
        self.method, self.url, self.headers, self.body = method, url, headers, body
        self.can_read_body, self.length_known = can_read_body, length_known
        self.reply, self.version, self.protocol = reply, version, protocol


class Answer:
    """The upstream's final answer: status, headers, the body to read, and its trailers once
    the body has ended (HTTP/2; HTTP/1.1 answers carry none)."""

    __slots__ = ("body", "code", "ended_with_head", "headers", "reason", "reusable",
                 "trailers")

    def __init__(self, code: int, reason: str, headers: Headers, body: BodyReader, *,
                 reusable: bool = True, ended_with_head: bool = False):
        self.code, self.reason, self.headers, self.body = code, reason, headers, body
        self.reusable = reusable  # the upstream did not ask to close the connection
        self.ended_with_head = ended_with_head  # HTTP/2: no body, no trailers frame
        self.trailers: Trailers = ()
