"""Parse SecretInjection documents into :mod:`keyhole_common.spec.model` objects, naming every problem.

The parser collects problems instead of stopping at the first, so ``keyhole-sidecar check``,
a config reload and (later) the validating webhook can all say everything that is wrong at
once: which document, which field, what is wrong and what to do.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from keyhole_common.spec.expressions import compile_expression
from keyhole_common.spec.hosts import HostPattern, is_ip_literal
from keyhole_common.spec.model import (
    API_GROUP,
    API_VERSION,
    BUDGET_PERIODS,
    BUDGET_SCOPES,
    CLUSTER_KIND,
    CREDENTIAL_FIELDS,
    FEDERATION_PROVIDERS,
    KIND,
    LIST_KIND,
    MAX_APPROVAL_TIMEOUT,
    SIGV4_HEADERS,
    VALUE_PLACEHOLDER,
    WINDOW_PERIODS,
    AgentEnv,
    Approval,
    AwsSigV4,
    BasicAuth,
    Budget,
    Credential,
    GitHubApp,
    HeaderInjection,
    Limits,
    Llm,
    Mcp,
    McpAccess,
    McpApproval,
    McpCondition,
    OAuth2ClientCredentials,
    Price,
    QueryParamInjection,
    Rule,
    SecretInjection,
    SecretKeyRef,
    WorkloadIdentity,
)

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # RFC 9110 token (header names, methods)
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_QUERY_NAME = re.compile(r"^[^\s&=#]+$")
# Headers the proxy owns: injecting them would break framing or routing.
_RESERVED_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "upgrade", "te", "trailer",
     "keep-alive", "expect"}
)
_SPEC_FIELDS = frozenset(
    {"podSelector", "namespaceSelector", "hosts", "headers", "basicAuth", "queryParams",
     "rules", "agentEnv", "capture", "limits", "llm", "mcp", "stripHeaders",
     *CREDENTIAL_FIELDS}
)
CAPTURE_MODES = ("proxy", "transparent")
LLM_APIS = ("openai", "anthropic", "gemini")
_MODEL_PATTERN = re.compile(r"^[A-Za-z0-9*?][A-Za-z0-9._:/@*?\-]{0,199}$")
_NAME_GLOB = re.compile(r"^[A-Za-z0-9_.\-*?\[\]!/]{1,128}$")
_URI_GLOB = re.compile(r"^[\x21-\x7e]{1,2048}$")
MAX_MCP_EXPRESSION = 4096
_INJECTING_FIELDS = ("headers", "basicAuth", "queryParams", *CREDENTIAL_FIELDS)
_GITHUB_ID = re.compile(r"^[0-9]+$")
_GITHUB_APP_ID = re.compile(r"^[A-Za-z0-9.]+$")  # the numeric App ID, or its client ID
_GITHUB_REPOSITORY = re.compile(r"^[A-Za-z0-9-]+/[A-Za-z0-9._-]+$")
_GITHUB_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
_GITHUB_ACCESS = ("read", "write", "admin")
_AWS_NAME = re.compile(r"^[a-z0-9-]+$")
_SCOPE = re.compile(r"^[\x21\x23-\x5B\x5D-\x7E]+$")  # RFC 6749 §3.3 scope-token
_DOC_FIELDS = frozenset({"apiVersion", "kind", "metadata", "spec", "status"})
SUPPORTED_FILE_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with the input: where, and what to do about it."""

    source: str  # e.g. "injections.yaml#2 (openai)"
    field: str  # e.g. "spec.headers[0].format"; "" for the whole document
    message: str

    def __str__(self) -> str:
        where = f"{self.source}: {self.field}" if self.field else self.source
        return f"{where}: {self.message}"


class SpecError(ValueError):
    """Raised with every problem found; ``str()`` lists them one per line."""

    def __init__(self, problems: Iterable[Problem]):
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class _Collector:
    """Walks one document, recording problems under their field paths."""

    def __init__(self, source: str):
        self.source = source
        self.problems: list[Problem] = []

    def add(self, path: str, message: str) -> None:
        self.problems.append(Problem(self.source, path, message))

    def mapping(self, value: Any, path: str, allowed: Iterable[str]) -> dict | None:
        if not isinstance(value, dict):
            self.add(path, f"must be a mapping, got {_kind(value)}")
            return None
        unknown = sorted(set(value) - set(allowed))
        for key in unknown:
            self.add(f"{path}.{key}", f"unknown field; allowed here: {', '.join(sorted(allowed))}")
        return value

    def sequence(self, value: Any, path: str, *, non_empty: bool = False) -> list | None:
        if not isinstance(value, list):
            self.add(path, f"must be a list, got {_kind(value)}")
            return None
        if non_empty and not value:
            self.add(path, "must not be empty")
            return None
        return value

    def string(self, value: Any, path: str, pattern: re.Pattern | None = None,
               hint: str = "") -> str | None:
        if not isinstance(value, str) or not value:
            self.add(path, f"must be a non-empty string, got {_kind(value)}")
            return None
        if pattern is not None and not pattern.match(value):
            self.add(path, f"{value!r} is not valid{': ' + hint if hint else ''}")
            return None
        return value


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _secret_ref(c: _Collector, value: Any, path: str) -> SecretKeyRef | None:
    value_from = c.mapping(value, path, {"secretKeyRef"})
    if value_from is None:
        return None
    if "secretKeyRef" not in value_from:
        c.add(f"{path}.secretKeyRef", "is required: {name: <Secret name>, key: <key in it>}")
        return None
    ref = c.mapping(value_from["secretKeyRef"], f"{path}.secretKeyRef", {"name", "key"})
    if ref is None:
        return None
    name = c.string(ref.get("name"), f"{path}.secretKeyRef.name", _DNS_SUBDOMAIN,
                    "a Secret name is lower-case letters, digits, '-' and '.'")
    key = c.string(ref.get("key"), f"{path}.secretKeyRef.key", _SECRET_KEY,
                   "a Secret key is letters, digits, '-', '_' and '.'")
    if key and key.startswith(".."):
        c.add(f"{path}.secretKeyRef.key", f"{key!r}: a Secret key may not start with '..'")
        key = None
    return SecretKeyRef(name, key) if name and key else None


