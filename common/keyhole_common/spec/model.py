"""The SecretInjection API as frozen, typed objects: parsed once, then only read.

These types carry *references* to secrets, never secret values; resolving values is the
job of :mod:`keyhole_sidecar.routes`. The operator imports this module too, so it stays pure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from keyhole_common.spec.hosts import HostPattern

API_GROUP = "keyhole.dev"
API_VERSION = f"{API_GROUP}/v1alpha1"
KIND = "SecretInjection"
CLUSTER_KIND = "ClusterSecretInjection"
"""Cluster-scoped: the same spec plus a namespaceSelector; its Secrets live in one central
namespace, and sidecars receive their values from the operator, never from a mount."""
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
class GitHubApp:
    """Installation tokens minted from a GitHub App's private key (``spec.githubApp``).

    The installation is ``installation_id``, or looked up from ``repository`` ("owner/name").
    Tokens may be narrowed to ``repositories`` and ``permissions``.
    """

    app_id: str
    private_key: SecretKeyRef
    installation_id: str | None = None
    repository: str | None = None
    repositories: tuple[str, ...] = ()
    permissions: tuple[tuple[str, str], ...] = ()
    api_url: str = "https://api.github.com"

    @property
    def api_host(self) -> str:
        """The API's host[:port], in lower case."""
        return self.api_url.split("://", 1)[1].split("/", 1)[0].lower()

    def is_api_request(self, authority: str, path: str) -> bool:
        """Does a request go to the REST/GraphQL API (``token``) rather than git (basic auth)?
        On github.com they are different hosts; GitHub Enterprise Server serves both from one
        host, its API under ``/api/``."""
        api = self.api_host.removesuffix(":443")
        if authority.lower().removesuffix(":443") != api:
            return False
        return "/" not in self.api_url.split("://", 1)[1] or path.startswith("/api/")


@dataclass(frozen=True, slots=True)
class OAuth2ClientCredentials:
    """Access tokens from an OAuth 2.0 token endpoint, client credentials grant (RFC 6749 §4.4)."""

    token_url: str
    client_id: SecretKeyRef
    client_secret: SecretKeyRef
    scopes: tuple[str, ...] = ()
    audience: str | None = None
    auth_method: str = "client_secret_basic"  # or client_secret_post


@dataclass(frozen=True, slots=True)
class AwsSigV4:
    """Every request signed with AWS Signature Version 4 for ``service`` in ``region``."""

    region: str
    service: str
    access_key_id: SecretKeyRef
    secret_access_key: SecretKeyRef
    session_token: SecretKeyRef | None = None
    payload: str = "signed"  # or "unsigned": UNSIGNED-PAYLOAD, the body streams

    @property
    def refs(self) -> tuple[SecretKeyRef, ...]:
        return (self.access_key_id, self.secret_access_key,
                *((self.session_token,) if self.session_token else ()))


FEDERATION_PROVIDERS = ("claude", "aws", "gcp", "entra", "tokenExchange", "jwtBearer",
                        "clientAssertion")
"""``spec.workloadIdentity``'s providers: where a subject token is exchanged, and how."""


@dataclass(frozen=True, slots=True)
class WorkloadIdentity:
    """No key at all (``spec.workloadIdentity``): the proxy presents a short-lived token of an
    identity only keyhole holds (its ``audience`` is the token's ``aud``) to a provider's
    token endpoint and injects what the provider answers. ``settings`` are the provider's own
    fields by their spec names (organizationID, roleARN, ...), defaults filled in."""

    provider: str  # one of FEDERATION_PROVIDERS
    audience: str
    token_url: str  # where the subject token is sent (AWS: the STS endpoint)
    settings: tuple[tuple[str, str], ...] = ()
    scopes: tuple[str, ...] = ()

    def get(self, name: str) -> str | None:
        return dict(self.settings).get(name)

    @property
    def signs(self) -> bool:
        """AWS: the session credentials sign each request (SigV4) rather than ride in it."""
        return self.provider == "aws"

    @property
    def header_names(self) -> frozenset[str]:
        """Lower-case names of the headers the minted credential owns."""
        if self.signs:
            return SIGV4_HEADERS
        if self.provider == "claude":  # a bearer token, never beside an API key
            return frozenset({"authorization", "x-api-key"})
        return frozenset({"authorization"})


Credential = GitHubApp | OAuth2ClientCredentials | AwsSigV4 | WorkloadIdentity
"""A credential source: the proxy makes the value itself instead of reading it verbatim."""
CREDENTIAL_FIELDS = {"githubApp": GitHubApp, "oauth2": OAuth2ClientCredentials,
                     "awsSigV4": AwsSigV4, "workloadIdentity": WorkloadIdentity}
