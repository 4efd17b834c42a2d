"""Redaction: make sure no response can carry a secret back to the agent.

An upstream may echo what it received (debug endpoints, error pages, reflected headers).
Every response from a routed host passes through a :class:`StreamRedactor` that replaces
each *form* of the secrets that request carried: the raw value, the value as injected
(``Bearer …``, ``Basic …``), its base64 at every byte alignment, and its URL encoding.

Streaming matters: LLM answers arrive as Server-Sent Events and must reach the client as
they are sent, so the redactor holds back only a tail that could still begin a secret.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from urllib.parse import quote, quote_plus

MASK = b"[REDACTED]"
MIN_FORM_LENGTH = 4  # shorter forms would shred ordinary text and protect nothing
# Up to this size one regex pass is the fastest "is any form here?"; above it, a few substring
# searches are (CPython's fast search skips ahead; the regex tries every alternative at every
# byte). Measured: 1 KiB 11 µs against 3 µs; 64 KiB ~100 MB/s against ~1.3 GB/s.
REGEX_PRECHECK_MAX = 256


def _base64_cores(value: bytes) -> set[bytes]:
    """Base64 text of ``value`` at each of the three byte alignments inside a larger blob.

    Only the characters that depend on ``value`` alone are kept, so the form is found
    wherever the value sits in a longer base64 payload.
    """
    cores: set[bytes] = set()
    n = len(value)
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + value + b"\0\0\0")
        first = -(-8 * shift // 6)  # first char whose bits start inside value
        last = (8 * (shift + n)) // 6  # chars before this end inside value
        core = encoded[first:last]
        cores.add(core)
        cores.add(core.translate(bytes.maketrans(b"+/", b"-_")))
    full = base64.b64encode(value)
    cores.update({full, full.rstrip(b"="), base64.urlsafe_b64encode(value)})
    return cores


def secret_forms(values: Iterable[str]) -> frozenset[bytes]:
    """Every byte string that would reveal one of ``values`` (raw or injected), to be masked."""
    forms: set[bytes] = set()
    for value in values:
        raw = value.encode("utf-8")
        forms.add(raw)
        forms.update(_base64_cores(raw))
        forms.add(quote(value, safe="").encode())
        forms.add(quote_plus(value, safe="").encode())
    return frozenset(f for f in forms if len(f) >= MIN_FORM_LENGTH)


class Redactor:
    """Masks a fixed set of forms. Share one per route; make a :meth:`stream` per response."""

    def __init__(self, forms: Iterable[bytes]):
        # Longest first, so "Bearer <v>" is masked whole before "<v>" alone.
        self.forms: tuple[bytes, ...] = tuple(sorted(set(forms), key=len, reverse=True))
        self.longest = len(self.forms[0]) if self.forms else 0
        self._first_bytes = frozenset(f[0] for f in self.forms)
        # One C-level pass answers "is any form here?" (almost always no); only a match pays
        # for the exact longest-first replacement below.
        self._any = re.compile(b"|".join(re.escape(f) for f in self.forms)) if self.forms else None
        # Every form contains one of these (a form holding another form, like "Bearer <v>" and
        # "<v>", is found through the shorter one), so they answer the same question.
        self._cores = tuple(f for f in self.forms if not any(o != f and o in f for o in self.forms))
        # The same question for header values, asked of the text without encoding it first.
        self._any_text = re.compile("|".join(
            re.escape(f.decode("utf-8", "surrogateescape")) for f in self.forms
        )) if self.forms else None

    def __bool__(self) -> bool:
        return bool(self.forms)

    def redact(self, data: bytes) -> bytes:
        """Mask every complete occurrence (for headers and other whole values)."""
        if self._any is None:
            return data
        if len(data) <= REGEX_PRECHECK_MAX:
            if not self._any.search(data):
                return data
        elif not any(core in data for core in self._cores):
            return data
        for form in self.forms:
            if form in data:
                data = data.replace(form, MASK)
        return data

    def found_in_text(self, text: str) -> bool:
        """Does ``text`` hold a form? Values joined with line breaks can be asked at once:
        no form holds a line break, so joining neither hides one nor makes one up."""
        return self._any_text is not None and self._any_text.search(text) is not None

    def redact_text(self, text: str) -> str:
        if self._any_text is None or not self._any_text.search(text):
            return text
        return self.redact(text.encode("utf-8", "surrogateescape")).decode(
            "utf-8", "surrogateescape"
        )

    def pending_tail(self, data: bytes) -> int:
        """Length of the longest suffix of ``data`` that is a proper prefix of some form."""
        start = max(0, len(data) - self.longest + 1)
        first = self._first_bytes
        for i in range(start, len(data)):
            if data[i] in first:
                tail = data[i:]
                if any(f.startswith(tail) for f in self.forms):
                    return len(data) - i
        return 0

    def stream(self) -> StreamRedactor:
        return StreamRedactor(self)


class StreamRedactor:
    """Redacts a body that arrives in chunks, across chunk boundaries."""

    __slots__ = ("_held", "_redactor")

    def __init__(self, redactor: Redactor):
        self._redactor = redactor
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        """Return what can be sent now; keep back only bytes that could begin a secret."""
        data = self._redactor.redact(self._held + chunk) if self._held else (
            self._redactor.redact(chunk)
        )
        keep = self._redactor.pending_tail(data)
        if keep:
            self._held = data[-keep:]
            return data[:-keep]
        self._held = b""
        return data

    def flush(self) -> bytes:
        """The body ended: what was held back cannot become a secret any more."""
        held, self._held = self._held, b""
        return held


class GrpcBodyError(ValueError):
    """A gRPC body the proxy cannot inspect (a compressed message, or one over the size
    bound): the stream is ended rather than passed on unread."""


# gRPC's own default limit on a received message is 4 MiB; one this long is read whole.
GRPC_MAX_MESSAGE = 16 * 1024 * 1024


class GrpcStreamRedactor:
    """Redacts a gRPC body message by message (each a 1-byte flag and a 4-byte length, then
    the message): a message goes out as soon as it is whole, so streaming calls stay
    interactive, and its length is rewritten after masking, so the framing stays true."""

    __slots__ = ("_buffer", "_redactor")

    def __init__(self, redactor: Redactor):
        self._redactor = redactor
        self._buffer = bytearray()

    def feed(self, chunk: bytes) -> bytes:
        buffer = self._buffer
        buffer += chunk
        out = []
        while len(buffer) >= 5:
            flag, length = buffer[0], int.from_bytes(buffer[1:5], "big")
            if length > GRPC_MAX_MESSAGE:
                raise GrpcBodyError(f"a gRPC message of {length} bytes is over the "
                                    f"{GRPC_MAX_MESSAGE}-byte bound the proxy reads whole")
            if len(buffer) < 5 + length:
                break
            message = self._redactor.redact(bytes(buffer[5:5 + length]))
            del buffer[:5 + length]
            if flag & 1:
                raise GrpcBodyError("the upstream sent a compressed gRPC message, which the "
                                    "proxy cannot inspect for secrets")
            out.append(bytes((flag,)) + len(message).to_bytes(4, "big") + message)
        return b"".join(out)

    def flush(self) -> bytes:
        """The body ended: a partial message left over is broken anyway; masked, it goes."""
        rest, self._buffer = bytes(self._buffer), bytearray()
        return self._redactor.redact(rest) if rest else b""