def _headers(c: _Collector, value: Any) -> tuple[HeaderInjection, ...]:
    items = c.sequence(value, "spec.headers", non_empty=True) or []
    result, seen = [], set()
    for i, raw in enumerate(items):
        path = f"spec.headers[{i}]"
        entry = c.mapping(raw, path, {"name", "valueFrom", "format"})
        if entry is None:
            continue
        name = c.string(entry.get("name"), f"{path}.name", _TOKEN, "an HTTP header name")
        if name and (name.lower() in _RESERVED_HEADERS or name.lower().startswith("proxy-")):
            c.add(f"{path}.name", f"{name!r} is managed by the proxy and cannot be injected")
            name = None
        if name and name.lower() in seen:
            c.add(f"{path}.name", f"header {name!r} is set twice in this injection")
        secret = _secret_ref(c, entry.get("valueFrom"), f"{path}.valueFrom")
        fmt = entry.get("format", VALUE_PLACEHOLDER)
        fmt = _format(c, fmt, f"{path}.format")
        if name and secret and fmt:
            seen.add(name.lower())
            result.append(HeaderInjection(name=name, secret=secret, format=fmt))
    return tuple(result)


def _format(c: _Collector, fmt: Any, path: str) -> str | None:
    if not isinstance(fmt, str):
        c.add(path, f"must be a string such as 'Bearer {VALUE_PLACEHOLDER}', got {_kind(fmt)}")
        return None
    if fmt.count(VALUE_PLACEHOLDER) != 1:
        c.add(path, f"{fmt!r} must contain {VALUE_PLACEHOLDER} exactly once, "
                    f"e.g. 'Bearer {VALUE_PLACEHOLDER}'")
        return None
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in fmt):
        c.add(path, "must not contain CR, LF or other control characters")
        return None
    if not fmt.isascii():
        c.add(path, "must be ASCII: HTTP header values are")
        return None
    return fmt


def _basic_auth(c: _Collector, value: Any) -> BasicAuth | None:
    entry = c.mapping(value, "spec.basicAuth", {"usernameFrom", "passwordFrom"})
    if entry is None:
        return None
    if "usernameFrom" not in entry:
        c.add("spec.basicAuth.usernameFrom", "is required (e.g. Stripe's secret key)")
        return None
    username = _secret_ref(c, entry["usernameFrom"], "spec.basicAuth.usernameFrom")
    password = None
    if "passwordFrom" in entry:
        password = _secret_ref(c, entry["passwordFrom"], "spec.basicAuth.passwordFrom")
        if password is None:
            return None
    return BasicAuth(username=username, password=password) if username else None


def _query_params(c: _Collector, value: Any) -> tuple[QueryParamInjection, ...]:
    items = c.sequence(value, "spec.queryParams", non_empty=True) or []
    result, seen = [], set()
    for i, raw in enumerate(items):
        path = f"spec.queryParams[{i}]"
        entry = c.mapping(raw, path, {"name", "valueFrom"})
        if entry is None:
            continue
        name = c.string(entry.get("name"), f"{path}.name", _QUERY_NAME,
                        "no spaces, '&', '=' or '#'")
        if name and name in seen:
            c.add(f"{path}.name", f"query parameter {name!r} is set twice in this injection")
        secret = _secret_ref(c, entry.get("valueFrom"), f"{path}.valueFrom")
        if name and secret:
            seen.add(name)
            result.append(QueryParamInjection(name=name, secret=secret))
    return tuple(result)


_LIMIT_FIELDS = {"requestsPerMinute": "requests_per_minute", "burst": "burst",
                 "concurrentRequests": "concurrent_requests",
                 "requestBodyBytes": "request_body_bytes"}
_LIMIT_MAX = 10**12


def _count(c: _Collector, value: Any, path: str) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _LIMIT_MAX:
        got = repr(value) if isinstance(value, int | float) and not isinstance(value, bool) \
            else _kind(value)
        c.add(path, f"must be a whole number from 1 to {_LIMIT_MAX}, got {got}")
        return None
    return value


def _limits(c: _Collector, value: Any, path: str) -> Limits | None:
    entry = c.mapping(value, path, {*_LIMIT_FIELDS, "window"})
    if entry is None:
        return None
    found = {field: _count(c, entry[key], f"{path}.{key}")
             for key, field in _LIMIT_FIELDS.items() if key in entry}
    window: list[tuple[str, int]] = []
    if "window" in entry:
        periods = c.mapping(entry["window"], f"{path}.window", WINDOW_PERIODS)
        if periods is not None and not periods:
            c.add(f"{path}.window", f"give at least one of {', '.join(WINDOW_PERIODS)}")
        for period in WINDOW_PERIODS:
            if periods and period in periods:
                count = _count(c, periods[period], f"{path}.window.{period}")
                if count is not None:
                    window.append((period, count))
    if "burst" in entry and "requestsPerMinute" not in entry:
        c.add(f"{path}.burst", "a burst sizes the requestsPerMinute bucket; give "
                               "requestsPerMinute too")
    return Limits(window=tuple(window), **{k: v for k, v in found.items() if v is not None})


def _rules(c: _Collector, value: Any) -> tuple[Rule, ...] | None:
    items = c.sequence(value, "spec.rules", non_empty=True)
    if items is None:
        return None
    rules = []
    for i, raw in enumerate(items):
        path = f"spec.rules[{i}]"
        entry = c.mapping(raw, path, {"methods", "paths", "limits", "approval"})
        if entry is None:
            continue
        if not entry.keys() - {"limits", "approval"}:
            c.add(path, "an empty rule allows everything; give methods, paths or both")
            continue
        methods = paths = None
        if "methods" in entry:
            listed = c.sequence(entry["methods"], f"{path}.methods", non_empty=True) or []
            good = [c.string(m, f"{path}.methods[{j}]", _TOKEN, "an HTTP method")
                    for j, m in enumerate(listed)]
            methods = frozenset(m.upper() for m in good if m)
        if "paths" in entry:
            listed = c.sequence(entry["paths"], f"{path}.paths", non_empty=True) or []
            good = []
            for j, p in enumerate(listed):
                p = c.string(p, f"{path}.paths[{j}]")
                if p and not p.startswith("/"):
                    c.add(f"{path}.paths[{j}]", f"{p!r} must start with '/'")
                elif p and ("?" in p or "#" in p):
                    c.add(f"{path}.paths[{j}]", f"{p!r}: rules match paths only, not queries")
                elif p:
                    good.append(p)
            paths = tuple(good)
        limits = _limits(c, entry["limits"], f"{path}.limits") if "limits" in entry else None
        approval = _approval(c, entry["approval"], f"{path}.approval") \
            if "approval" in entry else None
        rules.append(Rule(methods=methods, paths=paths, limits=limits, approval=approval))
    return tuple(rules)