# Headers a SigV4 signature owns; a client's own values are dropped like any injected header.
SIGV4_HEADERS = frozenset({"authorization", "x-amz-date", "x-amz-security-token",
                           "x-amz-content-sha256"})


def credential_refs(credential: Credential | None) -> tuple[SecretKeyRef, ...]:
    if isinstance(credential, GitHubApp):
        return (credential.private_key,)
    if isinstance(credential, OAuth2ClientCredentials):
        return (credential.client_id, credential.client_secret)
    if isinstance(credential, AwsSigV4):
        return credential.refs
    return ()


WINDOW_PERIODS = {"perHour": 3600, "perDay": 86400}
"""``spec.limits.window`` keys and their length in seconds (periods start at UTC boundaries)."""


@dataclass(frozen=True, slots=True)
class Limits:
    """``spec.limits`` (or a rule's): what one pod's sidecar lets through for an injection.
    ``None`` means no limit of that kind."""

    requests_per_minute: int | None = None
    burst: int | None = None
    """Requests allowed at once before the per-minute rate applies; default: one minute's worth."""
    concurrent_requests: int | None = None
    request_body_bytes: int | None = None
    window: tuple[tuple[str, int], ...] = ()
    """(period, requests) pairs, e.g. (("perDay", 5000),); counted on disk across restarts."""

    @property
    def bucket_size(self) -> int | None:
        if self.requests_per_minute is None:
            return None
        return self.burst if self.burst is not None else self.requests_per_minute


APPROVAL_TIMEOUT = 90.0
"""Seconds a request that needs a person's approval is held by default (as Claw Patrol)."""
MAX_APPROVAL_TIMEOUT = 3600.0


@dataclass(frozen=True, slots=True)
class Approval:
    """A person approves each request (``rule.approval``, ``mcp.*.approval``) before it is
    sent: the sidecar holds it up to ``timeout`` seconds, then refuses it."""

    timeout: float = APPROVAL_TIMEOUT


@dataclass(frozen=True, slots=True)
class Rule:
    """One allowlist entry: a request passes when its method and path both match.

    ``None`` means "any". Path globs: ``*`` matches within one segment, ``**`` across segments.
    ``limits``, when given, replace the injection's limits for the requests this rule admits;
    ``approval``, when given, holds each of them until a person approves it.
    """

    methods: frozenset[str] | None = None
    paths: tuple[str, ...] | None = None
    limits: Limits | None = None
    approval: Approval | None = None


BUDGET_PERIODS = ("hour", "day", "month")
BUDGET_SCOPES = ("pod", "injection")
"""``spec.llm.budgets[].per``: UTC hours, days and calendar months."""


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens for the models matching ``model`` (a glob, e.g. ``gpt-4o*``).
    ``cached_input`` and ``cache_write`` default to ``input``."""

    model: str
    input: float
    output: float
    cached_input: float | None = None
    cache_write: float | None = None


@dataclass(frozen=True, slots=True)
class Budget:
    """At most ``tokens`` (input and output together) or ``spend`` USD per UTC ``per``, for
    the injection's requests — of the models matching ``models`` (globs), or of every model
    when it is None — of each pod on its own, or (``shared``, ``for: injection``) of all the
    pods the injection serves together, a count the operator keeps."""

    per: str
    tokens: int | None = None
    spend: float | None = None
    models: tuple[str, ...] | None = None
    shared: bool = False

    @property
    def name(self) -> str:
        """A stable, readable identity: ``tokens/day``, ``spend/month[gpt-4*,o*]``, and
        ``injection:tokens/day`` for a budget all pods share."""
        kind = "tokens" if self.tokens is not None else "spend"
        return (("injection:" if self.shared else "") + f"{kind}/{self.per}"
                + (f"[{','.join(self.models)}]" if self.models else ""))


@dataclass(frozen=True, slots=True)
class Llm:
    """``spec.llm``: the model API the injection's hosts speak (``openai``, ``anthropic`` or
    ``gemini``), stated rather than guessed from the host: proxies and private endpoints
    speak them under any name. The proxy reads the model and token usage of each answer,
    prices it (``prices`` first, then the table shipped with keyhole) and holds this pod to
    the ``budgets``."""

    api: str
    prices: tuple[Price, ...] = ()
    budgets: tuple[Budget, ...] = ()


@dataclass(frozen=True, slots=True)
class McpCondition:
    """A CEL expression a call must satisfy, for the names (or URIs) ``match`` covers: true
    allows, anything else (false, an error, a missing field) refuses. A tool call sees
    ``name`` and ``arguments``; a prompt, ``name`` and ``arguments``; a resource, ``uri``."""

    match: tuple[str, ...]
    expression: str
    message: str | None = None


@dataclass(frozen=True, slots=True)
class McpApproval:
    """The uses (names or URIs matching ``match``) a person approves one by one."""

    match: tuple[str, ...]
    approval: Approval = Approval()


@dataclass(frozen=True, slots=True)
class McpAccess:
    """What of one kind (tools, resources or prompts) the agent may use: globs over names
    (URIs for resources). ``allow`` None allows every one; ``deny`` wins over ``allow``;
    an allowed use matching ``approval`` waits for a person's yes."""

    allow: tuple[str, ...] | None = None
    deny: tuple[str, ...] = ()
    when: tuple[McpCondition, ...] = ()
    approval: tuple[McpApproval, ...] = ()


