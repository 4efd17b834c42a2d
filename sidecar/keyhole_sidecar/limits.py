"""Limits for runaway agents: a token bucket, a cap on requests in flight, the largest body,
and request counts per UTC hour or day — per injection (or per rule that carries its own
``limits``), in this pod's sidecar.

Decisions are pure functions of the state and the clock; :class:`Limiter` holds the state
(kept across configuration reloads: limits change, counters that still apply stay) and
:class:`WindowStore` the one piece of I/O, the window counts on disk (an ``emptyDir``), so a
crash loop does not reset the day.

The clock is the system's unless ``KEYHOLE_TEST_CLOCK`` names a file: then "now" is the number
of seconds in it, for tests that must count exactly (documented in docs/limits.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from keyhole_common.spec.model import WINDOW_PERIODS, Limits

log = logging.getLogger("keyhole.limits")
TEST_CLOCK_ENV = "KEYHOLE_TEST_CLOCK"
Scope = tuple[str, str]  # (injection, "spec" or "rules[i]")
SAVE_INTERVAL = 1.0  # seconds: the window file is written at most this often


def system_clock() -> Callable[[], float]:
    """Seconds since the epoch: the system's, or the test hook's."""
    path = os.environ.get(TEST_CLOCK_ENV)
    if not path:
        return time.time
    clock_file = Path(path)
    return lambda: float(clock_file.read_text().strip())


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request may not go now: the limit's name, and when it may (seconds from now and
    the wall-clock moment)."""

    injection: str
    limit: str  # requestsPerMinute, concurrentRequests, requestBodyBytes, window.perDay, …
    status: int
    retry_after: float | None
    resets_at: float | None
    detail: str


# -- pure decisions ------------------------------------------------------------------------
def refill(tokens: float, last: float, now: float, per_minute: int, size: int) -> float:
    """Tokens in a bucket of ``size`` filling at ``per_minute``, ``now - last`` seconds on."""
    return min(float(size), tokens + max(0.0, now - last) * per_minute / 60.0)


def seconds_to_token(tokens: float, per_minute: int) -> float:
    return (1.0 - tokens) * 60.0 / per_minute


def period_start(now: float, period: str) -> float:
    length = WINDOW_PERIODS[period]
    return now - (now % length)  # UTC boundaries: epoch seconds are UTC


class WindowStore:
    """Window counts in a small JSON file, rewritten atomically on every change."""

    what = "limit windows"

    def __init__(self, path: Path | None):
        self.path = path
        self._pending = False
        self._saved = 0.0
        self.counts: dict = {}
        if path is not None and path.exists():
            try:
                self.counts = self.parse(json.loads(path.read_text())["windows"])
            except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
                log.error("cannot read the %s in %s (%s); counting from zero", self.what,
                          path, type(exc).__name__)

    @staticmethod
    def parse(windows: dict) -> dict:
        """The counts as stored: window → (its start, requests)."""
        return {k: (float(v[0]), int(v[1])) for k, v in windows.items()}

    def save_soon(self) -> None:
        """At once if the file was last written over a second ago, else a second after that:
        under load one write a second, however many requests were counted (a kill loses at
        most that second's counts); at once when there is no event loop."""
        if self.path is None or self._pending:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.save()
            return
        self._pending = True
        loop.call_later(max(0.0, self._saved + SAVE_INTERVAL - time.monotonic()), self.save)

    def save(self) -> None:
        self._pending = False
        self._saved = time.monotonic()
        if self.path is None:
            return
        temporary = self.path.with_name(self.path.name + ".tmp")
        try:
            temporary.write_text(json.dumps({"version": 1, "windows": self.counts}))
            os.replace(temporary, self.path)
        except OSError as exc:
            log.error("cannot write the %s to %s: %s", self.what, self.path, exc.strerror)


class Ticket:
    """One admitted request; :meth:`Limiter.release` ends its place in the concurrency count."""

    __slots__ = ("scopes",)

    def __init__(self, scopes: list[Scope]):
        self.scopes = scopes