def _approval(c: _Collector, value: Any, path: str) -> Approval | None:
    """``approval: {timeout: 90s}`` (``{}``: the default timeout)."""
    entry = c.mapping(value, path, {"timeout"})
    if entry is None:
        return None
    if "timeout" not in entry:
        return Approval()
    seconds = parse_duration(entry["timeout"])
    if seconds is None or not 0 < seconds <= MAX_APPROVAL_TIMEOUT:
        c.add(f"{path}.timeout", "must be a duration from 1s to 1h, such as 90s, 5m or 1h; "
                                 f"got {entry['timeout']!r}")
        return None
    return Approval(timeout=seconds)


_DURATION = re.compile(r"^([0-9]{1,6})(s|m|h)$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(value: Any) -> float | None:
    """Seconds in ``90s``, ``30m`` or ``2h`` (one whole number, one unit), else None."""
    found = _DURATION.match(value) if isinstance(value, str) else None
    return None if found is None else float(int(found.group(1))
                                            * _DURATION_UNITS[found.group(2)])


def _strip_headers(c: _Collector, value: Any) -> tuple[str, ...]:
    names = []
    for i, raw in enumerate(c.sequence(value, "spec.stripHeaders") or []):
        path = f"spec.stripHeaders[{i}]"
        name = c.string(raw, path, _TOKEN, "an HTTP header name")
        if name and (name.lower() in _RESERVED_HEADERS or name.lower().startswith("proxy-")):
            c.add(path, f"{name!r} is managed by the proxy (it never reaches the upstream as "
                        "the client sent it); leave it out")
        elif name and name.lower() in names:
            c.add(path, f"{name!r} is listed twice")
        elif name:
            names.append(name.lower())
    return tuple(names)


def _agent_env(c: _Collector, value: Any) -> tuple[AgentEnv, ...]:
    items = c.sequence(value, "spec.agentEnv") or []
    result, seen = [], set()
    for i, raw in enumerate(items):
        path = f"spec.agentEnv[{i}]"
        entry = c.mapping(raw, path, {"name", "placeholder", "baseURL"})
        if entry is None:
            continue
        name = c.string(entry.get("name"), f"{path}.name", _ENV_NAME,
                        "an environment variable name")
        if name in seen:
            c.add(f"{path}.name", f"{name!r} is listed twice")
        kinds = [k for k in ("placeholder", "baseURL") if k in entry]
        if len(kinds) != 1:
            c.add(path, "give exactly one of placeholder: true or baseURL: /path")
            continue
        if "placeholder" in entry:
            if entry["placeholder"] is not True:
                c.add(f"{path}.placeholder", "must be true (or leave the entry out)")
                continue
            env = AgentEnv(name=name, placeholder=True) if name else None
        else:
            base = c.string(entry["baseURL"], f"{path}.baseURL")
            if base and not base.startswith("/"):
                c.add(f"{path}.baseURL", f"{base!r} must be a path starting with '/', e.g. /v1")
                continue
            env = AgentEnv(name=name, base_url=base) if name and base else None
        if env:
            seen.add(name)
            result.append(env)
    return tuple(result)


def _https_url(c: _Collector, value: Any, path: str, example: str) -> str | None:
    url = c.string(value, path)
    if url is None:
        return None
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        c.add(path, f"{url!r} has a malformed port")
        return None
    if parts.scheme != "https" or not parts.hostname:
        c.add(path, f"{url!r} must be an https:// URL such as {example!r}: credentials are "
                    "only ever sent over TLS")
    elif parts.username is not None or parts.fragment or any(ord(ch) <= 0x20 for ch in url):
        c.add(path, f"{url!r} must have no user, fragment or spaces")
    elif is_ip_literal(parts.hostname):  # as for hosts: names only, resolved under --egress
        c.add(path, f"{url!r} names an IP address; use the endpoint's DNS name")
    else:
        return url
    return None


def _required_ref(c: _Collector, entry: dict, field_name: str, path: str,
                  what: str) -> SecretKeyRef | None:
    if field_name not in entry:
        c.add(f"{path}.{field_name}", f"is required: {what}")
        return None
    return _secret_ref(c, entry[field_name], f"{path}.{field_name}")


def _github_app(c: _Collector, value: Any) -> GitHubApp | None:
    path = "spec.githubApp"
    entry = c.mapping(value, path, {"appID", "installationID", "repository", "privateKeyFrom",
                                    "repositories", "permissions", "apiURL"})
    if entry is None:
        return None
    app_id = entry.get("appID")
    app_id = c.string(str(app_id) if isinstance(app_id, int) else app_id, f"{path}.appID",
                      _GITHUB_APP_ID, "the App's ID (a number) or its client ID")
    key = _required_ref(c, entry, "privateKeyFrom", path, "the App's private key (PEM), "
                        "as downloaded from the App's settings")
    installation = repository = None
    if ("installationID" in entry) == ("repository" in entry):
        c.add(path, "give exactly one of installationID or repository (owner/name) to find "
                    "the App's installation")
    elif "installationID" in entry:
        raw = entry["installationID"]
        installation = c.string(str(raw) if isinstance(raw, int) else raw,
                                f"{path}.installationID", _GITHUB_ID, "an installation ID is a number")
    else:
        repository = c.string(entry["repository"], f"{path}.repository", _GITHUB_REPOSITORY,
                              "owner/name, e.g. acme/widgets")
    repositories: list[str] = []
    if "repositories" in entry:
        listed = c.sequence(entry["repositories"], f"{path}.repositories", non_empty=True) or []
        repositories = [r for j, r in enumerate(listed) if c.string(
            r, f"{path}.repositories[{j}]", _GITHUB_NAME, "a repository name without its owner")]
    permissions: list[tuple[str, str]] = []
    if "permissions" in entry:
        granted = entry["permissions"]
        if not isinstance(granted, dict) or not granted:
            c.add(f"{path}.permissions", "must be a mapping such as {contents: read}")
        else:
            for name, access in sorted(granted.items()):
                if not isinstance(name, str) or not _GITHUB_NAME.match(name):
                    c.add(f"{path}.permissions", f"{name!r} is not a permission name")
                elif access not in _GITHUB_ACCESS:
                    c.add(f"{path}.permissions.{name}", f"must be one of {', '.join(_GITHUB_ACCESS)}")
                else:
                    permissions.append((name, access))
    api_url = "https://api.github.com"
    if "apiURL" in entry:
        api_url = _https_url(c, entry["apiURL"], f"{path}.apiURL",
                             "https://github.example.com/api/v3")
    if not (app_id and key and (installation or repository) and api_url):
        return None
    return GitHubApp(app_id=app_id, private_key=key, installation_id=installation,
                     repository=repository, repositories=tuple(repositories),
                     permissions=tuple(permissions), api_url=api_url.rstrip("/"))


def _oauth2(c: _Collector, value: Any) -> OAuth2ClientCredentials | None:
    path = "spec.oauth2"
    entry = c.mapping(value, path, {"tokenURL", "clientIDFrom", "clientSecretFrom", "scopes",
                                    "audience", "authMethod"})
    if entry is None:
        return None
    if "tokenURL" not in entry:
        c.add(f"{path}.tokenURL", "is required: the token endpoint, e.g. "
                                  "https://auth.example.com/oauth2/token")
        token_url = None
    else:
        token_url = _https_url(c, entry["tokenURL"], f"{path}.tokenURL",
                               "https://auth.example.com/oauth2/token")
    client_id = _required_ref(c, entry, "clientIDFrom", path, "the client ID's Secret key")
    secret = _required_ref(c, entry, "clientSecretFrom", path, "the client secret's Secret key")
    scopes: list[str] = []
    if "scopes" in entry:
        listed = c.sequence(entry["scopes"], f"{path}.scopes", non_empty=True) or []
        scopes = [s for j, s in enumerate(listed) if c.string(
            s, f"{path}.scopes[{j}]", _SCOPE, "a scope has no spaces, quotes or backslashes")]
    audience = None
    if "audience" in entry:
        audience = c.string(entry["audience"], f"{path}.audience")
    method = entry.get("authMethod", "client_secret_basic")
    if method not in ("client_secret_basic", "client_secret_post"):
        c.add(f"{path}.authMethod", "must be client_secret_basic (the default) or "
                                    "client_secret_post")
        return None
    if not (token_url and client_id and secret) or ("audience" in entry and not audience):
        return None
    return OAuth2ClientCredentials(token_url=token_url, client_id=client_id, client_secret=secret,
                                   scopes=tuple(scopes), audience=audience, auth_method=method)


def _aws_sigv4(c: _Collector, value: Any) -> AwsSigV4 | None:
    path = "spec.awsSigV4"
    entry = c.mapping(value, path, {"region", "service", "accessKeyIDFrom",
                                    "secretAccessKeyFrom", "sessionTokenFrom", "payload"})
    if entry is None:
        return None
    region = c.string(entry.get("region"), f"{path}.region", _AWS_NAME, "e.g. us-east-1")
    service = c.string(entry.get("service"), f"{path}.service", _AWS_NAME,
                       "the signing name, e.g. s3, sqs, bedrock")
    key_id = _required_ref(c, entry, "accessKeyIDFrom", path, "the access key ID's Secret key")
    secret = _required_ref(c, entry, "secretAccessKeyFrom", path,
                           "the secret access key's Secret key")
    token = None
    if "sessionTokenFrom" in entry:
        token = _secret_ref(c, entry["sessionTokenFrom"], f"{path}.sessionTokenFrom")
        if token is None:
            return None
    payload = entry.get("payload", "signed")
    if payload not in ("signed", "unsigned"):
        c.add(f"{path}.payload", "must be signed (the default: the body is hashed) or unsigned "
                                 "(UNSIGNED-PAYLOAD, for services such as S3 that accept it)")
        return None
    if not (region and service and key_id and secret):
        return None
    return AwsSigV4(region=region, service=service, access_key_id=key_id,
                    secret_access_key=secret, session_token=token, payload=payload)


_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@/+=-]{0,255}$")  # a provider's identifier
_AUDIENCE = re.compile(r"^[\x21-\x7e]{1,512}$")
_GCP_PROVIDER = re.compile(r"^projects/[0-9]+/locations/global/workloadIdentityPools/"
                           r"[a-z0-9-]{4,32}/providers/[a-z0-9-]{4,32}$")
