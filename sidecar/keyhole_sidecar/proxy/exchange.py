"""One exchange as the policy sees it, whatever the wire: a parsed request and the answer.

The wire adapters (HTTP/1.1 on llhttp, HTTP/2 on ``h2``) build a :class:`Request` from what
their parser accepted and give it a reply that frames what the policy writes; an upstream
connection of either protocol hands back an :class:`Answer`. Nothing here knows of heads,
chunks, frames or streams.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

Headers = CIMultiDict[str] | CIMultiDictProxy[str]
Trailers = Sequence[tuple[str, str]]

# Headers that describe one connection, not the message: never carried from one hop (or one
# protocol) to the next (RFC 9110 §7.6.1, RFC 9113 §8.2.2).
CONNECTION_SPECIFIC = frozenset({"connection", "keep-alive", "proxy-connection",
                                 "transfer-encoding", "upgrade"})


Body = AsyncIterator[bytes] | bytes | None
"""A request body on its way upstream: in hand whole, arriving, or none."""


class UnsafeHead(ValueError):
    """A part of a head or header block would break the message framing; nothing was
    written (raised by the wire's writers, answered by the policy)."""


class ResolveFailed(OSError):
    """The upstream's name did not resolve (the resolver's own error is the cause)."""


class BadResponse(ConnectionError):
    """The upstream's bytes broke its protocol (``encoding``: a body its Content-Encoding
    could not undo)."""

    def __init__(self, message: str, *, encoding: bool = False):
        super().__init__(message)
        self.encoding = encoding


class UpstreamClosed(ConnectionError):
    """The upstream closed the connection (or reset the stream) before or while answering."""

    def __init__(self, answered: bool):
        super().__init__("the upstream closed the connection" +
                         (" mid-response" if answered else " before answering"))
        self.answered = answered


class Unprocessed(UpstreamClosed):
    """The upstream said it did not process the request at all (HTTP/2 REFUSED_STREAM, or a
    stream above a GOAWAY's last stream id): safe to send again, whatever the method."""

    def __init__(self):
        super().__init__(answered=False)


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

    def interim(self, status: int) -> None: ...
    def start(self, status: int, reason: str, headers: list[tuple[str, str]], *,
              length: int | None = None) -> None: ...
    async def write(self, data: bytes) -> None: ...
    async def end(self, trailers: Trailers = ()) -> None: ...
    async def send(self, status: int, reason: str, headers: list[tuple[str, str]],
                   body: bytes, trailers: Trailers = ()) -> None: ...
    def abort(self) -> None: ...
    async def client_left(self) -> None:
        """Returns once the client has stopped sending or is gone: what a request held for
        a person's approval waits on beside the decision. (A wire that cancels the request
        when its client goes, HTTP/2's reset stream, never returns.)"""


class Request:
    """One parsed request: what the client asked for and the reply that answers it.

    ``length_known`` is False when the body's end is only known when it comes (HTTP/1.1
    chunked, HTTP/2 without content-length); ``version`` is the client's, (2, 0) for HTTP/2.
    """

    __slots__ = ("body", "can_read_body", "headers", "length_known", "method", "reply", "url",
                 "version")

    def __init__(self, method: str, url: URL, headers: Headers, body: BodyReader,
                 can_read_body: bool, length_known: bool, reply: Reply,
                 version: tuple[int, int]):
        self.method, self.url, self.headers, self.body = method, url, headers, body
        self.can_read_body, self.length_known = can_read_body, length_known
        self.reply, self.version = reply, version

    @property
    def protocol(self) -> str:
        """The client's protocol: ``"h2"`` or ``"http/1.1"``."""
        return "h2" if self.version[0] == 2 else "http/1.1"


class Answer:
    """The upstream's final answer: status, headers, the body to read, and its trailers once
    the body has ended (HTTP/2; HTTP/1.1 answers carry none). ``decoded``: the content
    encodings the wire undid (the body is read decoded)."""

    __slots__ = ("body", "code", "decoded", "headers", "reason", "reusable", "trailers")

    def __init__(self, code: int, reason: str, headers: Headers, body: BodyReader, *,
                 reusable: bool = True, decoded: frozenset[str] = frozenset()):
        self.code, self.reason, self.headers, self.body = code, reason, headers, body
        self.reusable = reusable  # the upstream did not ask to close the connection
        self.decoded = decoded
        self.trailers: Trailers = ()


@dataclass(slots=True)
class Outbound:
    """What the policy decided to send upstream; the wire frames it for the protocol the
    upstream picked."""

    method: str
    scheme: str
    host: str
    port: int
    authority: str  # the Host header / :authority
    target: str  # the path and query
    headers: list[tuple[str, str]]  # end-to-end fields; framing is the wire's
    body: Body
    length: int | None  # the body's length when known
    readable: bool  # the answer's body must be readable (redacted): undo or refuse encodings
    trailers: bool  # the client asked for trailers (``te: trailers``, gRPC)
    client_protocol: str = "http/1.1"  # the wire offers the upstream what the client speaks
    sensitive: frozenset[str] = frozenset()
    """Lowercase names of the fields (``:path`` among them) that carry a secret: HTTP/2 sends
    them never-indexed, out of HPACK's shared table."""


class Leg(Protocol):
    """One exchange in flight upstream, once its answer's head is in."""

    def sent_whole(self) -> bool:
        """Did the request's body (if any) go upstream whole?"""
        ...

    def finish(self) -> None:
        """The exchange is over: keep what can carry another exchange, end the rest."""
        ...


class Upstreams(Protocol):
    """The upstream side of the wire, as the policy sees it."""

    async def exchange(self, out: Outbound, timeout: float) -> tuple[Answer, Leg]:
        """Send ``out`` and wait (up to ``timeout``) for the answer's head. Raises OSError
        (TimeoutError, ResolveFailed, ssl errors…) or TargetRefused when no connection could be
        opened, UpstreamClosed, BadResponse or TimeoutError when no answer came, UnsafeHead
        when ``out`` cannot be written."""
        ...
