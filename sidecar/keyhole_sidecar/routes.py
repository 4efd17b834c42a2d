"""The resolved configuration: injections joined with their secret values, ready to serve.

A :class:`RouteTable` is immutable; a reload builds a new one and swaps a single reference,
so a request always sees one consistent table from start to end.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from keyhole_common.spec import HostPattern, Problem, SecretInjection, SecretKeyRef, SpecError
from keyhole_common.spec.model import VALUE_PLACEHOLDER, credential_refs
from keyhole_sidecar.redact import Redactor, secret_forms
from keyhole_sidecar.secrets import SecretMissing

MIN_SECRET_LENGTH = 8


class LiveCredential(Protocol):
    """What a route needs of a credential source (sidecar.credentials builds them)."""

    kind: str
    header_names: frozenset[str]

    def redactor(self) -> Redactor: ...


CredentialFactory = Callable[[SecretInjection, Callable[..., str]], LiveCredential]
"""Builds (or finds again) the live source of an injection's credential."""


@dataclass(frozen=True, slots=True)
class Route:
    """One injection with its values resolved. Values never appear in ``repr``."""

    injection: SecretInjection
    headers: tuple[tuple[str, str], ...] = field(repr=False)
    query: tuple[tuple[str, str], ...] = field(repr=False)
    redactor: Redactor = field(repr=False)
    credential: LiveCredential | None = field(default=None, repr=False)
    unavailable: str | None = None  # why requests routed here are refused (its Secret is gone)
    fingerprints: tuple[tuple[SecretKeyRef, str], ...] = field(default=(), repr=False)
    """Each Secret key read for this route and a short digest of its value (see
    :func:`value_fingerprint`): what tells a person which value is being served."""
    _combined: list = field(default_factory=lambda: [None, None], repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.injection.name

    @property
    def source(self) -> str:
        """What serves this route's credential, for the audit log."""
        return self.credential.kind if self.credential else "static"

    @property
    def header_names(self) -> frozenset[str]:
        names = frozenset(name.lower() for name, _ in self.headers)
        return names | self.credential.header_names if self.credential else names

    def live_redactor(self) -> Redactor:
        """The static values' redactor, joined by the credential source's live tokens."""
        if self.credential is None:
            return self.redactor
        minted = self.credential.redactor()
        if self._combined[0] is not minted:  # rebuilt only when a token changed
            self._combined[:] = [minted, Redactor((*self.redactor.forms, *minted.forms))]
        return self._combined[1]

    @property
    def dropped_headers(self) -> frozenset[str]:
        """The client's headers that never go upstream on this route: those it sets and
        those its injection drops (``stripHeaders``; a model API's credential headers)."""
        return self.header_names | self.injection.dropped_header_names()

    @property
    def query_names(self) -> frozenset[str]:
        return frozenset(name for name, _ in self.query)


def value_fingerprint(value: str) -> str:
    """The first 8 hex digits of the value's SHA-256: enough to tell a rotated value from the
    old one (``printf %s "$VALUE" | sha256sum | cut -c1-8``), too few to confirm a guess of a
    short password — a 32-bit digest matches tens of thousands of 8-character candidates."""
    return "sha256:" + hashlib.sha256(value.encode()).hexdigest()[:8]


def resolve_route(injection: SecretInjection, read: Callable[..., str],
                  credentials: CredentialFactory | None = None) -> Route:
    """Read the injection's secrets and build its route; raise ValueError naming what failed."""
    fingerprints: dict[SecretKeyRef, str] = {}

    def remembered(ref: SecretKeyRef, **options) -> str:
        value = read(ref, **options)
        fingerprints[ref] = value_fingerprint(value)
        return value

    credential = None
    if injection.credential is not None:
        if credentials is None:
            raise ValueError("this injection has a credential source, which needs the proxy")
        credential = credentials(injection, remembered)
    static_refs = [r for r in injection.secret_refs() if r not in credential_refs(
        injection.credential)]
    values: dict[SecretKeyRef, str] = {ref: remembered(ref) for ref in static_refs}
    secrets: list[str] = []
    headers: list[tuple[str, str]] = []
    for h in injection.headers:
        value = values[h.secret]
        _require_length(value, h.secret)
        headers.append((h.name, h.format.replace(VALUE_PLACEHOLDER, value)))
        secrets.append(value)
    if injection.basic_auth:
        username = values[injection.basic_auth.username]
        password = values[injection.basic_auth.password] if injection.basic_auth.password else ""
        if ":" in username:
            raise ValueError(f"{injection.basic_auth.username}: a basic-auth username may not "
                             "contain ':'")
        token = base64.b64encode(f"{username}:{password}".encode()).decode()
        headers.append(("Authorization", f"Basic {token}"))
        secrets.extend([username, f"{username}:{password}"])
        if password:
            _require_length(password, injection.basic_auth.password)
            secrets.append(password)
    query = []
    for q in injection.query_params:
        value = values[q.secret]
        _require_length(value, q.secret)
        query.append((q.name, value))
        secrets.append(value)
    for name, value in headers:
        if not value.isascii():
            raise ValueError(f"header {name}: the secret value is not ASCII, which HTTP headers "
                             "need")
        secrets.append(value)
    return Route(injection=injection, headers=tuple(headers), query=tuple(query),
                 redactor=Redactor(secret_forms(secrets)), credential=credential,
                 fingerprints=tuple(fingerprints.items()))


def _require_length(value: str, ref: SecretKeyRef) -> None:
    if len(value) < MIN_SECRET_LENGTH:
        raise ValueError(f"Secret {ref}: the value is shorter than {MIN_SECRET_LENGTH} characters; "
                         "too short to be a credential or to redact reliably")


def unavailable_route(injection: SecretInjection, why: str) -> Route:
    """A route that still claims its hosts (so their requests are refused, not passed through
    without the key) but injects nothing."""
    return Route(injection=injection, headers=(), query=(), redactor=Redactor(()),
                 unavailable=why)


@dataclass(frozen=True, slots=True)
class Unusable:
    """An injection whose credential could not be built from the files as they are now."""

    injection: str
    problem: str  # names files; for the log and ``check``
    summary: str  # names no file: what an agent refused and the admin port's /config say
    missing: bool  # its Secret or key is gone (revoked), rather than present but broken
    kept_previous: bool  # broken: the last good value goes on serving

    def as_problem(self) -> Problem:
        return Problem(self.injection, "secrets", self.problem)


MATCH_CACHE_SIZE = 4096


class RouteTable:
    """All routes of one configuration, looked up by host or by injection name."""

    def __init__(self, routes: Iterable[Route], unusable: Iterable[Unusable] = ()):
        self.routes: tuple[Route, ...] = tuple(routes)
        self.unusable: tuple[Unusable, ...] = tuple(unusable)
        self._by_name = {r.name: r for r in self.routes}
        self._matches: dict[tuple[str, int, bool], tuple[Route, ...]] = {}
        self._every_form: tuple[tuple[Redactor, ...], Redactor] | None = None

    def __len__(self) -> int:
        return len(self.routes)

    def redactor(self) -> Redactor:
        """Every form of every value this table serves, minted tokens included: what no log
        line may hold. Rebuilt only when a route's live redactor changed (a token refresh)."""
        live = tuple(route.live_redactor() for route in self.routes)
        if self._every_form is None or self._every_form[0] != live:
            self._every_form = (live, Redactor(form for r in live for form in r.forms))
        return self._every_form[1]

    def by_name(self, name: str) -> Route | None:
        return self._by_name.get(name)

    def match(self, host: str, port: int, *, plain_http: bool = False) -> tuple[Route, ...]:
        """Every route one of whose host entries covers ``host:port``."""
        key = (host, port, plain_http)
        found = self._matches.get(key)
        if found is None:
            found = tuple(
                r for r in self.routes
                if any(h.matches(host, port, plain_http=plain_http) for h in r.injection.hosts)
            )
            if len(self._matches) >= MATCH_CACHE_SIZE:  # agents choose the names: stay bounded
                self._matches.clear()
            self._matches[key] = found
        return found

    def upstream_for(self, routes: tuple[Route, ...], host: str, port: int,
                     plain_http: bool = False) -> HostPattern:
        """The host entry that matched, whose port decides the upstream port."""
        for route in routes:
            for h in route.injection.hosts:
                if h.matches(host, port, plain_http=plain_http):
                    return h
        raise LookupError(host)


_BROKEN = "its Secret's value cannot be used (the sidecar's log says why)"


def build_route_table(injections: Iterable[SecretInjection], read: Callable[..., str],
                      credentials: CredentialFactory | None = None,
                      previous: RouteTable | None = None,
                      cluster_read: Callable[[str], Callable[..., str]] | None = None
                      ) -> RouteTable:
    """Resolve every injection. One whose Secret or key is gone becomes unavailable: removal
    is how users revoke, so it must stop injecting. One whose value is present but unusable
    (empty, a control character, ...) keeps its route from ``previous`` when the injection is
    unchanged — a half-done edit does not cut an agent off — and is unavailable otherwise.
    :attr:`RouteTable.unusable` says which and why. ``cluster_read(name)``: the reader of a
    cluster injection's values (from the operator); without it they are read as files too
    (a laptop running a ClusterSecretInjection from YAML)."""
    routes, unusable = [], []
    for injection in injections:
        reader = cluster_read(injection.name) if cluster_read and injection.cluster else read
        try:
            routes.append(resolve_route(injection, reader, credentials))
            continue
        except SecretMissing as exc:
            routes.append(unavailable_route(injection, f"injection {injection.name!r} is "
                                                       f"unavailable: {exc.summary}"))
            unusable.append(Unusable(injection.name, str(exc), exc.summary, missing=True,
                                     kept_previous=False))
            continue
        except ValueError as exc:  # SecretUnavailable and every other value problem
            problem = str(exc)
        last = previous.by_name(injection.name) if previous is not None else None
        if last is not None and last.unavailable is None and last.injection == injection:
            routes.append(last)
            unusable.append(Unusable(injection.name, problem, f"{_BROKEN}; the last good value "
                                     "is still injected", missing=False, kept_previous=True))
        else:
            routes.append(unavailable_route(injection, f"injection {injection.name!r} is "
                                                       f"unavailable: {_BROKEN}"))
            unusable.append(Unusable(injection.name, problem, _BROKEN, missing=False,
                                     kept_previous=False))
    return RouteTable(routes, unusable)


def require_usable(table: RouteTable) -> RouteTable:
    """``table``, or :class:`SpecError` naming every injection that cannot inject."""
    if table.unusable:
        raise SpecError([u.as_problem() for u in table.unusable])
    return table
