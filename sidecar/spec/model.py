"""The SecretInjection API as frozen, typed objects: parsed once, then only read.

These types carry *references* to secrets, never secret values; resolving values is the
job of :mod:`sidecar.routes`. The operator imports this module too, so it stays pure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sidecar.spec.hosts import HostPattern

API_GROUP = "keyhole.dev"
API_VERSION = f"{API_GROUP}/v1alpha1"
KIND = "SecretInjection"
LIST_KIND = "SecretInjectionList"
VALUE_PLACEHOLDER = "{value}"


@dataclass(frozen=True, slots=True)
class SecretKeyRef:
    """``valueFrom.secretKeyRef``: one key of one Secret in the injection's namespace."""

    name: str
    key: str

    def __str__(self) -> str:
        return f"{self.name}/{self.key}"


@dataclass(frozen=True, slots=True)
class HeaderInjection:
    """Set header ``name`` to ``format`` with ``{value}`` replaced by the secret."""

    name: str
    secret: SecretKeyRef
    format: str = VALUE_PLACEHOLDER


@dataclass(frozen=True, slots=True)
class BasicAuth:
    """``Authorization: Basic base64(username:password)``; no password means an empty one."""

    username: SecretKeyRef
    password: SecretKeyRef | None = None


@dataclass(frozen=True, slots=True)
class QueryParamInjection:
    """Set query parameter ``name`` to the secret, dropping any value the client sent."""

    name: str
    secret: SecretKeyRef


@dataclass(frozen=True, slots=True)
class Rule:
    """One allowlist entry: a request passes when its method and path both match.

    ``None`` means "any". Path globs: ``*`` matches within one segment, ``**`` across segments.
    """

    methods: frozenset[str] | None = None
    paths: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class AgentEnv:
    """A variable the operator sets in agent containers: a fixed placeholder or a base URL."""

    name: str
    placeholder: bool = False
    base_url: str | None = None


@dataclass(frozen=True, slots=True)
class SecretInjection:
    """One parsed ``SecretInjection`` document."""

    name: str
    namespace: str | None
    hosts: tuple[HostPattern, ...]
    headers: tuple[HeaderInjection, ...] = ()
    basic_auth: BasicAuth | None = None
    query_params: tuple[QueryParamInjection, ...] = ()
    rules: tuple[Rule, ...] | None = None
    agent_env: tuple[AgentEnv, ...] = ()
    pod_selector: dict | None = field(default=None, compare=False, hash=False)

    def secret_refs(self) -> tuple[SecretKeyRef, ...]:
        """Every Secret key this injection reads, in spec order, without repeats."""
        refs: list[SecretKeyRef] = [h.secret for h in self.headers]
        if self.basic_auth:
            refs.append(self.basic_auth.username)
            if self.basic_auth.password:
                refs.append(self.basic_auth.password)
        refs.extend(q.secret for q in self.query_params)
        return tuple(dict.fromkeys(refs))

    def injected_header_names(self) -> frozenset[str]:
        """Lower-case names of the headers this injection sets (basic auth sets Authorization)."""
        names = {h.name.lower() for h in self.headers}
        if self.basic_auth:
            names.add("authorization")
        return frozenset(names)

    @property
    def base_url_upstream(self) -> HostPattern | None:
        """The upstream for base-URL mode: the first host entry without a wildcard."""
        return next((h for h in self.hosts if not h.wildcard), None)