_EMAIL = re.compile(r"^[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+$")
_ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::[0-9]{12}:role/[\w+=,.@/-]{1,512}$")
_SESSION_NAME = re.compile(r"^[\w+=,.@-]{2,64}$")
# Per provider: its required and optional fields (besides tokenURL), and its defaults: the
# subject token's audience and the endpoint, each as its documentation gives them.
_PROVIDER_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "claude": (frozenset({"organizationID", "federationRuleID"}),
               frozenset({"serviceAccountID", "workspaceID", "tokenURL"})),
    "aws": (frozenset({"roleARN", "region", "service"}),
            frozenset({"sessionName", "durationSeconds", "stsURL", "payload"})),
    "gcp": (frozenset({"workloadIdentityProvider"}),
            frozenset({"serviceAccount", "scopes", "stsURL", "iamCredentialsURL"})),
    "entra": (frozenset({"tenantID", "clientID", "scopes"}), frozenset({"authorityURL"})),
    "tokenExchange": (frozenset({"tokenURL"}),
                      frozenset({"targetAudience", "resource", "scopes", "requestedTokenType"})),
    "jwtBearer": (frozenset({"tokenURL"}), frozenset({"clientID", "scopes"})),
    "clientAssertion": (frozenset({"tokenURL", "clientID"}), frozenset({"scopes"})),
}
_URL_FIELDS = ("tokenURL", "stsURL", "iamCredentialsURL", "authorityURL")


