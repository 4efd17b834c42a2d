"""Redaction of a routed answer: no secret the injection holds goes back to the client, in a
header, the body (byte stream or gRPC messages) or a trailer. The wire was asked to undo the
answer's content encoding (``Outbound.readable``); one it could not undo is refused."""

from __future__ import annotations

from keyhole_sidecar.proxy.errors import UpstreamFailed
from keyhole_sidecar.proxy.exchange import Trailers
from keyhole_sidecar.proxy.flow import Exchange, Fields, Stage
from keyhole_sidecar.redact import GrpcStreamRedactor, Redactor, StreamRedactor


def refused_encoding(host: str, encoding: str) -> UpstreamFailed:
    return UpstreamFailed("encoding", f"{host} answered with Content-Encoding {encoding!r}, "
                          "which keyhole cannot inspect for secrets")


_NOTHING = Redactor(())


class Redaction(Stage):
    __slots__ = ("redactor", "stream")

    def __init__(self, ex: Exchange):
        super().__init__(ex)
        self.redactor = _NOTHING  # until before(): nothing is answered before it runs
        self.stream: StreamRedactor | GrpcStreamRedactor | None = None

    @classmethod
    def open(cls, ex: Exchange) -> Redaction | None:
        return cls(ex) if ex.target.routed else None

    async def before(self) -> None:
        """The forms to redact, taken after the credentials stage: a token it minted just
        now is among them."""
        self.redactor = self.ex.target.redactor()

    def head(self, headers: Fields) -> Fields:
        answer = self.ex.answer
        encoding = answer.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("identity", "") and encoding not in answer.decoded:
            self.ex.ctx.metrics.upstream_errors.labels("encoding").inc()
            raise refused_encoding(self.ex.target.host, encoding)
        if answer.headers.get("Content-Type", "").startswith("application/grpc"):
            self.stream = GrpcStreamRedactor(self.redactor)  # message by message
        return self._fields(headers, drop_encoding=True)

    def _fields(self, fields: Fields, drop_encoding: bool = False) -> Fields:
        # One search over every value answers "does any hold a secret?" (almost never).
        held = self.redactor.found_in_text("\n".join(value for _, value in fields))
        return [(name, self.redactor.redact_text(value) if held else value)
                for name, value in fields
                if not (drop_encoding and name.lower() == "content-encoding")]  # decoded

    def chunk(self, data: bytes, last: bool) -> bytes:
        if self.stream is None:
            if last:  # the whole body in one piece: one pass
                return self.redactor.redact(data)
            self.stream = self.redactor.stream()
        out = self.stream.feed(data) if data else b""
        return out + self.stream.flush() if last else out

    def end(self, trailers: Trailers) -> Trailers:
        return self._fields(list(trailers)) if trailers else trailers