@dataclass(frozen=True, slots=True)
class Mcp:
    """``spec.mcp``: the hosts speak the Model Context Protocol. Every request to them is
    read as JSON-RPC and judged by tool, resource and prompt; listings are filtered."""

    tools: McpAccess = McpAccess()
    resources: McpAccess = McpAccess()
    prompts: McpAccess = McpAccess()

    def describe(self) -> list[str]:
        """The policy in a person's words, one line per kind: what check --verbose and
        kubectl keyhole explain show."""
        lines = []
        for kind in ("tools", "resources", "prompts"):
            access: McpAccess = getattr(self, kind)
            parts = ["all" if access.allow is None else
                     ("none" if not access.allow else "only " + ", ".join(access.allow))]
            if access.deny:
                parts.append("never " + ", ".join(access.deny))
            parts.extend(f"{', '.join(c.match)} when {c.expression}" for c in access.when)
            parts.extend(f"{', '.join(a.match)} after a person approves (held up to "
                         f"{a.approval.timeout:g}s)" for a in access.approval)
            lines.append(f"{kind}: {'; '.join(parts)}")
        return lines


# The headers each model API accepts a credential in (its SDKs' every way of passing one):
# with spec.llm, the client's values of all of them are dropped, whichever one is injected.
API_CREDENTIAL_HEADERS = {
    "openai": frozenset({"authorization", "api-key"}),  # api-key: Azure OpenAI
    "anthropic": frozenset({"authorization", "x-api-key"}),
    "gemini": frozenset({"authorization", "x-goog-api-key"}),
}


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
    strip_headers: tuple[str, ...] = ()
    """Lower-case names of headers a client may send that never go to these hosts (a
    placeholder credential an SDK sends beside the injected one)."""
    pod_selector: dict | None = field(default=None, compare=False, hash=False)
    credential: Credential | None = None
    capture: str | None = None
    """``proxy`` (clients use the proxy variables), ``transparent`` (keyhole-init redirects the
    pod's outbound traffic too), or None: the operator's default."""
    limits: Limits | None = None
    llm: Llm | None = None
    mcp: Mcp | None = None
    cluster: bool = False
    """A ``ClusterSecretInjection``: its Secrets are in the operator's central namespace."""
    namespace_selector: dict | None = field(default=None, compare=False, hash=False)
    """Which namespaces a cluster injection serves (None for a namespaced one)."""

    @property
    def kind(self) -> str:
        return CLUSTER_KIND if self.cluster else KIND

    def secret_refs(self) -> tuple[SecretKeyRef, ...]:
        """Every Secret key this injection reads, in spec order, without repeats."""
        refs: list[SecretKeyRef] = [h.secret for h in self.headers]
        if self.basic_auth:
            refs.append(self.basic_auth.username)
            if self.basic_auth.password:
                refs.append(self.basic_auth.password)
        refs.extend(q.secret for q in self.query_params)
        refs.extend(credential_refs(self.credential))
        return tuple(dict.fromkeys(refs))

    def injected_header_names(self) -> frozenset[str]:
        """Lower-case names of the headers this injection sets (basic auth sets Authorization)."""
        names = {h.name.lower() for h in self.headers}
        if self.basic_auth or self.credential:
            names.add("authorization")
        if isinstance(self.credential, AwsSigV4):
            names |= SIGV4_HEADERS
        if isinstance(self.credential, WorkloadIdentity):
            names |= self.credential.header_names
        return frozenset(names)

    def dropped_header_names(self) -> frozenset[str]:
        """Lower-case names of the client's headers that never go upstream: those this
        injection sets, those it names in ``stripHeaders``, and — when it states its model API
        — every header that API takes a credential in, so a placeholder never rides beside
        the key (the Anthropic SDK sends its auth token as Authorization, the key as
        x-api-key)."""
        names = self.injected_header_names() | frozenset(self.strip_headers)
        if self.llm is not None:
            names |= API_CREDENTIAL_HEADERS.get(self.llm.api, frozenset())
        return names

    @property
    def base_url_upstream(self) -> HostPattern | None:
        """The upstream for base-URL mode: the first host entry without a wildcard."""
        return next((h for h in self.hosts if not h.wildcard), None)