def _federation_defaults(provider: str, fields: dict[str, str]) -> tuple[str | None, str]:
    """(the subject token's default audience, the endpoint) for a provider's fields."""
    if provider == "claude":
        return "https://api.anthropic.com", fields.get(
            "tokenURL", "https://api.anthropic.com/v1/oauth/token")
    if provider == "aws":
        return "sts.amazonaws.com", fields.get(
            "stsURL", f"https://sts.{fields.get('region', 'us-east-1')}.amazonaws.com/")
    if provider == "gcp":
        return (f"https://iam.googleapis.com/{fields.get('workloadIdentityProvider', '')}",
                fields.get("stsURL", "https://sts.googleapis.com/v1/token"))
    if provider == "entra":
        authority = fields.get("authorityURL", "https://login.microsoftonline.com").rstrip("/")
        return ("api://AzureADTokenExchange",
                f"{authority}/{fields.get('tenantID', '')}/oauth2/v2.0/token")
    return None, fields.get("tokenURL", "")


def _workload_identity(c: _Collector, value: Any) -> WorkloadIdentity | None:
    path = "spec.workloadIdentity"
    entry = c.mapping(value, path, {"audience", *FEDERATION_PROVIDERS})
    if entry is None:
        return None
    given = [name for name in FEDERATION_PROVIDERS if name in entry]
    if len(given) != 1:
        c.add(path, f"name exactly one provider: {', '.join(FEDERATION_PROVIDERS)}"
                    + (f" (got {' and '.join(given)})" if given else ""))
        return None
    provider = given[0]
    where = f"{path}.{provider}"
    required, optional = _PROVIDER_FIELDS[provider]
    raw = c.mapping(entry[provider], where, required | optional)
    if raw is None:
        return None
    problems = len(c.problems)
    fields: dict[str, str] = {}
    scopes: list[str] = []
    for name in sorted(required - raw.keys()):
        c.add(f"{where}.{name}", f"is required for {provider}")
    for name, item in sorted(raw.items()):
        if name not in required | optional:
            continue
        if name == "scopes":
            listed = c.sequence(item, f"{where}.scopes", non_empty=True) or []
            scopes = [s for j, s in enumerate(listed) if c.string(
                s, f"{where}.scopes[{j}]", _SCOPE, "a scope has no spaces or quotes")]
        elif name in _URL_FIELDS:
            url = _https_url(c, item, f"{where}.{name}", "https://sts.example.com/token")
            if url:
                fields[name] = url
        elif name == "durationSeconds":
            if isinstance(item, bool) or not isinstance(item, int) or not 900 <= item <= 43200:
                c.add(f"{where}.durationSeconds", "must be a whole number of seconds from 900 "
                                                  "to 43200 (AWS's bounds)")
            else:
                fields[name] = str(item)
        elif name == "payload":
            if item not in ("signed", "unsigned"):
                c.add(f"{where}.payload", "must be signed (the default) or unsigned")
            else:
                fields[name] = item
        else:
            pattern, hint = {
                "roleARN": (_ROLE_ARN, "arn:aws:iam::123456789012:role/NAME"),
                "region": (_AWS_NAME, "e.g. us-east-1"),
                "service": (_AWS_NAME, "the signing name, e.g. bedrock, s3, sqs"),
                "sessionName": (_SESSION_NAME, "2 to 64 letters, digits and +=,.@-"),
                "workloadIdentityProvider": (_GCP_PROVIDER, "projects/NUMBER/locations/global/"
                                             "workloadIdentityPools/POOL/providers/PROVIDER"),
                "serviceAccount": (_EMAIL, "the service account's email"),
                "targetAudience": (_AUDIENCE, "printable, no spaces"),
                "resource": (_AUDIENCE, "printable, no spaces"),
                "requestedTokenType": (_AUDIENCE, "a token type URN"),
            }.get(name, (_ID, "letters, digits and _.:@/+=-"))
            text = c.string(str(item) if isinstance(item, int) else item, f"{where}.{name}",
                            pattern, hint)
            if text:
                fields[name] = text
    default_audience, token_url = _federation_defaults(provider, fields)
    audience = entry.get("audience", default_audience)
    if audience is None:
        c.add(f"{path}.audience", f"is required for {provider}: the audience the token "
                                  "endpoint's trust rule expects in the subject token's aud")
    else:
        audience = c.string(audience, f"{path}.audience", _AUDIENCE, "printable, no spaces")
    if len(c.problems) > problems or not audience or not token_url:
        return None
    return WorkloadIdentity(provider=provider, audience=audience, token_url=token_url,
                            settings=tuple(sorted(fields.items())), scopes=tuple(scopes))


_CREDENTIAL_PARSERS = {"githubApp": _github_app, "oauth2": _oauth2, "awsSigV4": _aws_sigv4,
                       "workloadIdentity": _workload_identity}


def _credential(c: _Collector, spec: dict, headers: tuple[HeaderInjection, ...],
                basic_auth: BasicAuth | None, hosts: list[HostPattern]) -> Credential | None:
    given = [name for name in CREDENTIAL_FIELDS if name in spec]
    if not given:
        return None
    if len(given) > 1:
        c.add("spec", f"{' and '.join(given)} are both credential sources; an injection has "
                      "at most one")
        return None
    name = given[0]
    credential = _CREDENTIAL_PARSERS[name](c, spec[name])
    owned = SIGV4_HEADERS if name == "awsSigV4" else credential.header_names if isinstance(
        credential, WorkloadIdentity) else frozenset({"authorization"})
    clashing = sorted(h.name for h in headers if h.name.lower() in owned)
    if clashing:
        c.add(f"spec.{name}", f"{name} sets {', '.join(clashing)}, which spec.headers also sets")
    if basic_auth:
        c.add(f"spec.{name}", f"{name} and basicAuth both set Authorization; keep one")
    # Claude's token endpoint is on the API's own host; what reaches it there with the
    # minted token cannot mint another (a jwt-bearer grant needs the subject token).
    if isinstance(credential, OAuth2ClientCredentials | WorkloadIdentity) and not (
            isinstance(credential, WorkloadIdentity) and credential.provider == "claude"):
        token_host = urlsplit(credential.token_url)
        port = token_host.port or 443
        if any(h.matches(token_host.hostname or "", port) for h in hosts):
            c.add(f"spec.{name}", "the token endpoint's host is one of spec.hosts: "
                                  "agents must not reach the endpoint that mints "
                                  "their tokens through the proxy")
    return credential


