"""What every credential source shares: authorising an outgoing request, the live values to
redact, and the registry that keeps minted tokens across configuration reloads."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import aiohttp
from multidict import CIMultiDict

from keyhole_sidecar.credentials.tokens import CredentialError, Token, TokenCache
from keyhole_sidecar.redact import Redactor, secret_forms


@dataclass(slots=True)
class Outgoing:
    """The request about to leave the proxy, after injection, before it is sent. A source
    may set headers and (SigV4) edit the query; nothing else changes after it signed."""

    method: str
    host: str
    port: int
    path: str  # raw, as sent
    query: str  # raw, as sent
    headers: CIMultiDict[str]
    client_headers: Mapping[str, str]  # as the client sent them, for sources that must look
    payload_hash: str | None = None  # hex SHA-256 of the body, when a source asked for it

    @property
    def authority(self) -> str:
        """The Host header aiohttp will send for this URL."""
        return self.host if self.port == 443 else f"{self.host}:{self.port}"


class CredentialSource(ABC):
    """One injection's credential source. Built from the spec and the secret material once per
    distinct configuration; kept (with its tokens) across reloads that do not change either."""

    kind: ClassVar[str]  # the audit log's and the metrics' name for it
    header_names: ClassVar[frozenset[str]] = frozenset({"authorization"})
    hashes_payload: bool = False  # True: authorize() needs Outgoing.payload_hash
    mints_tokens: ClassVar[bool] = False

    def __init__(self, injection: str, static_secrets: Iterable[str]):
        self.injection = injection
        self._static = tuple(static_secrets)
        self._redactor_for: tuple[str, ...] = ()  # the live values the redactor was built for
        self._redactor = Redactor(secret_forms(self._static))

    @abstractmethod
    async def authorize(self, out: Outgoing, session: aiohttp.ClientSession) -> None:
        """Set the credential on ``out``; raise :class:`CredentialError` when it cannot."""

    def live_secrets(self) -> tuple[str, ...]:
        """Values minted so far that a response might echo (tokens), besides the static ones."""
        return ()

    def redactor(self) -> Redactor:
        """Masks the static material and every live token; rebuilt only when a token changes."""
        live = self.live_secrets()
        if live != self._redactor_for:
            self._redactor = Redactor(secret_forms((*self._static, *live)))
            self._redactor_for = live
        return self._redactor

    def expires_in(self, now: float) -> float | None:
        """Seconds until the current token expires (None: nothing minted, or nothing to mint)."""
        return None


class TokenSource(CredentialSource):
    """A source that mints bearer-style tokens; subclasses say how to mint and present them."""

    mints_tokens = True

    def __init__(self, injection: str, static_secrets: Iterable[str],
                 on_minted: Callable[[str, str, Token], None],
                 on_failed: Callable[[str, str, CredentialError], None]):
        super().__init__(injection, static_secrets)
        # The proxy's client session, handed over by authorize(): sources are built with the
        # configuration, before the session exists.
        self.session: aiohttp.ClientSession | None = None
        self.cache = TokenCache(self._mint_with_session,
                                on_minted=lambda token: on_minted(injection, self.kind, token),
                                on_failed=lambda error: on_failed(injection, self.kind, error))

    async def _mint_with_session(self) -> Token:
        assert self.session is not None
        return await self.mint(self.session)

    @abstractmethod
    async def mint(self, session: aiohttp.ClientSession) -> Token: ...

    @abstractmethod
    def present(self, token: str, out: Outgoing) -> None: ...

    async def authorize(self, out: Outgoing, session: aiohttp.ClientSession) -> None:
        self.session = session
        token = await self.cache.get()
        self.present(token.value, out)

    def live_secrets(self) -> tuple[str, ...]:
        return tuple(t.value for t in (self.cache.token, self.cache.previous) if t is not None)

    def expires_in(self, now: float) -> float | None:
        token = self.cache.token
        return None if token is None else token.expires_at - now


def material_digest(values: Iterable[str]) -> str:
    """Identifies secret material without keeping it: a changed key means a new source."""
    digest = hashlib.sha256()
    for value in values:
        digest.update(value.encode() + b"\0")
    return digest.hexdigest()