class Limiter:
    def __init__(self, state_dir: Path | None = None, clock: Callable[[], float] | None = None,
                 on_refused: Callable[[str, str], None] | None = None):
        self.clock = clock or system_clock()
        self._buckets: dict[Scope, tuple[float, float]] = {}  # tokens, when
        self._in_flight: dict[Scope, int] = {}
        if state_dir is not None:
            try:
                state_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                log.error("cannot create --state-dir %s (%s); window counts will not survive a "
                          "restart", state_dir, exc.strerror)
        self._windows = WindowStore(state_dir / "limits.json" if state_dir else None)
        self._on_refused = on_refused
        self._allowed: dict[str, tuple[str, str, str, int]] = {}  # for windows_left()

    def admit(self, wanted: tuple[tuple[str, str, Limits], ...],
              body_length: int | None) -> Ticket | Refusal:
        """Check every limit that applies first; take from them only if all agree."""
        if not wanted:
            return Ticket([])
        now = self.clock()
        for injection, scope, limits in wanted:
            refusal = self._check((injection, scope), limits, body_length, now)
            if refusal is not None:
                if self._on_refused:
                    self._on_refused(injection, refusal.limit)
                return refusal
        scopes = []
        changed = False
        for injection, scope, limits in wanted:
            key = (injection, scope)
            scopes.append(key)
            if limits.requests_per_minute is not None:
                tokens, last = self._buckets.get(key, (float(limits.bucket_size), now))
                tokens = refill(tokens, last, now, limits.requests_per_minute, limits.bucket_size)
                self._buckets[key] = (tokens - 1.0, now)
            self._in_flight[key] = self._in_flight.get(key, 0) + 1
            for period, allowed in limits.window:
                name = _window_key(key, period)
                start = period_start(now, period)
                begun, count = self._windows.counts.get(name, (start, 0))
                count = count + 1 if begun == start else 1
                self._windows.counts[name] = (start, count)
                self._allowed[name] = (injection, scope, period, allowed)
                changed = True
        if changed:
            self._windows.save_soon()
        return Ticket(scopes)

    def release(self, ticket: Ticket) -> None:
        for key in ticket.scopes:
            left = self._in_flight.get(key, 1) - 1
            if left > 0:
                self._in_flight[key] = left
            else:
                self._in_flight.pop(key, None)

    def _check(self, key: Scope, limits: Limits, body_length: int | None,
               now: float) -> Refusal | None:
        name = key[0]
        if limits.request_body_bytes is not None and body_length is not None \
                and body_length > limits.request_body_bytes:
            return Refusal(name, "requestBodyBytes", 413, None, None,
                           f"the body ({body_length} bytes) is over injection {name!r}'s "
                           f"requestBodyBytes ({limits.request_body_bytes})")
        if limits.concurrent_requests is not None \
                and self._in_flight.get(key, 0) >= limits.concurrent_requests:
            return Refusal(name, "concurrentRequests", 429, 1.0, now + 1.0,
                           f"injection {name!r} already has {limits.concurrent_requests} "
                           "requests in flight (concurrentRequests)")
        if limits.requests_per_minute is not None:
            tokens, last = self._buckets.get(key, (float(limits.bucket_size), now))
            tokens = refill(tokens, last, now, limits.requests_per_minute, limits.bucket_size)
            if tokens < 1.0:
                wait = seconds_to_token(tokens, limits.requests_per_minute)
                return Refusal(name, "requestsPerMinute", 429, wait, now + wait,
                               f"injection {name!r} allows {limits.requests_per_minute} "
                               f"requests per minute (burst {limits.bucket_size})")
        for period, allowed in limits.window:
            start = period_start(now, period)
            begun, count = self._windows.counts.get(_window_key(key, period), (start, 0))
            if begun == start and count >= allowed:
                ends = start + WINDOW_PERIODS[period]
                return Refusal(name, f"window.{period}", 429, ends - now, ends,
                               f"injection {name!r} allows {allowed} requests "
                               f"{_PERIOD_WORDS[period]} (window.{period})")
        return None

    def windows_left(self) -> list[tuple[str, str, int]]:
        """(injection, window, requests left) of every window counted so far, with the limit
        last applied to it: computed when metrics are scraped, not on every request."""
        now = self.clock()
        left = []
        for name, (injection, scope, period, allowed) in self._allowed.items():
            begun, count = self._windows.counts.get(name, (0.0, 0))
            used = count if begun == period_start(now, period) else 0
            left.append((injection, _window_label(scope, period), max(allowed - used, 0)))
        return left


_PERIOD_WORDS = {"perHour": "per UTC hour", "perDay": "per UTC day"}


def _window_key(key: Scope, period: str) -> str:
    return f"{key[0]}|{key[1]}|{period}"


def _window_label(scope: str, period: str) -> str:
    return period if scope == "spec" else f"{scope}.{period}"


def describe(limits: Limits) -> str:
    """One line a person reads: ``60/min (burst 5), 2 in flight, body ≤ 1000 B, 5000/perDay``."""
    parts = []
    if limits.requests_per_minute is not None:
        parts.append(f"{limits.requests_per_minute}/min (burst {limits.bucket_size})")
    if limits.concurrent_requests is not None:
        parts.append(f"{limits.concurrent_requests} in flight")
    if limits.request_body_bytes is not None:
        parts.append(f"body ≤ {limits.request_body_bytes} B")
    parts += [f"{count}/{period}" for period, count in limits.window]
    return ", ".join(parts) or "unlimited"


def retry_after_header(refusal: Refusal) -> str | None:
    """Whole seconds, rounded up: a client that waits this long finds the limit open."""
    if refusal.retry_after is None:
        return None
    return str(max(1, math.ceil(refusal.retry_after - 1e-9)))
