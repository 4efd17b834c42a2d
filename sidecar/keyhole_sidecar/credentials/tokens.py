"""Short-lived tokens, minted on demand and refreshed ahead of expiry, one mint at a time.

A request never waits for a refresh while the token it would use is still good: inside the
refresh window the current token is served and one background mint replaces it. Only a cold
start or an expired token makes requests wait, and then every waiting request shares the one
mint. A failed mint is remembered for a moment, so an agent retrying in a loop cannot turn
into a flood against the token endpoint.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger("keyhole.credentials")

REFRESH_AHEAD_MAX = 300.0  # seconds before expiry to start a refresh (at most)
REFRESH_AHEAD_FRACTION = 0.25  # ... or this share of the token's lifetime, if that is shorter
STALE_MARGIN = 5.0  # a token this close to expiry is not handed out: it may die in flight
FAILURE_HOLD = 2.0  # after a failed mint, the same error is answered for this long ...
FAILURE_HOLD_MAX = 60.0  # ... doubled after each failure in a row, up to this
DEFAULT_LIFETIME = 300.0  # when the endpoint does not say (expires_in is only RECOMMENDED)


class CredentialError(Exception):
    """Minting failed. ``reason`` is a short code for metrics; the message says what to check
    and never holds a secret (it may hold the endpoint's own error text, redacted)."""

    def __init__(self, reason: str, message: str, *, status: int = 502):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.status = status  # 503: the credential is unavailable (federation), not the upstream


@dataclass(frozen=True, slots=True)
class Token:
    value: str
    expires_at: float  # wall-clock seconds
    minted_at: float
    material: object = None  # what a source needs beside the value (AWS: its session keys)

    @property
    def refresh_at(self) -> float:
        lifetime = max(self.expires_at - self.minted_at, 0.0)
        return self.expires_at - min(REFRESH_AHEAD_MAX, lifetime * REFRESH_AHEAD_FRACTION)

    def usable(self, now: float) -> bool:
        lifetime = self.expires_at - self.minted_at
        return now < self.expires_at - min(STALE_MARGIN, lifetime * 0.1)


class TokenCache:
    """Holds one token for one credential source; ``mint`` makes a new one."""

    def __init__(self, mint: Callable[[], Awaitable[Token]], *,
                 on_minted: Callable[[Token], None] = lambda token: None,
                 on_failed: Callable[[CredentialError], None] = lambda error: None,
                 clock: Callable[[], float] = time.time):
        self._mint = mint
        self._on_minted, self._on_failed = on_minted, on_failed
        self._clock = clock
        self.token: Token | None = None
        self.previous: Token | None = None  # still redacted: responses may be in flight
        self._inflight: asyncio.Future[Token] | None = None
        self._failure: tuple[float, CredentialError] | None = None
        self.failures = 0  # failed mints in a row: the hold doubles with each

    async def get(self) -> Token:
        now = self._clock()
        token = self.token
        if token is not None and token.usable(now):
            if now >= token.refresh_at and self._inflight is None and not self._holding(now):
                self._start_mint()  # in the background
            return token
        if self._inflight is None:
            if self._holding(now):
                raise self._failure[1]
            self._start_mint()
        return await asyncio.shield(self._inflight)

    def _holding(self, now: float) -> bool:
        return self._failure is not None and now < self._failure[0] + self.hold

    @property
    def hold(self) -> float:
        """How long the last failure is answered from memory: an endpoint that keeps refusing
        is asked again after 2, 4, 8 ... 60 s, however many requests wait for it."""
        return min(FAILURE_HOLD * 2 ** max(self.failures - 1, 0), FAILURE_HOLD_MAX)

    def _start_mint(self) -> asyncio.Future[Token]:
        self._inflight = asyncio.ensure_future(self._mint_once())
        self._inflight.add_done_callback(_consume)
        return self._inflight

    async def _mint_once(self) -> Token:
        try:
            token = await self._mint()
        except CredentialError as error:
            self._failure = (self._clock(), error)
            self.failures += 1
            self._on_failed(error)
            log.warning("minting a token failed: %s", error.message)
            raise
        finally:
            self._inflight = None
        self._failure, self.failures = None, 0
        self.previous, self.token = self.token, token
        self._on_minted(token)
        return token


def _consume(future: asyncio.Future) -> None:
    """A mint's failure is logged and counted in ``_mint_once``; retrieve it here so asyncio
    does not report it as never retrieved when nobody awaited it (a background refresh, or
    every waiting client hung up)."""
    if not future.cancelled():
        future.exception()