def _label_selector(c: _Collector, value: Any, path: str) -> dict | None:
    selector = c.mapping(value, path, {"matchLabels", "matchExpressions"})
    if selector is None:
        return None
    if "matchLabels" in selector and not isinstance(selector["matchLabels"], dict):
        c.add(f"{path}.matchLabels", "must be a mapping of label to value")
    if "matchExpressions" in selector and not isinstance(selector["matchExpressions"], list):
        c.add(f"{path}.matchExpressions", "must be a list")
    return selector


def _llm(c: _Collector, value: Any) -> Llm | None:
    """``spec.llm``: which model API the hosts speak, what its models cost, and the budgets."""
    entry = c.mapping(value, "spec.llm", {"api", "prices", "budgets"})
    if entry is None:
        return None
    api = entry.get("api")
    if api not in LLM_APIS:
        c.add("spec.llm.api", f"{api!r}: say which API the hosts speak: "
                              f"{', '.join(LLM_APIS)} (an OpenAI-compatible endpoint is openai)")
        return None
    prices = []
    for i, raw in enumerate(c.sequence(entry.get("prices", []), "spec.llm.prices") or []):
        price = _price(c, raw, f"spec.llm.prices[{i}]")
        if price is not None:
            prices.append(price)
    budgets = []
    for i, raw in enumerate(c.sequence(entry.get("budgets", []), "spec.llm.budgets") or []):
        budget = _budget(c, raw, f"spec.llm.budgets[{i}]")
        if budget is not None:
            budgets.append(budget)
    names = [b.name for b in budgets]
    for name in sorted({n for n in names if names.count(n) > 1}):
        c.add("spec.llm.budgets", f"two budgets are {name}: keep one")
    return Llm(api=api, prices=tuple(prices), budgets=tuple(budgets))


def _mcp(c: _Collector, value: Any) -> Mcp | None:
    """``spec.mcp``: the hosts speak MCP; which tools, resources and prompts the agent may use."""
    entry = c.mapping(value, "spec.mcp", {"tools", "resources", "prompts"})
    if entry is None:
        return None
    kinds = {"tools": (_NAME_GLOB, "a tool name, or a glob such as get_* or *delete*"),
             "resources": (_URI_GLOB, "a resource URI, or a glob such as repo://* (no spaces)"),
             "prompts": (_NAME_GLOB, "a prompt name, or a glob")}
    access = {kind: _mcp_access(c, entry[kind], f"spec.mcp.{kind}", *kinds[kind])
              for kind in kinds if kind in entry}
    return Mcp(**{k: v for k, v in access.items() if v is not None})


def _mcp_access(c: _Collector, value: Any, path: str, pattern: re.Pattern,
                hint: str) -> McpAccess | None:
    entry = c.mapping(value, path, {"allow", "deny", "when", "approval"})
    if entry is None:
        return None

    def globs(raw: Any, where: str, non_empty: bool) -> tuple[str, ...]:
        return tuple(g for i, item in enumerate(c.sequence(raw, where, non_empty=non_empty)
                                                or [])
                     if (g := c.string(item, f"{where}[{i}]", pattern, hint)))

    allow = globs(entry["allow"], f"{path}.allow", False) if "allow" in entry else None
    deny = globs(entry.get("deny", []), f"{path}.deny", False)
    when = []
    for i, raw in enumerate(c.sequence(entry.get("when", []), f"{path}.when") or []):
        where = f"{path}.when[{i}]"
        item = c.mapping(raw, where, {"match", "expression", "message"})
        if item is None:
            continue
        match = globs(item.get("match"), f"{where}.match", True)
        expression = c.string(item.get("expression"), f"{where}.expression")
        if expression is not None:
            problem = cel_problem(expression)
            if problem:
                c.add(f"{where}.expression", problem)
                expression = None
        message = item.get("message")
        if message is not None and (not isinstance(message, str) or not 0 < len(message) <= 500
                                    or not message.isprintable()):
            c.add(f"{where}.message", "must be one printable line of at most 500 characters")
            message = None
        if match and expression:
            when.append(McpCondition(match, expression, message))
    approvals = []
    for i, raw in enumerate(c.sequence(entry.get("approval", []), f"{path}.approval") or []):
        where = f"{path}.approval[{i}]"
        item = c.mapping(raw, where, {"match", "timeout"})
        if item is None:
            continue
        match = globs(item.get("match"), f"{where}.match", True)
        approval = _approval(c, {k: v for k, v in item.items() if k == "timeout"}, where)
        if match and approval is not None:
            approvals.append(McpApproval(match, approval))
    return McpAccess(allow=allow, deny=deny, when=tuple(when), approval=tuple(approvals))


def cel_problem(expression: str) -> str | None:
    """Why a CEL expression does not compile (with its line, column and a caret), or None."""
    if len(expression) > MAX_MCP_EXPRESSION:
        return f"is longer than {MAX_MCP_EXPRESSION} characters"
    try:
        compile_expression(expression)
    except ValueError as exc:  # the library's message names the position: <input>:1:22
        text = str(exc)
        return f"is not a CEL expression: {text[max(text.find('<input>:'), 0):]}"
    return None


def _usd(c: _Collector, value: Any, path: str, *, required: bool,
         what: str = "USD per million tokens") -> float | None:
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            0 <= value < 1e9) or value != value:
        c.add(path, f"{value!r}: give {what}, a number from 0 (no currency sign)")
        return None
    return float(value)


def _models(c: _Collector, value: Any, path: str) -> tuple[str, ...] | None:
    patterns = []
    for i, raw in enumerate(c.sequence(value, path, non_empty=True) or []):
        pattern = c.string(raw, f"{path}[{i}]", _MODEL_PATTERN,
                           "a model name, or a glob such as gpt-4o* or claude-*")
        if pattern:
            patterns.append(pattern)
    return tuple(patterns) or None


def _price(c: _Collector, value: Any, path: str) -> Price | None:
    entry = c.mapping(value, path, {"model", "input", "output", "cachedInput", "cacheWrite"})
    if entry is None:
        return None
    model = c.string(entry.get("model"), f"{path}.model", _MODEL_PATTERN,
                     "a model name, or a glob such as gpt-4o* or claude-*")
    figures = [_usd(c, entry.get(field), f"{path}.{field}", required=field in ("input",
                                                                                "output"))
               for field in ("input", "output", "cachedInput", "cacheWrite")]
    if model is None or figures[0] is None or figures[1] is None:
        return None
    return Price(model, figures[0], figures[1], figures[2], figures[3])


def _budget(c: _Collector, value: Any, path: str) -> Budget | None:
    entry = c.mapping(value, path, {"per", "tokens", "spend", "models", "for"})
    if entry is None:
        return None
    per = entry.get("per")
    scope = entry.get("for", "pod")
    if scope not in BUDGET_SCOPES:
        c.add(f"{path}.for", f"{scope!r}: a budget is for each pod on its own (pod) or for "
                             "all pods of the injection together (injection)")
    if per not in BUDGET_PERIODS:
        c.add(f"{path}.per", f"{per!r}: budgets are per {', '.join(BUDGET_PERIODS)} (UTC)")
    if ("tokens" in entry) == ("spend" in entry):
        c.add(path, "give exactly one of tokens (input and output together) or spend (USD)")
        return None
    tokens = _count(c, entry["tokens"], f"{path}.tokens") if "tokens" in entry else None
    spend = None
    if "spend" in entry:
        spend = _usd(c, entry["spend"], f"{path}.spend", required=True,
                     what=f"the dollars this budget allows per UTC {per} (5 for $5)")
        if spend == 0:
            c.add(f"{path}.spend", "a spend budget of 0 allows nothing: remove the hosts "
                                   "instead")
            spend = None
    models = _models(c, entry["models"], f"{path}.models") if "models" in entry else None
    if per not in BUDGET_PERIODS or (tokens is None and spend is None) or (
            scope not in BUDGET_SCOPES):
        return None
    return Budget(per=per, tokens=tokens, spend=spend, models=models,
                  shared=scope == "injection")


def parse_injection(document: Any, source: str, *, signed: bool = False
                    ) -> tuple[SecretInjection | None, list[Problem]]:
    """Parse one ``SecretInjection`` document; return it (or None) and its problems.
    ``signed``: an item of the operator's signed routes, which carries no selectors."""
    c = _Collector(source)
    doc = c.mapping(document, "", _DOC_FIELDS)
    if doc is None:
        return None, c.problems
    if doc.get("apiVersion") != API_VERSION:
        c.add("apiVersion", f"must be {API_VERSION!r}, got {doc.get('apiVersion')!r}")
    if doc.get("kind") not in (KIND, CLUSTER_KIND):
        c.add("kind", f"must be {KIND!r} (or {CLUSTER_KIND!r}), got {doc.get('kind')!r}")
    cluster = doc.get("kind") == CLUSTER_KIND
    meta = doc.get("metadata")
    name = namespace = None
    if not isinstance(meta, dict):
        c.add("metadata", "must be a mapping with at least a name")
    else:
        name = c.string(meta.get("name"), "metadata.name", _DNS_SUBDOMAIN,
                        "lower-case letters, digits, '-' and '.' (it is also the base-URL path)")
        if meta.get("namespace") is not None:
            namespace = c.string(meta.get("namespace"), "metadata.namespace", _DNS_SUBDOMAIN)
    if name:
        c.source = f"{source} ({name})"
    spec = c.mapping(doc.get("spec"), "spec", _SPEC_FIELDS)
    if spec is None:
        return None, c.problems

    hosts: list[HostPattern] = []
    for i, raw in enumerate(c.sequence(spec.get("hosts"), "spec.hosts", non_empty=True) or []):
        try:
            hosts.append(HostPattern.parse(raw))
        except ValueError as exc:
            c.add(f"spec.hosts[{i}]", str(exc))
    headers = _headers(c, spec["headers"]) if "headers" in spec else ()
    basic_auth = _basic_auth(c, spec["basicAuth"]) if "basicAuth" in spec else None
    query = _query_params(c, spec["queryParams"]) if "queryParams" in spec else ()
    rules = _rules(c, spec["rules"]) if "rules" in spec else None
    agent_env = _agent_env(c, spec["agentEnv"]) if "agentEnv" in spec else ()
    strip = _strip_headers(c, spec["stripHeaders"]) if "stripHeaders" in spec else ()
    selector = (_label_selector(c, spec["podSelector"], "spec.podSelector")
                if "podSelector" in spec else None)
    namespace_selector = None
    if cluster and "namespaceSelector" in spec:
        namespace_selector = _label_selector(c, spec["namespaceSelector"],
                                             "spec.namespaceSelector")
    elif cluster and not signed:  # the CRD's rule, standalone too (a route item has none)
        c.add("spec.namespaceSelector", f"a {CLUSTER_KIND} needs one: the namespaces it "
                                        "serves, by label ({} for every namespace)")
    elif "namespaceSelector" in spec:
        c.add("spec.namespaceSelector", f"only a {CLUSTER_KIND} selects namespaces; a "
                                        f"{KIND} serves its own namespace")
    credential = _credential(c, spec, headers, basic_auth, hosts)
    limits = _limits(c, spec["limits"], "spec.limits") if "limits" in spec else None
    llm = _llm(c, spec["llm"]) if "llm" in spec else None
    mcp = _mcp(c, spec["mcp"]) if "mcp" in spec else None
    if llm is not None and mcp is not None:
        c.add("spec.mcp", "an injection's hosts speak one protocol: a model API (spec.llm) or "
                          "MCP (spec.mcp); give each its own injection")
    capture = spec.get("capture")
    if capture is not None and capture not in CAPTURE_MODES:
        c.add("spec.capture", f"{capture!r}: capture is proxy (clients use the proxy "
                              "variables) or transparent (the pod's outbound traffic is "
                              "redirected to the sidecar as well)")
        capture = None

    if not set(_INJECTING_FIELDS) & spec.keys():
        c.add("spec", f"nothing to inject: give at least one of {', '.join(_INJECTING_FIELDS)}")
    if basic_auth and any(h.name.lower() == "authorization" for h in headers):
        c.add("spec.basicAuth", "basicAuth sets Authorization, which spec.headers also sets")
    if hosts and agent_env and any(e.base_url for e in agent_env) and not any(
        not h.wildcard for h in hosts
    ):
        c.add("spec.agentEnv", "a baseURL needs a host entry without a wildcard to send to")
    if cluster and llm is not None and any(b.shared for b in llm.budgets):
        c.add("spec.llm.budgets", f"a {CLUSTER_KIND}'s budgets are per pod (for: pod); a "
                                  "budget shared by all pods needs a namespaced "
                                  f"{KIND}, whose status keeps the count")
    if c.problems or not name:
        return None, c.problems
    return SecretInjection(
        name=name, namespace=namespace, hosts=tuple(hosts), headers=headers,
        basic_auth=basic_auth, query_params=query, rules=rules, agent_env=agent_env,
        strip_headers=strip, pod_selector=selector, credential=credential, capture=capture,
        limits=limits, llm=llm, mcp=mcp, cluster=cluster, namespace_selector=namespace_selector,
    ), []


def find_conflicts(injections: Iterable[SecretInjection]) -> list[Problem]:
    """Problems between documents: duplicate names, two injections setting one header on one host."""
    problems: list[Problem] = []
    seen: dict[str, SecretInjection] = {}
    items = list(injections)
    for inj in items:
        if inj.name in seen:
            problems.append(Problem(inj.name, "metadata.name", "two injections have this name"))
        seen[inj.name] = inj
    for i, a in enumerate(items):
        for b in items[i + 1 :]:
            shared = (a.injected_header_names() & b.injected_header_names()) | (
                {q.name for q in a.query_params} & {q.name for q in b.query_params}
            )
            if not shared:
                continue
            for ha in a.hosts:
                for hb in b.hosts:
                    if ha.overlaps(hb):
                        problems.append(Problem(
                            b.name, "spec.hosts",
                            f"{hb} overlaps {ha} of injection {a.name!r} and both set "
                            f"{', '.join(sorted(shared))}; only one injection may set a header or"
                            " parameter for a host",
                        ))
    return problems


def parse_injections(documents: Iterable[tuple[str, Any]], *, signed: bool = False
                     ) -> list[SecretInjection]:
    """Parse (source, document) pairs into injections or raise :class:`SpecError` with all problems.

    ``SecretInjectionList`` documents (``items: [...]``) are expanded; empty documents skipped.
    ``signed``: the operator's signed routes (their items carry no selectors).
    """
    injections: list[SecretInjection] = []
    problems: list[Problem] = []
    for source, doc in _expand_lists(documents):
        injection, found = parse_injection(doc, source, signed=signed)
        problems.extend(found)
        if injection:
            injections.append(injection)
    problems.extend(find_conflicts(injections))
    if problems:
        raise SpecError(problems)
    return injections


def _expand_lists(documents: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    for source, doc in documents:
        if doc is None:
            continue
        if isinstance(doc, dict) and doc.get("kind") == LIST_KIND:
            items = doc.get("items") or []
            for i, item in enumerate(items):
                yield f"{source} items[{i}]", item
        else:
            yield source, doc


def other_kinds(documents: Iterable[tuple[str, Any]]
                ) -> tuple[list[tuple[str, Any]], list[str]]:
    """Set aside documents of other API groups (a ``v1`` Secret, a Deployment) that share a
    file with the injections, as ``kubectl apply -f`` allows: (kept, what was skipped).
    A document of our own group with a wrong kind is kept, so its typo is reported."""
    kept, skipped = [], []
    for source, doc in documents:
        version = doc.get("apiVersion") if isinstance(doc, dict) else None
        if isinstance(version, str) and version.partition("/")[0] != API_GROUP:
            name = (doc.get("metadata") or {}).get("name") if isinstance(
                doc.get("metadata"), dict) else None
            skipped.append(f"{source}: {doc.get('kind', '?')} {name or ''}".rstrip())
            continue
        kept.append((source, doc))
    return kept, skipped


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping. YAML says keys are
    unique, but PyYAML keeps the last: an edit that adds ``hosts:`` below the first would
    move a key to other hosts without a word."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # "<<: *defaults" overrides by design
                key = self.construct_object(key_node, deep=True)
                try:
                    earlier = first.setdefault(key, key_node)
                except TypeError:
                    continue  # an unhashable key: the constructor below says so
                if earlier is not key_node:
                    raise yaml.constructor.ConstructorError(
                        f"in the mapping that starts on line {node.start_mark.line + 1}",
                        node.start_mark,
                        f"key {key!r} is given twice (lines {earlier.start_mark.line + 1} and "
                        f"{key_node.start_mark.line + 1}); keep one", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load_yaml_documents(text: str, name: str) -> list[Any]:
    """Every document of ``text`` (YAML or JSON), strictly: a key given twice in a mapping is
    an error. ``name`` is the file the marks of an error name."""
    loader = _StrictLoader(text)
    loader.name = name  # marks say "file.yaml", line L, not "<unicode string>"
    try:
        documents = []
        while loader.check_data():
            documents.append(loader.get_data())
        return documents
    finally:
        loader.dispose()


def read_documents(path: Path) -> list[tuple[str, Any]]:
    """Read a file or a folder of YAML/JSON files into (source label, document) pairs.

    Raises :class:`SpecError` for unreadable files and YAML syntax errors.
    """
    files = _injection_files(path)
    documents: list[tuple[str, Any]] = []
    problems: list[Problem] = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
            loaded = load_yaml_documents(text, str(file))
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(Problem(str(file), "", f"cannot read: {exc}"))
            continue
        except yaml.YAMLError as exc:
            hint = ("\n  (YAML is indented with spaces; a tab cannot indent it)"
                    if "'\\t'" in str(exc) else "")
            problems.append(Problem(str(file), "", f"not valid YAML or JSON: {exc}{hint}"))
            continue
        documents.extend((f"{file}#{i + 1}", doc) for i, doc in enumerate(loaded))
    if problems:
        raise SpecError(problems)
    return documents


def _injection_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(
            p for p in path.iterdir()
            if p.suffix in SUPPORTED_FILE_SUFFIXES and not p.name.startswith(".") and p.is_file()
        )
        if not files:
            raise SpecError([Problem(str(path), "", "folder holds no .yaml, .yml or .json files")])
        return files
    if not path.exists():
        raise SpecError([Problem(str(path), "", "does not exist; pass --injections FILE or FOLDER")])
    return [path]


def load_injections(path: Path) -> list[SecretInjection]:
    """Read and parse ``--injections``; raise :class:`SpecError` naming every problem."""
    return parse_injections(read_documents(path))
